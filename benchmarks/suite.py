"""The papers' headline experiments on a real suite, in one resumable process (issues 7 and 8).

Stages, in the order they run (each writes <work>/<stage>.json; trained adapters and their logits are cached
under <work>, so a rerun — e.g. after a time limit — resumes where it stopped):

  zero_shot     base model test accuracy per dataset
  all_s<seed>   one LoRA adapter on all datasets (seed 0 is also the meta-initialization θ*)
  features      projected gradient features at θ* (A and B gradients) of every train + selection-fold example
  calibration   λ: a few random subsets really fine-tuned from θ*, the estimator's error per λ (ml.calibration)
  affinity      GradEx estimates (at the calibrated λ) of singletons, pairs and random subsets → subset_affinity
                (the pipeline's SQL model, run by DuckDB; it averages the random subsets) → symmetrized affinity
                → number of groups and SDP partition
  choice        per target: GradEx auxiliary selection (random ensemble, forward stepwise) and the baselines'
                choices (none, all, gradient cosine, hidden-state cosine)
  then per seed (all_s<k> for k > 0):
  methods_s<k>  one adapter per dataset, grouped adapters, boosting rounds (ml.boosting), QLoRA on all, the ACL
                ensemble (ml.ensemble.score_dataset); test accuracy per dataset and method, training FLOPs,
                optimizer steps and peak memory
  selection_s<k> each target + each method's auxiliaries fine-tuned; the target's test accuracy
  truth_s<k>    (after the first seed) the calibration subsets and --n-fidelity further random ones really
                fine-tuned from θ* with training seed k (--truth-seeds), scored on selection fold and test split
  features_test features at θ* of the test examples (the same projection as the features stage)
  fidelity      estimates at the calibrated λ vs the truth: the mean over the seeds on the test split (and, for
                comparison, each seed alone and the selection fold); the seeds against each other
  approx        first-order approximation error against perturbation scale, at fresh LoRA and at θ*
  stability     the affinity stage on --n-bootstrap resamples of its random subsets: adjusted Rand index of each
                partition vs the affinity stage's, with m re-chosen and with m fixed (no training: CPU is enough)

Validation is split once per dataset (ml.folds): the selection fold chooses checkpoints (best epoch), λ, the
partition and boosting rounds; the weights fold fits the ensemble weights only; test is only reported.

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
from math import comb
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chain import Work, add_recipe_args, affinity_stage  # noqa: E402
from estimation_fidelity import (ROOT, Data, _jsonable, change_spearman, data_folder, extract,  # noqa: E402
                                 load_data, machine, metrics, pair_table, restored_grads, split_folds,
                                 zero_shot)

from grouplora.ml.approx import SCALES, approximation_errors  # noqa: E402
from grouplora.ml.boosting import BoostResult, BoostSettings, RidgeBase, boost_group, round_logits  # noqa: E402
from grouplora.ml.clustering import adjusted_rand_index  # noqa: E402
from grouplora.ml.calibration import (LAM_GRID, calibrate_by_finetuning, calibration_subsets, ce_summary,  # noqa: E402
                                      choose_lam, error_table, finetune_subset, mean_truth, seed_spread)
from grouplora.ml.ensemble import score_dataset  # noqa: E402
from grouplora.ml.estimation import FeatureSet, Split, score, solve_subsets  # noqa: E402
from grouplora.ml.lora import add_lora, load_adapter  # noqa: E402
from grouplora.ml.projection import Projection  # noqa: E402
from grouplora.ml.model import load_base_model  # noqa: E402
from grouplora.ml.scoring import predict_logprobs  # noqa: E402
from grouplora.ml.selection import mean_hidden_state, select_auxiliaries  # noqa: E402
from grouplora.ml.subsets import Subset, make_subsets  # noqa: E402
from grouplora.ml.training import TrainConfig, TrainExample, train_adapter  # noqa: E402


# -------------------------------------------------------------------------------------------- plumbing


def examples_of(data: Sequence[Data], split: str = "train") -> list[TrainExample]:
    return [TrainExample(p, int(y), tuple(d.label_ids)) for d in data
            for p, y in zip(getattr(d, split)["prompt"], getattr(d, split)["label_id"])]


def by_dataset(data: Sequence[Data], split: str) -> dict[str, list[TrainExample]]:
    return {d.name: examples_of([d], split) for d in data}


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
              init_adapter: Path | None = None) -> dict:
        """train_adapter (cached by the folder: a finished run returns at once), the kept epoch chosen on the
        members' selection fold; its TrainResult as a dict."""
        out = self.work.path("adapters", name)
        data = [self.by_name[m] for m in members]
        res = train_adapter(self.base(qlora), examples_of(data), self.config(seed, qlora=qlora), out,
                            init_adapter=init_adapter, val_examples=examples_of(data, "select"),
                            eval_batch_size=self.args.eval_batch_size)
        print(f"  {name}: {res.steps} steps {res.seconds:.1f} s, loss {res.final_loss:.3f}, best epoch "
              f"{res.best_epoch}/{res.epochs}", flush=True)
        return {"members": list(members), "seed": seed, "qlora": qlora, **res.to_dict()}

    def logits(self, name: str, datasets: Sequence[str], qlora: bool = False) -> dict[str, dict[str, np.ndarray]]:
        """{dataset: {weights, test}} label log-probs of adapter `name` ("base": no adapter), cached as .npz."""
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
                        for split, frame in (("weights", ds.weights), ("test", ds.test)):
                            have[f"{d}/{split}"] = predict_logprobs(
                                pm, tok, frame["prompt"].tolist(), ds.label_ids,
                                batch_size=self.args.eval_batch_size, max_length=self.args.max_length)
                finally:
                    if name != "base":
                        pm.unload()
            tmp = cache.with_suffix(".tmp.npz")
            np.savez(tmp, **have)
            tmp.replace(cache)
        return {d: {"weights": have[f"{d}/weights"], "test": have[f"{d}/test"]} for d in datasets}

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
    feats, secs = extract(r.model, r.tok, r.data, r.config(0), r.args, init_adapter=meta, val_split="select")
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


