"""The papers' headline experiments on a real suite, in one resumable process (issues 7 and 8).

Stages, in the order they run (each writes <work>/<stage>.json; trained adapters and their logits are cached
under <work>, so a rerun — e.g. after a time limit — resumes where it stopped):

  zero_shot     base model test accuracy per dataset
  all_s<seed>   one LoRA adapter on all datasets (seed 0 is also the meta-initialization θ*)
  features      projected gradient features of every train + val example at θ* (A and B gradients)
  affinity      GradEx estimates of singletons, pairs and random subsets → subset_affinity (the pipeline's SQL
                model, run by DuckDB) → symmetrized affinity → number of groups and SDP partition
  choice        per target: GradEx auxiliary selection (random ensemble, forward stepwise) and the baselines'
                choices (none, all, gradient cosine, hidden-state cosine)
  then per seed (all_s<k> for k > 0):
  methods_s<k>  one adapter per dataset, grouped adapters, boosting adapters, QLoRA on all, the ensemble;
                test accuracy per dataset and method, training FLOPs and peak memory
  selection_s<k> each target + each method's auxiliaries fine-tuned; the target's test accuracy
  fidelity      (after the first seed) estimates vs real fine-tuning from θ* on random subsets (λ chosen on
                calibration subsets)
  approx        first-order approximation error against perturbation scale, at fresh LoRA and at θ*

    python benchmarks/suite.py --model tiny --preset demo --work var/suite-smoke --max-train 8 --max-val 4 \\
        --max-test 8 --seeds 0 --n-random 20 --n-fidelity 8 --n-calibration 1 --targets rotten_tomatoes
    python benchmarks/suite.py --device cuda --data data/full --work /root/work   # the GPU run (see README)

Writes --out (default benchmarks/results/suite_<device>.json); `python benchmarks/report.py` renders it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from estimation_fidelity import (ROOT, Data, _jsonable, change_spearman, data_folder, estimates, extract,  # noqa: E402
                                 finetune, lam_search, load_data, machine, metrics, pair_table, restored_grads,
                                 zero_shot)

from grouplora.ml.approx import SCALES, approximation_errors  # noqa: E402
from grouplora.ml.boosting import train_boost_adapter  # noqa: E402
from grouplora.ml.clustering import affinity_matrix_from, choose_m, sdp_cluster, symmetrize  # noqa: E402
from grouplora.ml.ensemble import dataset_methods  # noqa: E402
from grouplora.ml.estimation import FeatureSet, Split, score, solve_subsets  # noqa: E402
from grouplora.ml.lora import add_lora, load_adapter  # noqa: E402
from grouplora.ml.model import load_base_model  # noqa: E402
from grouplora.ml.scoring import predict_logprobs  # noqa: E402
from grouplora.ml.selection import mean_hidden_state, select_auxiliaries  # noqa: E402
from grouplora.ml.subsets import make_subsets  # noqa: E402
from grouplora.ml.training import TrainConfig, TrainExample, evaluate, train_adapter  # noqa: E402

SQL = ROOT / "dbt_like_sql" / "models"


# -------------------------------------------------------------------------------------------- plumbing


class Work:
    """The resumable state: stage JSONs, adapters, cached logits, timings."""

    def __init__(self, root: Path, budget_s: float | None):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.t0 = time.time()
        self.budget_s = budget_s

    def path(self, *parts: str) -> Path:
        p = self.root.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def stage(self, name: str, fn: Callable[[], dict]) -> dict:
        p = self.path(f"{name}.json")
        if p.exists():
            return json.loads(p.read_text())
        if self.budget_s is not None and time.time() - self.t0 > self.budget_s:
            raise TimeoutError(f"time budget spent before stage {name}: rerun to resume")
        t = time.time()
        print(f"== {name}", flush=True)
        out = fn()
        out["stage_seconds"] = time.time() - t
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=1, default=_jsonable))
        tmp.replace(p)
        print(f"== {name} done in {out['stage_seconds']:.1f} s", flush=True)
        return out


def examples_of(data: Sequence[Data]) -> list[TrainExample]:
    return [TrainExample(p, int(y), tuple(d.label_ids)) for d in data for p, y in zip(d.train["prompt"], d.train["label_id"])]


def set_key(members: Sequence[str]) -> str:
    return hashlib.sha256("|".join(sorted(members)).encode()).hexdigest()[:10]


class Runner:
    """Trains and scores adapters on one base, caching both under the work folder."""

    def __init__(self, model, tok, data: list[Data], cfg: TrainConfig, args, work: Work):
        self.model, self.tok, self.data, self.cfg, self.args, self.work = model, tok, data, cfg, args, work
        self.by_name = {d.name: d for d in data}
        self._qlora = None

    def config(self, seed: int, **kw) -> TrainConfig:
        return TrainConfig(**{**self.cfg.__dict__, "seed": seed, **kw})

    def base(self, qlora: bool):
        if not qlora:
            return self.model, self.tok
        if self._qlora is None:
            self._qlora = load_base_model(self.args.model, device=self.args.device, load_in_4bit=True)
        return self._qlora

    def train(self, name: str, members: Sequence[str], seed: int, *, qlora: bool = False,
              init_adapter: Path | None = None, weights: np.ndarray | None = None) -> dict:
        """train_adapter (cached by the folder: a finished run returns at once); its TrainResult as a dict."""
        out = self.work.path("adapters", name)
        ex = examples_of([self.by_name[m] for m in members])
        cfg = self.config(seed, qlora=qlora)
        base = self.base(qlora)
        if weights is None:
            res = train_adapter(base, ex, cfg, out, init_adapter=init_adapter)
        else:
            res = train_boost_adapter(base, ex, weights, cfg, out)
        print(f"  {name}: {res.steps} steps {res.seconds:.1f} s, loss {res.final_loss:.3f}", flush=True)
        return {"members": list(members), "seed": seed, "qlora": qlora, **res.to_dict()}

    def logits(self, name: str, datasets: Sequence[str], qlora: bool = False) -> dict[str, dict[str, np.ndarray]]:
        """{dataset: {val, test}} label log-probs of adapter `name` ("base": no adapter), cached as .npz."""
        cache = self.work.path("logits", f"{name}.npz")
        have = dict(np.load(cache)) if cache.exists() else {}
        need = [d for d in datasets if f"{d}/test" not in have]
        if need:
            model, tok = self.base(qlora)
            with restored_grads(model):
                pm = load_adapter(model, self.work.path("adapters", name)).eval() if name != "base" else model
                try:
                    for d in need:
                        ds = self.by_name[d]
                        for split, frame in (("val", ds.val), ("test", ds.test)):
                            have[f"{d}/{split}"] = predict_logprobs(
                                pm, tok, frame["prompt"].tolist(), ds.label_ids,
                                batch_size=self.args.eval_batch_size, max_length=self.args.max_length)
                finally:
                    if name != "base":
                        pm.unload()
            tmp = cache.with_suffix(".tmp.npz")
            np.savez(tmp, **have)
            tmp.replace(cache)
        return {d: {"val": have[f"{d}/val"], "test": have[f"{d}/test"]} for d in datasets}

    def accuracy(self, name: str, dataset: str, qlora: bool = False) -> float:
        lp = self.logits(name, [dataset], qlora)[dataset]["test"]
        return float((lp.argmax(-1) == self.by_name[dataset].test["label_id"].to_numpy()).mean())


# ---------------------------------------------------------------------------------------------- stages


def stage_zero_shot(r: Runner) -> dict:
    return {"accuracy": {d.name: r.accuracy("base", d.name) for d in r.data}}


def stage_all(r: Runner, seed: int) -> dict:
    names = [d.name for d in r.data]
    run = r.train(f"all_s{seed}", names, seed)
    return {"run": run, "accuracy": {n: r.accuracy(f"all_s{seed}", n) for n in names}}


def stage_features(r: Runner, meta: Path) -> dict:
    feats, secs = extract(r.model, r.tok, r.data, r.config(0), r.args, init_adapter=meta)
    arrays = {f"{sp}/{n}/{k}": getattr(s, k) for sp, dd in (("train", feats.train), ("val", feats.val))
              for n, s in dd.items() for k in ("f0", "G")}
    np.savez(r.work.path("features_meta.npz"), **arrays)
    n = sum(s.n for s in feats.train.values()) + sum(s.n for s in feats.val.values())
    return {"seconds": secs, "examples": n, "examples_per_s": n / secs, "d": feats.d}


def load_features(work: Work) -> FeatureSet:
    z = np.load(work.path("features_meta.npz"))
    parts: dict[str, dict[str, dict[str, np.ndarray]]] = {"train": {}, "val": {}}
    for key in z.files:
        sp, n, k = key.split("/")
        parts[sp].setdefault(n, {})[k] = z[key]
    return FeatureSet({n: Split(v["f0"], v["G"]) for n, v in parts["train"].items()},
                      {n: Split(v["f0"], v["G"]) for n, v in parts["val"].items()})


def stage_affinity(r: Runner, feats: FeatureSet) -> dict:
    """The pipeline's estimation → SQL affinity → partition path, on the meta-initialization's features."""
    import duckdb
    a = r.args
    subsets = make_subsets(list(feats.names), n_random=a.n_random, size=3, seed=0)
    t = time.perf_counter()
    fit = solve_subsets(feats, subsets, lam=a.lam)
    est = score(feats, subsets, fit.W)
    est_s = time.perf_counter() - t
    est["mode"] = "linearized"
    con = duckdb.connect()
    con.register("subset_estimates", est)
    table = con.sql((SQL / "subset_affinity.sql").read_text()).df()
    T, names = affinity_matrix_from(table.rename(columns={"affinity_neg_loss": "value"})[["target", "source", "value"]])
    A = symmetrize(T, normalize="row_zscore")
    m, m_scores = choose_m(A, range(2, a.max_m + 1), clusterer="sdp", seed=0)
    res = sdp_cluster(A, m, seed=0)
    groups = [[names[i] for i in np.flatnonzero(res.labels == g)] for g in range(m)]
    print("  groups: " + " | ".join(", ".join(g) for g in groups), flush=True)
    return {"names": names, "T": T, "labels": res.labels, "m": int(m), "groups": groups,
            "m_scores": m_scores.to_dict(orient="records"), "n_subsets": len(subsets), "estimate_seconds": est_s,
            "converged": bool(fit.converged.all()), "lam": a.lam}


def stage_fidelity(r: Runner, feats: FeatureSet, meta: Path) -> dict:
    a = r.args
    subsets = make_subsets(list(feats.names), n_random=a.n_fidelity + a.n_calibration, size=3, seed=1,
                           include_singletons=False, include_pairs=False)
    cal, ev = subsets[:a.n_calibration], subsets[a.n_calibration:]
    runs = {}
    tmp = r.work.path("fidelity_adapters")
    cfg = r.config(0)
    for i, s in enumerate(subsets):
        runs[s.id] = finetune(r.model, r.tok, r.by_name, s, cfg, a, tmp, init_adapter=meta)
        print(f"  [{i + 1}/{len(subsets)}] {','.join(s.members)} {runs[s.id]['train_s']:.1f} s", flush=True)
    zs = zero_shot(feats)
    lam, lam_table = lam_search(feats, cal, ev, runs, zs, (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0))
    estimates(feats, ev, lam)  # warm-up
    est, est_s, conv = estimates(feats, ev, lam)
    pairs = pair_table(est, runs, zs, ev)
    ft = sum(runs[s.id]["train_s"] for s in ev)
    feat_s = json.loads(r.work.path("features.json").read_text())["seconds"]
    return {"lam": lam, "lam_table": lam_table, **metrics(pairs), "spearman_loss_change": change_spearman(pairs),
            "zero_shot_baseline": metrics(pairs, "zero_shot"), "pairs": pairs.to_dict(orient="records"),
            "n_subsets": len(ev), "finetune_s": ft, "extract_s": feat_s, "estimate_s": est_s,
            "speedup": ft / (feat_s + est_s), "converged": conv,
            "theta0": "meta-initialization (one adapter on all datasets, seed 0); real fine-tunes start from it"}


def stage_methods(r: Runner, seed: int, groups: list[list[str]]) -> dict:
    """One seed of: per-dataset adapters, grouped, + boosting, QLoRA on all, and the ensemble."""
    a, names = r.args, [d.name for d in r.data]
    runs = {"all": json.loads(r.work.path(f"all_s{seed}.json").read_text())["run"]}
    runs["all_qlora"] = r.train(f"all_qlora_s{seed}", names, seed, qlora=True)
    for n in names:
        runs[f"single_{n}"] = r.train(f"ds_{n}_s{seed}", [n], seed)
    boosted = {}
    for i, g in enumerate(groups):
        gname = f"g{set_key(g)}_s{seed}"
        runs[f"group_{i}"] = r.train(gname, g, seed)
        if runs[f"group_{i}"]["final_loss"] > a.boost_threshold:
            # the group adapter's current loss on its own train examples weights the boosting adapter's data
            with restored_grads(r.model):
                pm = load_adapter(r.model, r.work.path("adapters", gname)).eval()
                try:
                    loss, _ = evaluate(pm, r.tok, examples_of([r.by_name[m] for m in g]),
                                       batch_size=a.eval_batch_size, max_length=a.max_length)
                finally:
                    pm.unload()
            runs[f"boost_{i}"] = r.train(f"boost_{gname}", g, seed, weights=loss)
            boosted[i] = f"boost_{gname}"
    rows, kept = [], {}
    for i, g in enumerate(groups):
        gname = f"g{set_key(g)}_s{seed}"
        adapters = [gname, f"all_s{seed}"] + ([boosted[i]] if i in boosted else [])
        z = [r.logits(x, g) for x in adapters]
        for n in g:
            ds = r.by_name[n]
            zv = np.stack([zz[n]["val"] for zz in z])
            zt = np.stack([zz[n]["test"] for zz in z])
            row, alpha, keep = dataset_methods(zv, ds.val["label_id"].to_numpy(), zt, ds.test["label_id"].to_numpy(),
                                               boosted=i in boosted)
            kept[n] = keep
            rows.append({"dataset": n, "group": i, **row, "one_adapter_all_qlora": r.accuracy(f"all_qlora_s{seed}", n, True),
                         "one_per_dataset": r.accuracy(f"ds_{n}_s{seed}", n), "weights": alpha.tolist()})
    return {"seed": seed, "rows": rows, "boost_kept": kept, "boosted_groups": sorted(boosted), "runs": runs}


def stage_choose(r: Runner, feats: FeatureSet, targets: list[str]) -> dict:
    """GradEx selection and the baselines' choices for every target (no training)."""
    a = r.args
    hidden = {}
    for d in r.data:
        prompts = d.train["prompt"].tolist()[: a.hidden_examples]
        hidden[d.name] = mean_hidden_state(r.model, r.tok, prompts, batch_size=a.eval_batch_size,
                                           max_length=a.max_length)
    out = {}
    for target in targets:
        t = time.perf_counter()
        sel = select_auxiliaries(feats, target, hidden=hidden, top_k=a.top_k, n_subsets=a.n_select, lam=a.lam)
        est = dict(zip(sel.methods["method"], sel.methods["est_loss"].astype(float)))
        out[target] = {"chosen": sel.chosen, "est_loss": est, "table": sel.table().to_dict(orient="records"),
                       "forward_path": sel.forward_path.to_dict(orient="records"), "settings": sel.settings,
                       "select_seconds": time.perf_counter() - t}
        print(f"  {target}: " + "; ".join(f"{m}: {','.join(v) if len(v) < 5 else 'all'}"
                                          for m, v in sel.chosen.items()), flush=True)
    return {"targets": out}


