"""Positive control: does the chain find and fix interference where we KNOW it exists?

The suite is built from real data: binary datasets, each next to a twin with the same texts, splits and template
but its label words swapped (`grouplora.ml.datapack`: preset `twins`, or `write_twin_pack` from any pack). One
adapter on everything sees every text with both answers and must fight itself; the right partition keeps every
twin pair apart. Per seed, the chain runs through the same ml/ functions the pipeline's assets call:

  one adapter on all datasets (best epoch on the selection fold; also θ0 when --theta0 meta)
  → gradient features at θ0 (train + selection fold)
  → λ calibrated against real fine-tunes of a few random subsets (ml.calibration), or pinned by --lam
  → estimates of singletons, pairs and random subsets at that λ → the pipeline's SQL (subset_affinity,
    pairwise_affinity) in DuckDB → symmetrized affinity → SDP partition (ml.clustering)
  → one adapter per group (best epoch on the selection fold) → boosting (ml.boosting: residual rounds with step η,
    kept only if the selection-fold loss drops) → per-dataset ensemble weights fit on the weights fold
    (ml.ensemble.score_dataset) → test accuracy of every method.

Validation is split once per dataset (ml.folds): the selection fold chooses checkpoints, λ, the partition and the
boosting rounds; the weights fold fits the ensemble weights only; test is only reported.

    python benchmarks/positive_control.py --device cpu --model smollm2-135m-instruct --data data/twins \\
        --pairs rotten_tomatoes amazon_reviews --max-train 32 --max-val 32 --max-test 48 --seeds 0
    python benchmarks/positive_control.py --device cuda --data /root/data --work /root/work_pc   # GPU

Writes --out (default benchmarks/results/positive_control_<device>.json) and a heatmap PNG beside it (rendered
later with --render if matplotlib is missing where it ran).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chain import Work, add_recipe_args, affinity_stage  # noqa: E402
from estimation_fidelity import ROOT, Data, _jsonable, load_data, machine  # noqa: E402

from grouplora.ml.boosting import BoostResult, BoostSettings, RidgeBase, boost_group, logprobs_by_dataset, round_logits  # noqa: E402
from grouplora.ml.calibration import LAM_GRID, calibrate_by_finetuning  # noqa: E402
from grouplora.ml.datapack import TWIN_SUFFIX, write_twin_pack  # noqa: E402
from grouplora.ml.ensemble import method_costs, score_dataset  # noqa: E402
from grouplora.ml.estimation import FeatureSet  # noqa: E402
from grouplora.ml.features import compute_features  # noqa: E402
from grouplora.ml.flops import forward_flops, lora_training_flops  # noqa: E402
from grouplora.ml.folds import split_validation  # noqa: E402
from grouplora.ml.lora import load_adapter  # noqa: E402
from grouplora.ml.model import load_base_model  # noqa: E402
from grouplora.ml.projection import Projection  # noqa: E402
from grouplora.ml.training import TrainConfig, TrainExample, save_fresh_adapter, train_adapter  # noqa: E402

METHODS = ("zero_shot", "one_adapter_all", "grouped", "grouped_boosted", "ensemble", "ensemble_with_all")


# ------------------------------------------------------------------------------------------------ data


class Suite:
    """Per dataset: TrainExample lists for train, the selection and weights folds of validation, and test."""

    def __init__(self, data: list[Data], weights_share: float, fold_seed: int):
        self.names = [d.name for d in data]
        self.train, self.select, self.weights, self.test = {}, {}, {}, {}
        for d in data:
            ids = tuple(d.label_ids)
            ex = {sp: [TrainExample(p, int(y), ids) for p, y in zip(f["prompt"], f["label_id"])]
                  for sp, f in (("train", d.train), ("val", d.val), ("test", d.test))}
            self.train[d.name], self.test[d.name] = ex["train"], ex["test"]
            self.select[d.name], self.weights[d.name] = split_validation(
                ex["val"], d.val["label_id"].to_numpy(), weights_share=weights_share, seed=fold_seed)

    def of(self, split: str, names: Sequence[str]) -> dict[str, list[TrainExample]]:
        return {n: getattr(self, split)[n] for n in names}

    def pooled(self, split: str, names: Sequence[str]) -> list[TrainExample]:
        return [e for n in names for e in getattr(self, split)[n]]


def twin_pairs(names: Sequence[str]) -> list[tuple[str, str]]:
    return [(n, n + TWIN_SUFFIX) for n in names if n + TWIN_SUFFIX in names]


def prepare_pack(args) -> Path:
    """The twins pack: --data as is when it holds twins of --pairs, else written from it into the work folder."""
    folder = Path(args.data) if args.data is not None else ROOT / "data" / "twins"
    if args.data is None and not (folder / "datasets.yaml").exists():
        from grouplora.ml.datapack import build_datapack
        build_datapack("twins", folder, progress=False)
    from grouplora.ml.data_format import discover
    have = set(discover(folder))
    pairs = args.pairs or sorted(n for n in have if n + TWIN_SUFFIX in have)
    if not pairs:
        raise SystemExit(f"{folder} holds no twins; name the datasets to twin with --pairs")
    if all(p in have and p + TWIN_SUFFIX in have for p in pairs):
        args.only = [x for p in pairs for x in (p, p + TWIN_SUFFIX)]
        return folder
    out = args.work / "pack"
    if not (out / "datasets.yaml").exists():
        write_twin_pack(folder, out, pairs)
    args.only = [x for p in pairs for x in (p, p + TWIN_SUFFIX)]
    return out


# ---------------------------------------------------------------------------------------------- stages


class Chain:
    """One base model, the suite, and a work folder where every stage caches its result (rerun = resume)."""

    def __init__(self, model, tok, suite: Suite, cfg: TrainConfig, args):
        self.model, self.tok, self.s, self.cfg, self.a = model, tok, suite, cfg, args
        self.kw = {"batch_size": args.eval_batch_size, "max_length": args.max_length}
        self.work = Work(args.work, None)

    def path(self, *parts: str) -> Path:
        return self.work.path(*parts)

    def stage(self, name: str, fn) -> dict:
        return self.work.stage(name, fn)

    def config(self, seed: int) -> TrainConfig:
        return TrainConfig(**{**self.cfg.__dict__, "seed": seed})

    def train(self, name: str, members: Sequence[str], seed: int) -> dict:
        """An adapter on the members' train examples; the kept epoch is chosen on their selection fold."""
        res = train_adapter((self.model, self.tok), self.s.pooled("train", members), self.config(seed),
                            self.path("adapters", name), val_examples=self.s.pooled("select", members),
                            eval_batch_size=self.a.eval_batch_size)
        print(f"  {name}: {res.steps} steps, best epoch {res.best_epoch}/{res.epochs}, val "
              f"{[round(v, 3) for v in res.val_losses]}, {res.seconds:.1f} s", flush=True)
        return {"members": list(members), **res.to_dict()}

    def logits(self, adapter: str | None, names: Sequence[str], splits=("weights", "test")) -> dict:
        """{split: {dataset: (N, C) log-probs}} of an adapter folder name (None: the base), cached as .npz."""
        cache = self.path("logits", f"{adapter or 'base'}.npz")
        have = dict(np.load(cache)) if cache.exists() else {}
        need = [(sp, n) for sp in splits for n in names if f"{sp}/{n}" not in have]
        if need:
            d = None if adapter is None else self.path("adapters", adapter)
            for sp in sorted({sp for sp, _ in need}):
                got = logprobs_by_dataset(self.model, self.tok, d, {n: getattr(self.s, sp)[n] for s2, n in need
                                                                    if s2 == sp}, **self.kw)
                have.update({f"{sp}/{n}": v for n, v in got.items()})
            tmp = cache.with_suffix(".tmp.npz")
            np.savez(tmp, **have)
            tmp.replace(cache)
        return {sp: {n: have[f"{sp}/{n}"] for n in names} for sp in splits}

    # -------------------------------------------------------------------------------------- features

    def theta0(self, seed: int) -> Path:
        if self.a.theta0 == "meta_init":
            return self.path("adapters", f"all_s{seed}")
        d = self.path("adapters", f"theta0_fresh_s{seed}")
        if not (d / "adapter_model.safetensors").exists():
            save_fresh_adapter((self.model, self.tok), self.config(seed), d)
        return d

    def features(self, seed: int) -> tuple[FeatureSet, Projection, dict]:
        """Gradient features at θ0 of every train and selection-fold example (cached .npz)."""
        cache = self.path(f"features_s{seed}.npz")
        flags = {n: p.requires_grad for n, p in self.model.named_parameters()}
        pm = load_adapter(self.model, self.theta0(seed))
        try:
            proj = Projection.for_model(pm, d=self.a.d, seed=seed)
            info = {"seconds": 0.0, "tokens": 0}
            if cache.exists():
                z = np.load(cache)
                arrays = {k: z[k] for k in z.files}
                info = json.loads(self.path(f"features_s{seed}.json").read_text())
            else:
                t = time.perf_counter()
                arrays = {}
                for split in ("train", "select"):
                    for n in self.s.names:
                        ex = getattr(self.s, split)[n]
                        f0, G = compute_features(pm, self.tok, [e.prompt for e in ex], [e.label_index for e in ex],
                                                 list(ex[0].label_ids), proj, batch_size=self.a.feature_batch_size,
                                                 max_length=self.a.max_length)
                        arrays[f"{split}/{n}/f0"], arrays[f"{split}/{n}/G"] = f0, G
                        info["tokens"] += sum(min(len(t), self.a.max_length) for t in
                                              self.tok([e.prompt for e in ex])["input_ids"])
                info["seconds"] = time.perf_counter() - t
                info["n_examples"] = sum(len(v) for k, v in arrays.items() if k.endswith("/f0"))
                info["projection_checksum"] = proj.checksum()
                tmp = cache.with_suffix(".tmp.npz")
                np.savez(tmp, **arrays)
                tmp.replace(cache)
                self.path(f"features_s{seed}.json").write_text(json.dumps(info))
        finally:
            pm.unload()
            for n, p in self.model.named_parameters():
                p.requires_grad_(flags.get(n, p.requires_grad))
        fs = FeatureSet.from_arrays({n: (arrays[f"train/{n}/f0"], arrays[f"train/{n}/G"]) for n in self.s.names},
                                    {n: (arrays[f"select/{n}/f0"], arrays[f"select/{n}/G"]) for n in self.s.names})
        return fs, proj, info

    # ----------------------------------------------------------------------------------- calibration

    def calibration(self, seed: int, feats: FeatureSet) -> dict:
        a = self.a
        cal, runs = calibrate_by_finetuning(self.model, self.tok, feats, self.s.train, self.s.select, self.config(seed),
                                            self.path("calibration", f"s{seed}"), theta0=a.theta0,
                                            init_adapter=self.theta0(seed), n_subsets=a.n_calibration,
                                            size=a.subset_size, seed=1000 + seed, grid=a.lam_grid, pinned_lam=a.lam,
                                            eval_batch_size=a.eval_batch_size,
                                            log=lambda m: print(f"  {m}", flush=True))
        print(f"  λ = {cal.lam:g} ({cal.source}); at λ: {cal.at_lam()}", flush=True)
        runs = {k: {x: v for x, v in r.items() if x != "true"} for k, r in runs.items()}
        return {"calibration": cal.to_dict(), "runs": runs, "flops": sum(r["flops"] for r in runs.values()),
                "steps": sum(r["steps"] for r in runs.values())}

    # -------------------------------------------------------------------------------------- affinity

    def affinity(self, seed: int, feats: FeatureSet, lam: float) -> dict:
        """The pipeline's estimation → affinity → partition (chain.affinity_stage), and how it treated the twins."""
        a = self.a
        record, part, pair = affinity_stage(feats, lam=lam, n_random=a.n_random, size=a.subset_size, seed=seed,
                                            max_m=a.max_m)
        T, order = record["T"], record["names"]
        pos = {n: i for i, n in enumerate(order)}
        lr = pair.set_index(["target", "source"])["loss_reduction"]
        twins = []
        for x, y in twin_pairs(order):
            i, j = pos[x], pos[y]
            row = lambda k: np.delete(T[k], k).mean()  # noqa: E731 - the target's mean affinity over helpers
            twins.append({"dataset": x, "twin": y, "affinity_sym": float(part.A[i, j]),
                          "affinity_sym_rank": int((part.A[i] < part.A[i, j]).sum()),  # 0 = its most negative
                          "contrast": float((T[i, j] - row(i) + T[j, i] - row(j)) / 2),
                          "pairwise_loss_reduction": float((lr.loc[(x, y)] + lr.loc[(y, x)]) / 2),
                          "separated": part.group_of(x) != part.group_of(y)})
        return {**record, "twins": twins, "twins_separated": all(t["separated"] for t in twins)}

    # --------------------------------------------------------------------------------------- methods

    def methods(self, seed: int, groups: list[list[str]], proj: Projection) -> dict:
        a, names = self.a, self.s.names
        feats_npz = np.load(self.path(f"features_s{seed}.npz"))
        runs = {"all": json.loads(self.path(f"all_s{seed}.json").read_text())["run"]}
        boosts, group_of = {}, {}
        settings = BoostSettings(mode=a.boost_mode, rounds=a.boost_rounds, eta=a.eta, threshold=a.boost_threshold,
                                 ridge_lam=a.ridge_lam, train_epochs=a.boost_epochs,
                                 train_max_steps=a.boost_max_steps)
        for i, g in enumerate(groups):
            gname = f"g{i}_s{seed}"
            runs[gname] = self.train(gname, g, seed)
            group_of.update({n: gname for n in g})
            ridge = RidgeBase(self.theta0(seed), proj, {n: feats_npz[f"train/{n}/G"] for n in g}, r=self.cfg.r)
            bpath = self.path(f"boost_{gname}.json")
            if bpath.exists():
                boosts[gname] = BoostResult.from_dict(json.loads(bpath.read_text()))
            else:
                boosts[gname] = boost_group(self.model, self.tok, gname, self.path("adapters", gname),
                                            self.s.of("train", g), self.s.of("select", g), settings,
                                            self.path("adapters", f"boost_{gname}"), ridge=ridge, config=self.config(seed),
                                            **self.kw)
                bpath.write_text(json.dumps(boosts[gname].to_dict(), default=_jsonable))
        z_all = self.logits(f"all_s{seed}", names)
        z_base = self.logits(None, names, splits=("test",))
        zg, h = {}, {}  # per dataset: its group adapter's logits, its group's kept rounds' h_r
        for i, g in enumerate(groups):
            gname = f"g{i}_s{seed}"
            z = self.logits(gname, g)
            hw, ht = (round_logits(self.model, self.tok, boosts[gname], self.s.of(sp, g), **self.kw)
                      for sp in ("weights", "test"))
            for n in g:
                zg[n] = {sp: z[sp][n] for sp in ("weights", "test")}
                h[n] = [{"weights": a_[n], "test": b_[n]} for a_, b_ in zip(hw, ht)]
        rows = []
        for n in names:
            gname = group_of[n]
            rounds = h[n]
            y = {"weights": np.array([e.label_index for e in self.s.weights[n]]),
                 "test": np.array([e.label_index for e in self.s.test[n]])}
            out = score_dataset(zg[n], rounds, boosts[gname].step_sizes, y,
                                all_adapter={sp: z_all[sp][n] for sp in ("weights", "test")}, include_all=True)
            out["accuracy"]["zero_shot"] = float((z_base["test"][n].argmax(-1) == y["test"]).mean())
            rows.append({"dataset": n, "group": gname, "n_rounds": len(rounds), **out})
        costs = method_costs([runs[f"g{i}_s{seed}"] for i in range(len(groups))], list(boosts.values()),
                             runs["all"])
        return {"seed": seed, "rows": rows, "runs": runs, "boosting": {k: v.to_dict() for k, v in boosts.items()},
                "costs": costs}


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data", type=Path, default=None, help="a pack with twins (or any pack + --pairs); default "
                                                           "data/twins, built from the registry archives")
    p.add_argument("--pairs", nargs="+", default=None, help="datasets to pair with a twin (default: every twin)")
    p.add_argument("--work", type=Path, default=ROOT / "var" / "positive_control")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--render", action="store_true", help="only draw the heatmap PNG of an existing --out JSON")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    add_recipe_args(p)
    p.add_argument("--weights-share", type=float, default=0.5, help="share of validation in the weights fold")
    p.add_argument("--theta0", choices=["fresh_lora", "meta_init"], default="meta_init")
    p.add_argument("--lam", type=float, default=None, help="pin λ (else calibrated on --n-calibration subsets)")
    p.add_argument("--lam-grid", type=lambda s: tuple(float(x) for x in s.split(",")), default=LAM_GRID)
    p.add_argument("--n-calibration", type=int, default=2, help="random subsets really fine-tuned to choose λ")
    p.add_argument("--subset-size", type=int, default=3)
    p.add_argument("--n-random", type=int, default=300)
    p.add_argument("--max-m", type=int, default=4)
    p.add_argument("--boost-mode", choices=["ridge", "trained"], default="ridge")
    p.add_argument("--boost-rounds", type=int, default=3)
    p.add_argument("--eta", type=float, default=0.5)
    p.add_argument("--boost-threshold", type=float, default=0.2)
    p.add_argument("--ridge-lam", type=float, default=0.1)
    p.add_argument("--boost-epochs", type=int, default=1)
    p.add_argument("--boost-max-steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="data sampling and fold seed")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy small CPU)")
    a = p.parse_args(argv)
    if a.lam is None and a.n_calibration < 1:
        p.error("--n-calibration must be >= 1 unless --lam pins λ")
    return a