def stage_calibration(r: Runner, feats: FeatureSet, meta: Path) -> dict:
    """λ against real fine-tunes from θ* of a few random subsets (ml.calibration), or --lam when pinned."""
    a = r.args
    # truth on the selection fold: the rows the features' validation side was taken on (val_split="select")
    cal, runs = calibrate_by_finetuning(r.model, r.tok, feats, by_dataset(r.data, "train"),
                                        by_dataset(r.data, "select"), r.config(0), r.work.path("fidelity_adapters"),
                                        theta0="meta_init", init_adapter=meta, n_subsets=a.n_calibration, size=3,
                                        seed=1, grid=a.lam_grid, pinned_lam=a.lam, eval_batch_size=a.eval_batch_size,
                                        log=lambda m: print(f"  {m}", flush=True))
    print(f"  λ = {cal.lam:g} ({cal.source})", flush=True)
    return {**cal.to_dict(), "runs": runs, "at_lam": cal.at_lam()}


def stage_affinity(r: Runner, feats: FeatureSet, lam: float) -> dict:
    """The pipeline's estimation → SQL affinity → partition path (chain.affinity_stage), on the
    meta-initialization's features."""
    a = r.args
    record, _, _ = affinity_stage(feats, lam=lam, n_random=a.n_random, size=a.subset_size, seed=0, max_m=a.max_m)
    return record


def _labels_by_name(rec: dict, names: list[str]) -> list[int]:
    """rec's group labels in the order of `names`; a dataset no drawn subset contains (few subsets) is a group of
    its own, so it counts against the agreement."""
    got = dict(zip(rec["names"], rec["labels"]))
    return [got[n] if n in got else rec["m"] + i for i, n in enumerate(names)]


