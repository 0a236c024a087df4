"""The artifact store: the one owner of every stored artifact's path and of its reading and writing.

Assets (and the CLI) name what they want (a dataset's rows or card, a partition's features, an adapter's spec,
the ensemble's results); only this module knows the layout under the storage root:

    datasets/<name>.parquet, .json       rows and card of one dataset
    zero_shot/<name>.parquet             zero-shot label log-probabilities
    features/<name>.parquet, .json       gradient features at a fresh LoRA, + sidecar naming θ0 and the projection
    features_meta/<name>.parquet, .json  the same at the meta-initialization adapter
    hidden_states/<name>.npz             cached mean hidden state (target_selection)
    calibration/<theta0>.json, .csv      the estimator's λ at θ0 (fresh_lora | meta_init) and its error table
    estimates/subset_estimates.parquet   + subset_weights.npy, subset_order.parquet
    partition/task_partition.json        + affinity_heatmap.png
    adapters/<key>.json, <key>/, <key>.result.json   adapter spec, peft folder, training result
    adapters/meta_init/                  the meta-initialization adapter (+ meta_init.json inside)
    training/<run>/                      resumable training work folders
    selection/<target>.parquet, .json, .png
    ensemble/current/, current.json, results.parquet, results.png
    reports/<name>.png, .csv

Validation is split into two folds (ml.folds, the same split in every process): "select" (checkpoints, λ, the
partition, boosting rounds) and "weights" (the ensemble weights only); `rows`, `examples` and `read_feature_set`
take either as a split.

Every name that reaches a path is validated (ml.data_format.validate_name); every write is atomic.
The root is read from GROUPLORA_HOME when used (not when Definitions load), so one process can serve projects.
"""

import base64
import hashlib
import json
import shutil
from pathlib import Path
from shutil import copy2
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from grouplora.ml.atomic import atomic_dir, atomic_path, write_json, write_parquet
from grouplora.ml.data_format import validate_name
from grouplora.ml.folds import SELECT, WEIGHTS, weights_fold_mask
from grouplora.ml.hashing import sha256_file
from grouplora.orchestration import settings
from grouplora.orchestration.partitions import dataset_partitions

FOLD_SELECT, FOLD_WEIGHTS = SELECT, WEIGHTS  # the validation folds (ml.folds), usable as a split
FOLDS = (FOLD_SELECT, FOLD_WEIGHTS)

# Artifact kinds of one partition per dataset.
DATASETS = "datasets"
ZERO_SHOT = "zero_shot"
FEATURES = "features"  # gradient_features: θ0 = fresh LoRA
META_FEATURES = "features_meta"  # meta_gradient_features: θ0 = the meta-initialization adapter
HIDDEN = "hidden_states"

META_INIT = "meta_init"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
META_SIDECAR = "meta_init.json"  # inside the adapter folder, so it is swapped in with the weights it describes


def png_markdown(path: Path) -> dg.MetadataValue:
    """A stored PNG inlined as Markdown metadata (the UI shows it without file access)."""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return dg.MetadataValue.md(f"![{Path(path).name}](data:image/png;base64,{data})")