def summarize(res: dict) -> dict:
    """The headline numbers over seeds: mean ± std of each method, ensemble − all, FLOPs ratio, separation."""
    seeds = [s for s in res["seeds"] if f"methods_s{s}" in res]
    per = {m: {} for m in METHODS}
    diffs, ratios, ratios_feat, ratios_all = [], [], [], []
    for s in seeds:
        rows = res[f"methods_s{s}"]["rows"]
        for m in METHODS:
            for r in rows:
                per[m].setdefault(r["dataset"], []).append(r["accuracy"].get(m, float("nan")))
        mean = {m: float(np.mean([r["accuracy"][m] for r in rows])) for m in METHODS}
        diffs.append(mean["ensemble"] - mean["one_adapter_all"])
        c = res[f"methods_s{s}"]["costs"]
        ratios.append(c["ensemble"]["flops"] / c["one_adapter_all"]["flops"])
        f = res[f"features_s{s}"]
        ratios_feat.append((c["ensemble"]["flops"] + f["flops"]) / c["one_adapter_all"]["flops"])
        cal = res[f"calibration_s{s}"]["flops"]  # the real fine-tunes that chose λ
        ratios_all.append((c["ensemble"]["flops"] + f["flops"] + cal) / c["one_adapter_all"]["flops"])
    table = {m: {d: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0}
                 for d, v in per[m].items()} for m in METHODS}
    means = {m: [float(np.mean([per[m][d][i] for d in per[m]])) for i in range(len(seeds))] for m in METHODS}
    twins = [t for s in seeds for t in res[f"affinity_s{s}"]["twins"]]
    return {
        "ensemble_minus_all_adapter": float(np.mean(diffs)) if diffs else float("nan"),
        "ensemble_minus_all_adapter_per_seed": diffs,
        "flops_ratio": float(np.mean(ratios)) if ratios else float("nan"),
        "flops_ratio_with_features": float(np.mean(ratios_feat)) if ratios_feat else float("nan"),
        "flops_ratio_with_features_and_calibration": float(np.mean(ratios_all)) if ratios_all else float("nan"),
        "twins_separated": bool(twins) and all(t["separated"] for t in twins),
        "twin_affinity_sym_max": max((t["affinity_sym"] for t in twins), default=float("nan")),
        "twin_pairwise_loss_reduction_max": max((t["pairwise_loss_reduction"] for t in twins), default=float("nan")),
        "accuracy": table,
        "mean_accuracy": {m: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                              "per_seed": v} for m, v in means.items()},
        "seeds_complete": seeds,
    }