def stage_selection(r: Runner, choice: dict, seed: int) -> dict:
    """Fine-tune target + each method's auxiliaries with one seed; the target's test accuracy."""
    all_names = sorted(r.by_name)
    acc: dict[str, dict[str, float]] = {}
    for target, c in choice["targets"].items():
        for method, aux in c["chosen"].items():
            members = sorted({target, *aux})
            name = (f"ds_{target}_s{seed}" if members == [target] else f"all_s{seed}" if members == all_names
                    else f"sel_{set_key(members)}_s{seed}")
            r.train(name, members, seed)
            acc.setdefault(target, {})[method] = r.accuracy(name, target)
        print(f"  {target} seed {seed}: " + ", ".join(f"{m} {v:.3f}" for m, v in acc[target].items()), flush=True)
    return {"seed": seed, "accuracy": acc}


def stage_approx(r: Runner, meta: Path) -> dict:
    out = {}
    for label, init in (("fresh_lora", None), ("meta_init", meta)):
        rows = []
        with restored_grads(r.model):
            cfg = r.cfg
            pm = (add_lora(r.model, r=cfg.r, alpha=cfg.alpha, target_modules=cfg.target_modules, seed=0)
                  if init is None else load_adapter(r.model, init))
            try:
                for d in r.data[: r.args.approx_datasets]:
                    v = d.val.head(r.args.approx_examples)
                    for row in approximation_errors(pm, r.tok, v["prompt"].tolist(), v["label_id"].tolist(),
                                                    d.label_ids, scales=SCALES, n_draws=2, seed=0,
                                                    max_length=r.args.max_length):
                        rows.append({"dataset": d.name, **row})
            finally:
                pm.unload()
        out[label] = rows
    return out