def stage_stability(r: Runner, feats: FeatureSet, committed: dict) -> dict:
    """The partition's stability (issue 13): the affinity stage's path (chain.affinity_stage) on B bootstrap draws
    of its random subsets, each partition compared with the committed one by the adjusted Rand index, with m
    re-chosen (what a rerun of the pipeline would do) and with m fixed to the committed m (the grouping alone)."""
    a, lam, m0 = r.args, committed["lam"], committed["m"]
    ref = np.asarray(committed["labels"])
    kw = dict(lam=lam, n_random=a.n_random, size=a.subset_size, seed=0, max_m=a.max_m)
    again, _, _ = affinity_stage(feats, **kw)  # no resampling: does this machine reproduce the committed partition?
    draws = []
    for b in range(a.n_bootstrap):
        row = {"draw": b}
        for label, m in (("rechosen", 0), ("fixed", m0)):
            rec, _, _ = affinity_stage(feats, **kw, m=m, resample=1000 + b)
            row[label] = {"ari": adjusted_rand_index(ref, _labels_by_name(rec, committed["names"])), "m": rec["m"],
                          "groups": rec["groups"], "missing": sorted(set(committed["names"]) - set(rec["names"]))}
        draws.append(row)
        print(f"  [{b + 1}/{a.n_bootstrap}] ARI m re-chosen {row['rechosen']['ari']:.3f} (m = {row['rechosen']['m']}),"
              f" m = {m0} fixed {row['fixed']['ari']:.3f}", flush=True)
    names = committed["names"]
    together = np.zeros((len(names), len(names)))  # how often each pair shares a group (m fixed)
    for d in draws:
        for g in d["fixed"]["groups"]:
            i = [names.index(x) for x in g]
            together[np.ix_(i, i)] += 1
    summary = {}
    for label in ("rechosen", "fixed"):
        x = np.array([d[label]["ari"] for d in draws])
        summary[label] = {"mean": float(x.mean()), "std": float(x.std(ddof=1)) if len(x) > 1 else 0.0,
                          "min": float(x.min()), "median": float(np.median(x)),
                          "share_identical": float((x > 1 - 1e-9).mean())}
    ms = [d["rechosen"]["m"] for d in draws]
    return {"n_bootstrap": a.n_bootstrap, "lam": lam, "m": m0, "n_random": a.n_random, "seed": 0,
            "resample_seeds": [1000 + b for b in range(a.n_bootstrap)],
            "reproduces_committed": adjusted_rand_index(ref, again["labels"]) > 1 - 1e-9,
            "ari_rechosen": summary["rechosen"], "ari_fixed_m": summary["fixed"],
            "m_counts": {str(k): ms.count(k) for k in sorted(set(ms))},
            "draws_missing_datasets": sum(bool(d["rechosen"]["missing"]) for d in draws),
            "together_fixed_m": (together / max(len(draws), 1)).tolist(), "names": names, "draws": draws,
            "device": a.device, "machine": machine(a.device)}


def fidelity_subsets(names: Sequence[str], args) -> tuple[list[Subset], list[Subset]]:
    """(the calibration stage's subsets, --n-fidelity further random triples): λ is chosen on the first only, the
    fidelity is reported on the second only."""
    names = sorted(names)
    cal = calibration_subsets(names, args.n_calibration, size=3, seed=1)
    taken = {s.id for s in cal}
    ev = [s for s in make_subsets(names, n_random=min(args.n_fidelity + len(taken), comb(len(names), 3)), size=3,
                                  seed=2, include_singletons=False, include_pairs=False) if s.id not in taken]
    return cal, ev[:args.n_fidelity]