class ArtifactStore(dg.ConfigurableResource):
    """Every stored artifact of the pipeline under one root ("" = GROUPLORA_HOME/storage, read when used)."""

    root: str = ""

    # ------------------------------------------------------------------------------------------ layout

    def base(self) -> Path:
        return Path(self.root) if self.root else settings.home() / "storage"

    def _path(self, kind: str, name: str, suffix: str = ".parquet") -> Path:
        return self.base() / validate_name(kind, "artifact kind") / f"{validate_name(name)}{suffix}"

    def _folder(self, kind: str) -> Path:
        return self.base() / validate_name(kind, "artifact kind")

    def parquet_glob(self, kind: str) -> str:
        """Every partition's Parquet file of one kind (what a DuckDB view reads)."""
        return str(self._folder(kind) / "*.parquet")

    def stored(self, kind: str) -> list[str]:
        """Names that have a Parquet artifact of `kind`, sorted."""
        return sorted(p.stem for p in self._folder(kind).glob("*.parquet"))

    def current_datasets(self, context: dg.AssetExecutionContext, kind: str = FEATURES) -> list[str]:
        """Datasets that are registered partitions and have a `kind` artifact (a removed dataset drops out)."""
        registered = set(context.instance.get_dynamic_partitions(dataset_partitions.name))
        have = set(self.stored(kind))
        missing = sorted(registered - have)
        if missing:
            context.log.warning(f"no {kind!r} artifact yet for {missing}: left out of this step")
        return sorted(registered & have)

    # ------------------------------------------------------------------------------------------ datasets

    def write_dataset(self, name: str, rows: pd.DataFrame, card: dict) -> Path:
        path = write_parquet(rows, self._path(DATASETS, name))
        write_json(card, self._path(DATASETS, name, ".json"))
        return path

    def rows(self, name: str, split: str | tuple[str, ...] | None = None,
             columns: list[str] | None = None) -> pd.DataFrame:
        """One dataset's rows; only those of `split` (one or several, index reset) when given. A split may be a
        validation fold, FOLD_SELECT or FOLD_WEIGHTS (ml.folds)."""
        if isinstance(split, str) and split in FOLDS:
            df = self.rows(name, "validation", None if columns is None else list(dict.fromkeys([*columns, "label_id"])))
            fold = df[weights_fold_mask(df["label_id"].to_numpy()) == (split == FOLD_WEIGHTS)]
            return fold.reset_index(drop=True)[columns if columns is not None else fold.columns]
        cols = None if columns is None else list(dict.fromkeys([*columns, *(["split"] if split else [])]))
        df = pd.read_parquet(self._path(DATASETS, name), columns=cols)
        if split is not None:
            df = df[df["split"].isin([split] if isinstance(split, str) else split)].reset_index(drop=True)
        return df if columns is None else df[columns]

    def card(self, name: str) -> dict:
        """One dataset's card: classes, label words, template, counts, source hash."""
        return json.loads(self._path(DATASETS, name, ".json").read_text())

    def examples(self, tokenizer: Any, members: list[str], split: str = "train") -> list:
        """Every member dataset's examples of one split (or validation fold), pooled."""
        return [e for ex in self.examples_by_dataset(tokenizer, members, split).values() for e in ex]

    def examples_by_dataset(self, tokenizer: Any, members: list[str], split: str = "train") -> dict[str, list]:
        """{member: its examples of one split (or validation fold)}, each with its own dataset's label tokens."""
        from grouplora.ml.model import label_token_ids
        from grouplora.ml.training import TrainExample

        out = {}
        for name in members:
            df = self.rows(name, split, ["prompt", "label_id"])
            ids = label_token_ids(tokenizer, self.card(name)["label_words"])
            out[name] = [TrainExample(p, int(y), ids) for p, y in zip(df["prompt"], df["label_id"])]
        return out

    # ------------------------------------------------------------------------------------------ zero-shot

    def write_zero_shot(self, name: str, scores: pd.DataFrame) -> Path:
        return write_parquet(scores, self._path(ZERO_SHOT, name))

    def zero_shot(self, name: str) -> pd.DataFrame:
        return pd.read_parquet(self._path(ZERO_SHOT, name))

    def zero_shot_logprobs(self, name: str, split: str) -> np.ndarray:
        """(N, C) stored zero-shot label log-probs of one split (or validation fold), in `rows(name, split)`'s
        order (matched by example_id)."""
        zs = self.zero_shot(name).set_index("example_id")
        ids = self.rows(name, split, ["example_id"])["example_id"]
        missing = ids[~ids.isin(zs.index)]
        if len(missing):
            raise dg.Failure(f"zero-shot scores of {name} have no row for example {missing.iloc[0]!r} ({split}): "
                             "re-materialize zero_shot_scores")
        if not len(ids):
            return np.zeros((0, len(self.card(name)["label_words"])), dtype=np.float32)
        return np.stack(zs.loc[ids.to_numpy(), "logprobs"].to_numpy())

    # ------------------------------------------------------------------------------------------ features

    def write_features(self, kind: str, name: str, table: pa.Table, sidecar: dict) -> Path:
        """One partition's features (`kind`: FEATURES or META_FEATURES) and the sidecar naming θ0."""
        path = self._path(kind, name)
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)
        write_json(sidecar, self._path(kind, name, ".json"))
        return path

    def read_features(self, names: list[str], kind: str = FEATURES) -> tuple[pd.DataFrame, np.ndarray, dict]:
        """All datasets' features as one frame plus an (N, d) array, and their common sidecar; refuses
        partitions taken with another projection or model."""
        frames, blocks, sidecars = [], [], {}
        for name in names:
            table = pq.read_table(self._path(kind, name))
            d = table.schema.field("features").type.list_size
            blocks.append(table.column("features").combine_chunks().flatten().to_numpy().reshape(-1, d))
            frames.append(table.drop(["features"]).to_pandas())
            sidecars[name] = json.loads(self._path(kind, name, ".json").read_text())
        keys = {(s["d"], s["seed"], s["projection_checksum"], s["model_fingerprint"]) for s in sidecars.values()}
        if len(keys) > 1:
            by = {n: s["settings"] for n, s in sidecars.items()}
            asset = "meta_gradient_features" if kind == META_FEATURES else "gradient_features"
            raise dg.Failure(f"{asset} were taken with different projections or models: {by}; "
                             f"re-materialize {asset} for all datasets")
        return pd.concat(frames, ignore_index=True), np.concatenate(blocks), next(iter(sidecars.values()))

    def read_feature_set(self, names: list[str], kind: str = FEATURES) -> tuple[Any, dict]:
        """(ml.estimation.FeatureSet, sidecar) of the datasets' features with validation cut to the selection fold:
        the estimates, λ and the partition never see the weights fold. Rows are in the stored order, which is
        `rows(name, "validation")`'s, so the fold is the one `rows(name, FOLD_SELECT)` gives."""
        from grouplora.ml.estimation import FeatureSet

        frame, X, sidecar = self.read_features(names, kind)
        keep = np.ones(len(frame), dtype=bool)
        for name in names:
            rows = np.flatnonzero((frame["dataset"] == name).to_numpy() & (frame["split"] == "validation").to_numpy())
            keep[rows[weights_fold_mask(frame["label_id"].to_numpy()[rows])]] = False
        return FeatureSet.from_frame(frame[keep].reset_index(drop=True), X[keep]), sidecar

    def hidden_state(self, name: str, key: str) -> np.ndarray | None:
        """The cached mean hidden state of a dataset if it was computed under `key`, else None."""
        path = self._path(HIDDEN, name, ".npz")
        if not path.exists():
            return None
        with np.load(path) as cached:
            return cached["mean"] if str(cached["key"]) == key else None

    def write_hidden_state(self, name: str, key: str, mean: np.ndarray) -> None:
        with atomic_path(self._path(HIDDEN, name, ".npz")) as tmp, open(tmp, "wb") as f:
            np.savez(f, mean=mean, key=np.array(key))

    # ------------------------------------------------------------------------------------------ estimates

    def write_estimates(self, table: pd.DataFrame, weights: np.ndarray, subset_ids: list[str]) -> Path:
        """The estimates table, each subset's w (row k: subset k, for forward mode) and the subsets' order."""
        path = write_parquet(table, self._path("estimates", "subset_estimates"))
        with atomic_path(self._path("estimates", "subset_weights", ".npy")) as tmp, open(tmp, "wb") as f:
            np.save(f, weights)
        write_parquet(pd.DataFrame({"subset_id": subset_ids}), self._path("estimates", "subset_order"))
        return path

    # ------------------------------------------------------------------------------------------ calibration

    def write_calibration(self, record: dict, table: pd.DataFrame, work: Path | None = None) -> Path:
        """The estimator's λ for the features of kind record["kind"] (FEATURES or META_FEATURES) and its error
        table as CSV; then drop the earlier calibrations' fine-tune folders (`work` is this one's)."""
        kind = validate_name(record["kind"], "artifact kind")
        with atomic_path(self._path("calibration", kind, ".csv")) as tmp:
            table.to_csv(tmp, index=False)
        path = write_json(record, self._path("calibration", kind, ".json"))
        for old in self._folder("training").glob(f"calibration_{kind}_*"):
            if old.is_dir() and (work is None or old.name != Path(work).name):
                shutil.rmtree(old, ignore_errors=True)
        return path

    def calibration_csv(self, kind: str) -> Path:
        return self._path("calibration", kind, ".csv")

    def calibration(self, kind: str, names: list[str], sidecar: dict, pinned: float | None) -> dict:
        """The stored λ calibration for the features of `kind`; Failure unless it was made for these datasets'
        features (`sidecar`: read_features') and the setting (`pinned`: a pinned λ, or None for calibrated)."""
        asset = "meta_lam_calibration" if kind == META_FEATURES else "lam_calibration"
        path = self._path("calibration", kind, ".json")
        if not path.exists():
            raise dg.Failure(f"no λ calibration for {kind} ({path}): materialize {asset} first")
        rec = json.loads(path.read_text())
        if rec["datasets"] != names or rec["projection_checksum"] != sidecar["projection_checksum"] \
                or rec["feature_settings"] != sidecar["settings"]:
            raise dg.Failure(f"λ was calibrated on other features (datasets {rec['datasets']}, "
                             f"{rec['feature_settings']}) than these ({names}, {sidecar['settings']}): "
                             f"re-materialize {asset}")
        if pinned is not None and not (rec["source"] == "pinned" and rec["lam"] == pinned):
            raise dg.Failure(f"the settings pin λ = {pinned:g} but the stored λ is {rec['lam']:g} ({rec['source']}): "
                             f"re-materialize {asset}")
        if pinned is None and rec["source"] != "calibrated":
            raise dg.Failure(f"the stored λ = {rec['lam']:g} was pinned, the settings ask for a calibrated one: "
                             f"re-materialize {asset}")
        return rec

    def features_theta0(self, base_model: Any, gradient_settings: Any) -> tuple[Path, str]:
        """(adapter folder, "fresh_lora" | "meta_init") of the θ0 gradient_features are taken at: the gradient
        settings' init_adapter, or their fresh LoRA (B = 0), saved here once (atomically) under a key of what
        determines it. The start of λ-calibration fine-tunes and of ridge boosting rounds (θ0 + Pw)."""
        from grouplora.ml.lora import lora_on

        gs = gradient_settings
        if gs.init_adapter:
            return Path(gs.init_adapter), "meta_init"
        identity = f"{gs.fingerprint()}|{base_model.model_name()}|{base_model.numerics()}"
        folder = self.adapter_dir("theta0_" + hashlib.sha256(identity.encode()).hexdigest()[:12])
        if not all((folder / f).exists() for f in ADAPTER_FILES):
            model, _ = base_model.load()
            with atomic_dir(folder) as tmp, lora_on(model, r=gs.lora_r, alpha=gs.lora_alpha,
                                                    target_modules=gs.modules(), seed=gs.seed) as pm:
                pm.save_pretrained(str(tmp))
        return folder, "fresh_lora"

    # ------------------------------------------------------------------------------------------ partition, adapters

    def write_partition(self, spec: dict, adapter_specs: list[dict]) -> Path:
        """The task partition, and one spec per adapter key (each adapter partition reads its own: later
        partitions don't disturb it)."""
        for a in adapter_specs:
            write_json(a, self._path("adapters", a["key"], ".json"))
        return write_json(spec, self._path("partition", "task_partition", ".json"))

    def partition(self) -> dict:
        path = self._path("partition", "task_partition", ".json")
        if not path.exists():
            raise dg.Failure(f"no task partition at {path}: materialize task_partition first")
        return json.loads(path.read_text())

    def adapter_spec(self, key: str) -> dict:
        path = self._path("adapters", key, ".json")
        if not path.exists():
            raise dg.Failure(f"adapter {key!r} has no spec at {path}: materialize task_partition first")
        return json.loads(path.read_text())

    def adapter_dir(self, key: str) -> Path:
        """The peft folder of one adapter (group, baseline, boost_<key>, theta0_<checksum>, meta_init)."""
        return self._path("adapters", key, "")

    def write_adapter_result(self, key: str, record: dict) -> Path:
        return write_json(record, self._path("adapters", key, ".result.json"))

    def adapter_result(self, key: str) -> dict | None:
        """The training result of one adapter; None if it is not trained yet."""
        path = self._path("adapters", key, ".result.json")
        return json.loads(path.read_text()) if path.exists() else None

    def training_dir(self, run: str) -> Path:
        """A resumable training work folder (checkpoints per epoch)."""
        return self._path("training", run, "")

    @staticmethod
    def adapter_fingerprint(folder: Path) -> str:
        """Hash of an adapter's weight file: which θ0 a set of features was taken at."""
        return sha256_file(Path(folder) / "adapter_model.safetensors")[:16]

    # ------------------------------------------------------------------------------------------ meta-init

    def meta_init_dir(self) -> Path:
        return self.adapter_dir(META_INIT)

    def write_meta_init(self, work: Path, record: dict) -> Path:
        """Swap in the finished adapter from its work folder, with its record, as a whole (the old adapter stays
        whole until the new one is complete); then drop earlier runs' work folders."""
        out = self.meta_init_dir()
        with atomic_dir(out) as tmp:
            for name in ADAPTER_FILES:
                copy2(Path(work) / name, tmp / name)
            (tmp / META_SIDECAR).write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
        for old in self._folder("training").glob(f"{META_INIT}_*"):
            if old.is_dir() and old.name != Path(work).name:
                shutil.rmtree(old, ignore_errors=True)
        return out

    def meta_init(self) -> dict:
        """The current meta-init adapter's record (datasets, training result, fingerprint); Failure if none."""
        folder = self.meta_init_dir()
        if not all((folder / f).exists() for f in (*ADAPTER_FILES, META_SIDECAR)):
            raise dg.Failure(f"no meta-initialization adapter at {folder}: materialize meta_init_adapter first")
        return json.loads((folder / META_SIDECAR).read_text())

    # ------------------------------------------------------------------------------------------ selection

    def write_selection(self, target: str, table: pd.DataFrame, record: dict) -> tuple[Path, Path]:
        return (write_parquet(table, self._path("selection", target)),
                write_json(record, self._path("selection", target, ".json")))

    def selection(self, target: str) -> tuple[dict, pd.DataFrame]:
        """(the chosen sets and settings, the scores table) of one target."""
        return (json.loads(self._path("selection", target, ".json").read_text()),
                pd.read_parquet(self._path("selection", target)))

    # ------------------------------------------------------------------------------------------ ensemble

    def ensemble_dir(self) -> Path:
        """The self-contained ensemble folder (ensemble.json + copies of the adapters it uses)."""
        return self._path("ensemble", "current", "")

    def write_ensemble_info(self, info: dict) -> Path:
        return write_json(info, self._path("ensemble", "current", ".json"))

    def ensemble_info(self) -> dict:
        return json.loads(self._path("ensemble", "current", ".json").read_text())

    def write_ensemble_results(self, table: pd.DataFrame) -> Path:
        return write_parquet(table, self.ensemble_results_path())

    def ensemble_results_path(self) -> Path:
        return self._path("ensemble", "results")

    def ensemble_results(self) -> pd.DataFrame:
        return pd.read_parquet(self.ensemble_results_path())

    # ------------------------------------------------------------------------------------------ reports

    def png_path(self, kind: str, name: str) -> Path:
        """Where a chart goes (ml.plots writes it atomically): kind is reports, partition, selection or ensemble."""
        if kind not in ("reports", "partition", "selection", "ensemble"):
            raise ValueError(f"no charts of kind {kind!r}")
        return self._path(kind, name, ".png")

    def write_report_csv(self, name: str, table: pd.DataFrame) -> Path:
        path = self._path("reports", name, ".csv")
        with atomic_path(path) as tmp:
            table.to_csv(tmp, index=False)
        return path