# ------------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default="full", choices=["demo", "full"])
    src.add_argument("--data", type=Path, default=None)
    p.add_argument("--work", type=Path, default=ROOT / "var" / "suite")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--max-train", dest="max_train_per_dataset", type=int, default=300)
    p.add_argument("--max-val", dest="max_val_per_dataset", type=int, default=100)
    p.add_argument("--max-test", dest="max_test_per_dataset", type=int, default=300)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--targets", nargs="+", default=["tweet_sentiment", "vitaminc", "presuppositions_nli"])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=160)
    p.add_argument("--feature-batch-size", type=int, default=32)
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--d", type=int, default=200)
    p.add_argument("--lam", type=float, default=1e-3)
    p.add_argument("--n-random", type=int, default=300, help="random size-3 subsets for the affinity")
    p.add_argument("--max-m", type=int, default=4)
    p.add_argument("--n-fidelity", type=int, default=10)
    p.add_argument("--n-calibration", type=int, default=2)
    p.add_argument("--boost-threshold", type=float, default=0.2)
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--n-select", type=int, default=200)
    p.add_argument("--hidden-examples", type=int, default=64)
    p.add_argument("--approx-datasets", type=int, default=4)
    p.add_argument("--approx-examples", type=int, default=4)
    p.add_argument("--budget-s", type=float, default=None, help="start no new stage after this many seconds")
    p.add_argument("--seed", type=int, default=0, help="data sampling seed")
    a = p.parse_args(argv)
    return a


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    work = Work(args.work, args.budget_s)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # fp32 weights, TF32 matmuls
    t = time.perf_counter()
    model, tok = load_base_model(args.model, device=args.device)
    load_s = time.perf_counter() - t
    folder = data_folder(args)
    data, skipped = load_data(folder, tok, args)
    names = [d.name for d in data]
    print(f"{len(data)} datasets ({len(skipped)} skipped), model loaded in {load_s:.1f} s", flush=True)
    cfg = TrainConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj"), lr=args.lr, epochs=args.epochs,
                      batch_size=args.batch_size, max_length=args.max_length, warmup_ratio=0.1)
    r = Runner(model, tok, data, cfg, args, work)
    meta = work.path("adapters", "all_s0")
    targets = [x for x in args.targets if x in names]
    if len(targets) < len(args.targets):
        print(f"targets not in the suite, left out: {sorted(set(args.targets) - set(targets))}", flush=True)

    res: dict = {"benchmark": "suite", "device": args.device.split(":")[0], "machine": machine(args.device),
                 "model": args.model, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                 "sizes": {d.name: {"train": len(d.train), "val": len(d.val), "test": len(d.test)} for d in data},
                 "skipped": skipped, "train_config": {**cfg.__dict__, "target_modules": list(cfg.target_modules)}}
    try:
        res["zero_shot"] = work.stage("zero_shot", lambda: stage_zero_shot(r))
        res["all_s0"] = work.stage("all_s0", lambda: stage_all(r, 0))
        res["features"] = work.stage("features", lambda: stage_features(r, meta))
        feats = load_features(work)
        res["affinity"] = work.stage("affinity", lambda: stage_affinity(r, feats))
        groups = res["affinity"]["groups"]
        choice = res["choice"] = work.stage("choice", lambda: stage_choose(r, feats, targets))
        for s in args.seeds:  # seed by seed, so a cut-short run still has whole seeds of everything
            if s != 0:
                res[f"all_s{s}"] = work.stage(f"all_s{s}", lambda s=s: stage_all(r, s))
            res[f"methods_s{s}"] = work.stage(f"methods_s{s}", lambda s=s: stage_methods(r, s, groups))
            res[f"selection_s{s}"] = work.stage(f"selection_s{s}", lambda s=s: stage_selection(r, choice, s))
            if s == args.seeds[0]:
                res["fidelity"] = work.stage("fidelity", lambda: stage_fidelity(r, feats, meta))
        res["approx"] = work.stage("approx", lambda: stage_approx(r, meta))
        res["complete"] = True
    except TimeoutError as e:
        print(str(e), flush=True)
        res["complete"] = False
    out = args.out or ROOT / "benchmarks" / "results" / f"suite_{res['device']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=_jsonable) + "\n")
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    main()