def stage_truth(r: Runner, meta: Path, seed: int) -> dict:
    """The fidelity stage's truth for one training seed: every calibration and fidelity subset really fine-tuned
    from θ* (the recipe's run, no checkpoint choice), each member scored on its selection fold (the rows the
    features' validation side holds) and on its test split. Per-example cross-entropies go to truth_s<seed>.npz
    (keys <subset id>/<dataset>/<fold>), so other estimators can be judged later without a GPU."""
    cal, ev = fidelity_subsets(list(r.by_name), r.args)
    arrays, runs = {}, {}
    for i, s in enumerate([*cal, *ev]):
        data = [r.by_name[m] for m in s.members]
        res = finetune_subset(r.model, r.tok, s, by_dataset(data, "train"), by_dataset(data, "select"),
                              r.config(seed), r.work.path("truth_adapters", f"s{seed}", s.id), init_adapter=meta,
                              eval_batch_size=r.args.eval_batch_size, more_folds={"test": by_dataset(data, "test")})
        ce = res.pop("ce")
        ce["select"] = ce.pop("val")
        arrays.update({f"{s.id}/{m}/{fold}": c for fold, by in ce.items() for m, c in by.items()})
        runs[s.id] = {"members": list(s.members), **{k: v for k, v in res.items() if k != "true"},
                      "select": res["true"], "test": {m: ce_summary(c) for m, c in ce["test"].items()}}
        print(f"  seed {seed} [{i + 1}/{len(cal) + len(ev)}] {','.join(s.members)} {res['train_s']:.1f} s", flush=True)
    tmp = r.work.path(f"truth_s{seed}.tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(r.work.path(f"truth_s{seed}.npz"))
    return {"seed": seed, "runs": runs}


def stage_features_test(r: Runner, meta: Path, feats: FeatureSet) -> dict:
    """Features at θ* of every test example: the fidelity stage's larger fold (≈ 6x the selection fold). The
    train rows are taken again with them and must match the stored ones (same projection, same θ*)."""
    fresh, secs = extract(r.model, r.tok, r.data, r.config(0), r.args, init_adapter=meta, val_split="test")
    diff = max(float(np.abs(fresh.train[n].G - feats.train[n].G).max() / np.abs(feats.train[n].G).max())
               for n in feats.train)
    if diff > 0.05:
        raise RuntimeError(f"features_test: train features differ from features_meta.npz by {diff:.3g} (relative): "
                           "not the same θ* or projection")
    tmp = r.work.path("features_test.tmp.npz")
    np.savez(tmp, **{f"{n}/{k}": getattr(sp, k) for n, sp in fresh.val.items() for k in ("f0", "G")})
    tmp.replace(r.work.path("features_test.npz"))
    return {"seconds": secs, "examples": sum(sp.n for sp in fresh.val.values()), "train_relative_max_diff": diff}


def load_test_features(work: Work) -> dict[str, Split]:
    z = np.load(work.path("features_test.npz"))
    names = sorted({k.split("/")[0] for k in z.files})
    return {n: Split(z[f"{n}/f0"], z[f"{n}/G"]) for n in names}


def stage_fidelity(r: Runner, feats: FeatureSet, cal: dict, truths: dict[int, dict], test: dict[str, Split]) -> dict:
    """Estimates at the calibrated λ vs real fine-tunes from θ* of further random subsets (never used to choose λ).

    The truth is the mean over the training seeds (--truth-seeds) of the members' loss on their test split (the
    estimator never saw those rows; ≈ 300 per dataset). The same estimates are also judged on the selection fold
    and against each seed alone, and the seeds against each other (how fine any truth of one run can be)."""
    a = r.args
    cal_subsets, ev = fidelity_subsets(feats.names, a)
    folds = {"select": feats, "test": FeatureSet(feats.train, test)}
    seeds = sorted(truths)
    truth = {fold: {f"s{k}": {sid: run[fold] for sid, run in truths[k]["runs"].items()} for k in seeds}
             for fold in folds}
    for by in truth.values():
        by["mean"] = mean_truth([by[f"s{k}"] for k in seeds])
    lam = cal["lam"]  # the λ the affinity used: chosen on the calibration subsets only
    grid = sorted(set(cal["grid"]))
    roles = {"calibration": cal_subsets, "eval": ev}
    solve_subsets(feats, ev, lam=lam)  # warm-up: the timed fit below leaves out first-call overhead
    t0 = time.perf_counter()
    fit = solve_subsets(feats, ev, lam=lam)  # one fit: both folds share the train features
    est = {"select": score(feats, ev, fit.W)}
    est_s = time.perf_counter() - t0  # fit + score on the fold the affinity scores
    est["test"] = score(folds["test"], ev, fit.W)
    by_truth, noise, tables, pairs = {}, {}, {}, {}
    for fold, fs in folds.items():
        zs = zero_shot(fs)
        for ref, t in truth[fold].items():
            pt = pair_table(est[fold], t, zs, ev)
            by_truth[f"{fold}/{ref}"] = {**metrics(pt), "spearman_loss_change": change_spearman(pt),
                                         "zero_shot_baseline": metrics(pt, "zero_shot")}
            if ref == "mean":
                for k in seeds:
                    pt[f"true_loss_s{k}"] = [truth[fold][f"s{k}"][sid][m]["loss"]
                                             for sid, m in zip(pt["subset_id"], pt["dataset"])]
                pairs[fold] = pt
        if len(seeds) > 1:
            noise[fold] = seed_spread({f"s{k}": truth[fold][f"s{k}"] for k in seeds}, ev)
        for ref in ("s0", "mean") if "s0" in truth[fold] else ("mean",):
            tables[f"{fold}/{ref}"] = error_table(fs, truth[fold][ref], grid, roles)
    main = by_truth["test/mean"]
    per_seed_ft = [sum(truths[k]["runs"][s.id]["train_s"] for s in ev) for k in seeds]
    feat_s = json.loads(r.work.path("features.json").read_text())["seconds"]
    ft = float(np.mean(per_seed_ft))
    return {"lam": lam, "lam_source": cal["source"],
            "truth_definition": {"fold": "test", "reference": "mean over training seeds", "seeds": seeds,
                                 "n_per_dataset": {n: sp.n for n, sp in test.items()}},
            **{k: main[k] for k in ("mean_relative_error_loss", "median_relative_error_loss", "spearman_loss",
                                    "mean_abs_error_accuracy", "spearman_loss_change", "zero_shot_baseline")},
            "by_truth": by_truth, "truth_noise": noise, "lam_tables": tables,
            "lam_table": tables["test/mean"], "lam_hindsight": choose_lam(tables["test/mean"], "eval"),
            "lam_calibrated_on_this_truth": choose_lam(tables["test/mean"]),
            "pairs": pairs["test"].to_dict(orient="records"), "pairs_select": pairs["select"].to_dict(orient="records"),
            "truths": truth, "eval_subsets": [list(s.members) for s in ev],
            "calibration_subsets": [list(s.members) for s in cal_subsets], "n_subsets": len(ev),
            "finetune_s": ft, "finetune_s_note": "one seed's fine-tunes of the eval subsets (the mean over the seeds)", "extract_s": feat_s, "estimate_s": est_s,
            "speedup": ft / (feat_s + est_s), "converged": bool(fit.converged.all()),
            "theta0": "meta-initialization (one adapter on all datasets, seed 0); real fine-tunes start from it"}


def stage_feature_dim(r: Runner, meta: Path, cal: dict, fid: dict) -> dict:
    """Is d the estimator's limit? The fidelity stage's real fine-tunes (calibration + eval subsets; mean over
    seeds, selection fold) scored again with features of other projection dimensions (--sweep-d) at the same θ*:
    per d, λ chosen on the calibration subsets and the eval error there. Only reported: the affinity keeps --d."""
    a = r.args
    cal_subsets, ev = fidelity_subsets(list(r.by_name), a)
    out = []
    for d in a.sweep_d:
        feats, secs = extract(r.model, r.tok, r.data, r.config(0), argparse.Namespace(**{**vars(a), "d": d}),
                              init_adapter=meta, val_split="select")
        table = error_table(feats, fid["truths"]["select"]["mean"], sorted(set(cal["grid"])),
                            {"calibration": cal_subsets, "eval": ev})
        lam = choose_lam(table)
        at = next(row for row in table if row["lam"] == lam)
        out.append({"d": d, "extract_s": secs, "lam": lam, "calibration": at["calibration"], "eval": at["eval"],
                    "lam_hindsight": choose_lam(table, "eval"), "table": table})
        print(f"  d = {d}: λ {lam:g}, eval mean relative loss error {at['eval']['mean_relative_error_loss']:.3f}",
              flush=True)
    return {"d_affinity": a.d, "truth": "select/mean", "sweep": out}


def stage_methods(r: Runner, seed: int, groups: list[list[str]], meta: Path, feats: FeatureSet) -> dict:
    """One seed of: per-dataset adapters, grouped, + boosting, QLoRA on all, and the ACL ensemble."""
    a, names = r.args, [d.name for d in r.data]
    runs = {"all": json.loads(r.work.path(f"all_s{seed}.json").read_text())["run"]}
    runs["all_qlora"] = r.train(f"all_qlora_s{seed}", names, seed, qlora=True)
    for n in names:
        runs[f"single_{n}"] = r.train(f"ds_{n}_s{seed}", [n], seed)
    settings = BoostSettings(mode=a.boost_mode, rounds=a.boost_rounds, eta=a.eta, threshold=a.boost_threshold,
                             ridge_lam=a.ridge_lam, train_epochs=a.boost_epochs, train_max_steps=a.boost_max_steps)
    with restored_grads(r.model):  # ridge rounds are θ* + Pw, through the projection the features were taken with
        pm = load_adapter(r.model, meta)
        try:
            proj = Projection.for_model(pm, d=a.d, seed=a.seed)
        finally:
            pm.unload()
    boosts: dict[int, BoostResult] = {}
    for i, g in enumerate(groups):
        gname = f"g{set_key(g)}_s{seed}"
        runs[f"group_{i}"] = r.train(gname, g, seed)
        cache = r.work.path("boosting", f"{gname}.json")
        if cache.exists():
            boosts[i] = BoostResult.from_dict(json.loads(cache.read_text()))
        else:
            data = [r.by_name[m] for m in g]
            boosts[i] = boost_group(r.model, r.tok, gname, r.work.path("adapters", gname), by_dataset(data, "train"),
                                    by_dataset(data, "select"), settings, r.work.path("adapters", f"boost_{gname}"),
                                    ridge=RidgeBase(meta, proj, {m: feats.train[m].G for m in g}, r=r.cfg.r),
                                    config=r.config(seed), batch_size=a.eval_batch_size, max_length=a.max_length)
            cache.write_text(json.dumps(boosts[i].to_dict(), default=_jsonable))
        if boosts[i].rounds:  # the rounds' training cost (0 FLOPs for ridge), in the shape of a run
            runs[f"boost_{i}"] = {"flops": boosts[i].flops, "steps": boosts[i].steps, "peak_memory_bytes": 0,
                                  "seconds": sum(x.seconds for x in boosts[i].rounds), "members": g,
                                  "rounds_kept": len(boosts[i].kept), "mode": boosts[i].mode}
    rows = []
    for i, g in enumerate(groups):
        gname = f"g{set_key(g)}_s{seed}"
        zg, za = r.logits(gname, g), r.logits(f"all_s{seed}", g)
        for n in g:
            ds = r.by_name[n]
            h = [{sp: hh[n] for sp, hh in zip(("weights", "test"), pair)} for pair in zip(
                round_logits(r.model, r.tok, boosts[i], {n: examples_of([ds], "weights")},
                             batch_size=a.eval_batch_size, max_length=a.max_length),
                round_logits(r.model, r.tok, boosts[i], {n: examples_of([ds], "test")},
                             batch_size=a.eval_batch_size, max_length=a.max_length))]
            y = {"weights": ds.weights["label_id"].to_numpy(), "test": ds.test["label_id"].to_numpy()}
            out = score_dataset(zg[n], h, boosts[i].step_sizes, y, all_adapter=za[n], include_all=True)
            rows.append({"dataset": n, "group": i, **out["accuracy"], "weights": out["weights"],
                         "fallback": out["fallback"], "weights_with_all": out["weights_with_all"],
                         "rounds_kept": len(h), "weights_fold_accuracy": out["weights_fold_accuracy"],
                         "one_adapter_all_qlora": r.accuracy(f"all_qlora_s{seed}", n, True),
                         "one_per_dataset": r.accuracy(f"ds_{n}_s{seed}", n)})
    return {"seed": seed, "rows": rows, "boosting": {i: b.to_dict() for i, b in boosts.items()},
            "boosted_groups": sorted(i for i, b in boosts.items() if b.kept), "runs": runs,
            "boost_settings": settings.__dict__}


def stage_choose(r: Runner, feats: FeatureSet, targets: list[str], lam: float) -> dict:
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
        sel = select_auxiliaries(feats, target, hidden=hidden, top_k=a.top_k, n_subsets=a.n_select, lam=lam)
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
    add_recipe_args(p)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--targets", nargs="+", default=["tweet_sentiment", "vitaminc", "presuppositions_nli"])
    p.add_argument("--lam", type=float, default=None, help="pin λ (default: calibrated against real fine-tunes)")
    p.add_argument("--lam-grid", type=lambda s: tuple(float(x) for x in s.split(",")), default=LAM_GRID)
    p.add_argument("--n-random", type=int, default=300, help="random subsets of --subset-size for the affinity")
    p.add_argument("--subset-size", type=int, default=3)
    p.add_argument("--max-m", type=int, default=4)
    p.add_argument("--n-fidelity", type=int, default=20, help="random subsets fine-tuned to report estimation error")
    p.add_argument("--n-calibration", type=int, default=3, help="random subsets fine-tuned to choose λ")
    p.add_argument("--sweep-d", type=int, nargs="*", default=[],
                   help="after fidelity: the same real fine-tunes scored with features of these dimensions")
    p.add_argument("--truth-seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="training seeds of the fidelity truth: every fidelity subset is fine-tuned once per seed")
    p.add_argument("--weights-share", type=float, default=0.5, help="share of validation in the weights fold")
    p.add_argument("--boost-mode", choices=["ridge", "trained"], default="ridge")
    p.add_argument("--boost-rounds", type=int, default=3)
    p.add_argument("--eta", type=float, default=0.5, help="boosting step size")
    p.add_argument("--boost-threshold", type=float, default=0.2, help="boost while held-out CE stays above this")
    p.add_argument("--ridge-lam", type=float, default=0.1)
    p.add_argument("--boost-epochs", type=int, default=1)
    p.add_argument("--boost-max-steps", type=int, default=None)
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--n-select", type=int, default=200)
    p.add_argument("--hidden-examples", type=int, default=64)
    p.add_argument("--approx-datasets", type=int, default=4)
    p.add_argument("--approx-examples", type=int, default=4)
    p.add_argument("--n-bootstrap", type=int, default=50, help="bootstrap draws of the subsets for stability")
    p.add_argument("--budget-s", type=float, default=None, help="start no new stage after this many seconds")
    p.add_argument("--seed", type=int, default=0, help="data sampling seed")
    p.add_argument("--only", nargs="+", choices=PER_RUN_STAGES, default=list(PER_RUN_STAGES),
                   help="after the shared stages, run only these (seeds in parallel processes over one --work: give "
                        "each process its --seeds and `all methods`, and one process `fidelity approx`)")
    a = p.parse_args(argv)
    if a.lam is None and a.n_calibration < 1:
        p.error("--n-calibration must be >= 1 unless --lam pins λ")
    return a


PER_RUN_STAGES = ("all", "methods", "selection", "truth", "fidelity", "approx", "stability")


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    work = Work(args.work, args.budget_s)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # fp32 weights, TF32 matmuls
    t = time.perf_counter()
    model, tok = load_base_model(args.model, device=args.device)
    load_s = time.perf_counter() - t
    folder = data_folder(args)
    data, skipped = load_data(folder, tok, args)
    split_folds(data, weights_share=args.weights_share, seed=args.seed)
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
                 "sizes": {d.name: {"train": len(d.train), "val": len(d.val), "select": len(d.select),
                                    "weights": len(d.weights), "test": len(d.test)} for d in data},
                 "skipped": skipped, "train_config": {**cfg.__dict__, "target_modules": list(cfg.target_modules)}}
    try:
        res["zero_shot"] = work.stage("zero_shot", lambda: stage_zero_shot(r))
        res["all_s0"] = work.stage("all_s0", lambda: stage_all(r, 0))
        res["features"] = work.stage("features", lambda: stage_features(r, meta))
        feats = load_features(work)
        res["calibration"] = work.stage("calibration", lambda: stage_calibration(r, feats, meta))
        lam = res["calibration"]["lam"]
        res["affinity"] = work.stage("affinity", lambda: stage_affinity(r, feats, lam))
        groups = res["affinity"]["groups"]
        choice = res["choice"] = work.stage("choice", lambda: stage_choose(r, feats, targets, lam))
        only = set(args.only)
        for s in args.seeds:  # seed by seed, so a cut-short run still has whole seeds of everything
            if s != 0 and "all" in only:
                res[f"all_s{s}"] = work.stage(f"all_s{s}", lambda s=s: stage_all(r, s))
            if "methods" in only:
                res[f"methods_s{s}"] = work.stage(f"methods_s{s}",
                                                  lambda s=s: stage_methods(r, s, groups, meta, feats))
            if "selection" in only:
                res[f"selection_s{s}"] = work.stage(f"selection_s{s}", lambda s=s: stage_selection(r, choice, s))
            if s == args.seeds[0] and only & {"truth", "fidelity"}:
                truths = {k: work.stage(f"truth_s{k}", lambda k=k: stage_truth(r, meta, k)) for k in args.truth_seeds}
                res.update({f"truth_s{k}": v for k, v in truths.items()})
                if "fidelity" in only:
                    res["features_test"] = work.stage("features_test", lambda: stage_features_test(r, meta, feats))
                    res["fidelity"] = work.stage("fidelity", lambda: stage_fidelity(
                        r, feats, res["calibration"], truths, load_test_features(work)))
                    if args.sweep_d:
                        res["feature_dim"] = work.stage("feature_dim", lambda: stage_feature_dim(
                            r, meta, res["calibration"], res["fidelity"]))
        if "approx" in only:
            res["approx"] = work.stage("approx", lambda: stage_approx(r, meta))
        if "stability" in only:
            res["stability"] = work.stage("stability", lambda: stage_stability(r, feats, res["affinity"]))
        res["complete"] = only == set(PER_RUN_STAGES)
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