def table(res: dict) -> str:
    """Markdown: mean test accuracy (± std over seeds) and training cost of each method."""
    seeds = res["seeds_complete"]
    costs = [res[f"methods_s{s}"]["costs"] for s in seeds]
    lines = ["| method | test accuracy | training TFLOPs | vs all | optimizer steps | adapters |",
             "| --- | --- | --- | --- | --- | --- |"]
    for m in METHODS:
        a = res["mean_accuracy"][m]
        fl = np.mean([c[m]["flops"] for c in costs]) / 1e12
        base = np.mean([c["one_adapter_all"]["flops"] for c in costs]) / 1e12
        lines.append(f"| {m} | {a['mean']:.3f} ± {a['std']:.3f} | {fl:.3g} | {fl / base:.2f}× | "
                     f"{np.mean([c[m]['steps'] for c in costs]):.0f} | {np.mean([c[m]['adapters'] for c in costs]):.1f} |")
    return "\n".join(lines)


def render(res: dict, png: Path) -> Path | None:
    try:
        from grouplora.ml.plots import affinity_heatmap
    except ImportError:  # matplotlib missing (the GPU machine): --render draws it later
        return None
    s = res["seeds"][0]
    aff = res[f"affinity_s{s}"]
    return affinity_heatmap(np.asarray(aff["T"]), aff["names"], np.asarray(aff["labels"]), path=png,
                            title=f"Positive control (seed {s}): mean est. −loss of target i over subsets with j")


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    dev_kind = args.device.split(":")[0]
    out = args.out or ROOT / "benchmarks" / "results" / f"positive_control_{dev_kind}.json"
    png = out.with_suffix(".png")
    if args.render:
        res = json.loads(out.read_text())
        print(f"wrote {render(res, png)}")
        return res
    args.work.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    t0 = time.perf_counter()
    model, tok = load_base_model(args.model, device=args.device)
    folder = prepare_pack(args)
    data, skipped = load_data(folder, tok, args)
    data = [d for d in data if d.name in args.only]
    missing = sorted(set(args.only) - {d.name for d in data})
    if missing:
        raise SystemExit(f"datasets unusable with this model's tokenizer or empty: {missing} ({skipped})")
    suite = Suite(data, args.weights_share, args.seed)
    print(f"{len(data)} datasets: {', '.join(suite.names)}; model loaded in {time.perf_counter() - t0:.1f} s",
          flush=True)
    cfg = TrainConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj"), lr=args.lr, epochs=args.epochs,
                      batch_size=args.batch_size, max_length=args.max_length, warmup_ratio=0.1)
    ch = Chain(model, tok, suite, cfg, args)
    res: dict = {"benchmark": "positive_control", "device": dev_kind, "machine": machine(args.device),
                 "model": args.model, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                 "data": str(folder), "n_datasets": len(suite.names), "datasets": suite.names,
                 "pairs": twin_pairs(suite.names), "seeds": args.seeds, "theta0": args.theta0,
                 "sizes": {n: {sp: len(getattr(suite, sp)[n]) for sp in ("train", "select", "weights", "test")}
                           for n in suite.names},
                 "train_config": {**cfg.__dict__, "target_modules": list(cfg.target_modules)}}
    for s in args.seeds:
        res[f"all_s{s}"] = ch.stage(f"all_s{s}", lambda s=s: {"run": ch.train(f"all_s{s}", suite.names, s)})
        feats = proj = None
        if not ch.path(f"methods_s{s}.json").exists():  # a finished seed needs neither features nor its adapters
            feats, proj, _ = ch.features(s)
        finfo = json.loads(ch.path(f"features_s{s}.json").read_text())
        n_base, n_lora = res[f"all_s{s}"]["run"]["n_base_params"], res[f"all_s{s}"]["run"]["n_lora_params"]
        # a feature pass is a forward + backward without weight gradients for the base: LoRA-training cost
        res[f"features_s{s}"] = {**finfo, "flops": lora_training_flops(n_base, n_lora, finfo["tokens"])}
        res[f"calibration_s{s}"] = ch.stage(f"calibration_s{s}", lambda s=s: ch.calibration(s, feats))
        lam = res[f"calibration_s{s}"]["calibration"]["lam"]
        res[f"affinity_s{s}"] = ch.stage(f"affinity_s{s}", lambda s=s: ch.affinity(s, feats, lam))
        groups = res[f"affinity_s{s}"]["groups"]
        res[f"methods_s{s}"] = ch.stage(f"methods_s{s}", lambda s=s: ch.methods(s, groups, proj))
        res.update(summarize(res))
        print(f"seed {s}: ensemble − all = {res['ensemble_minus_all_adapter_per_seed'][-1]:+.3f}, "
              f"FLOPs ratio {res['flops_ratio']:.3f}, twins separated {res['twins_separated']}", flush=True)
    res["eval_flops_note"] = ("flops_ratio = training FLOPs of the ensemble's adapters (groups + trained boosting "
                              "rounds) / the all-datasets adapter's; per-epoch validation passes (eval_flops) and "
                              "the calibration fine-tunes are reported apart; flops_ratio_with_features adds the "
                              "gradient-feature pass at θ0 (counted as 4·N·T + 6·N_lora·T), "
                              "flops_ratio_with_features_and_calibration also the fine-tunes that chose λ.")
    res["total_seconds"] = time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=_jsonable) + "\n")
    res["heatmap"] = str(render(res, png))
    print(table(res))
    print(json.dumps({k: res[k] for k in ("ensemble_minus_all_adapter", "flops_ratio", "flops_ratio_with_features",
                                          "flops_ratio_with_features_and_calibration", "twins_separated",
                                          "n_datasets", "seeds")}, default=_jsonable))
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    main()
