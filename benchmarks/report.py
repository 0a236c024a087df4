"""Render the suite's results (benchmarks/suite.py) and the speed benchmarks as benchmarks/REPORT.md.

    .venv/bin/python benchmarks/report.py                                   # render the committed JSONs
    .venv/bin/python benchmarks/report.py --run -- --device cuda --data <full pack>   # run suite.py first

Reads benchmarks/results/{suite_cuda, estimation_fidelity_cuda, estimation_speed, gradient_features_*}.json and
writes REPORT.md, PNG figures and summary.json (every number the report quotes) under benchmarks/report/.
Every number comes from those JSONs; only the papers' claims are text constants here. The output depends on
the JSONs alone (no clock, no randomness), so rerunning on the same results gives the same files.
"""

from __future__ import annotations

import argparse
import json
import shutil
import re
import sys
import textwrap
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from grouplora.ml.plots import accuracy_table_png, affinity_heatmap, bar_chart, line_chart, scatter_chart

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# The papers' claims, as their abstracts state them (Li, Zhang, Wang, Zhang): "Scalable Fine-tuning from Multiple
# Data Sources: A First-Order Approximation Approach" (GradEx, EMNLP 2024) and "Efficient Ensemble for Fine-tuning
# Language Models on Multiple Datasets" (ACL 2025).
CLAIM_APPROX = ("GradEx (EMNLP 2024): the first-order approximation f(θ0+Δ) ≈ f(θ0) + gᵀΔ holds with remarkable "
                "accuracy near the meta-initialization; ACL 2025: with less than 1% error on models up to 34B "
                "parameters.")
CLAIM_APPROX_MAX = 0.01  # "less than 1% error"
CLAIM_FIDELITY = ("GradEx (EMNLP 2024): about 1% error of the true fine-tuning performance at a 30× speedup over "
                  "fine-tuning each subset; ACL 2025: estimates under 5% error, 105× faster than fine-tuning.")
PAPER_SPEEDUP = 105.0  # the ACL 2025 speedup, to say how many subsets this run would need to reach it
CLAIM_ENSEMBLE = ("ACL 2025: on ten text classification tasks (Llama and GPT models) the ensemble of grouped adapters "
                  "reaches up to 10% higher average test accuracy than QLoRA with 9% more FLOPs (34B Llama: +3% "
                  "for 8% more FLOPs).")
CLAIM_SELECTION = ("GradEx (EMNLP 2024): selecting auxiliary tasks by estimated loss improves over gradient- or "
                   "representation-similarity selection by up to 3.8% (instruction tuning, chain-of-thought "
                   "fine-tuning).")

METHODS = {  # report label → key in the methods rows (zero_shot comes from its own stage)
    "zero-shot": "zero_shot", "one adapter on all (LoRA)": "one_adapter_all",
    "one adapter on all (QLoRA)": "one_adapter_all_qlora", "one adapter per dataset": "one_per_dataset",
    "grouped": "grouped", "grouped + boosting": "grouped_boosted", "ensemble": "ensemble",
    "ensemble + all-datasets adapter (option)": "ensemble_with_all",
}
GRADEX = ("random_ensemble", "forward_selection")  # the selection methods that use GradEx estimates
EARLIER = "suite_cuda_h100.json"  # the H100 run before issue 13 (λ = 1e-3), the only one with the selection stages


# ---------------------------------------------------------------------------------------------- helpers


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (ddof 1; 0 for a single value)."""
    a = np.asarray(xs, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def pm(ms: tuple[float, float], scale: float = 100.0, nd: int = 1) -> str:
    m, s = ms
    return f"{m * scale:.{nd}f} ± {s * scale:.{nd}f}"


def reflow(md: str, width: int = 118) -> str:
    """Re-wrap prose paragraphs and bullets (tables, headings, images and code blocks untouched)."""
    out, fence = [], False
    for block in md.split("\n\n"):
        first = block.lstrip("\n")
        if first.startswith("```") or fence or first[:1] in "|#!" or not first:
            fence ^= block.count("```") % 2 == 1
            out.append(block)
            continue
        items: list[list[str]] = []
        for line in block.splitlines():
            if line.startswith("- ") or not items:
                items.append([line.strip()])
            else:
                items[-1].append(line.strip())
        out.append("\n".join(_wrap(" ".join(it), width, "  " if it[0].startswith("- ") else "") for it in items))
    return "\n\n".join(out)


def _wrap(text: str, width: int, indent: str) -> str:
    lines = textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False, subsequent_indent=indent)
    fixed = lines[:1]
    for ln in lines[1:]:  # "- x", "1. x", "= x" at a line start would turn prose into a list or a heading
        body = ln[len(indent):]
        if re.match(r"([-+*>#=]|\d+[.)])(\s|$)", body):
            head, _, rest = body.partition(" ")
            fixed[-1] += " " + head
            if rest:
                fixed.append(indent + rest)
        else:
            fixed.append(ln)
    return "\n".join(fixed)


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def g3(x: float) -> str:
    return f"{x:.3g}"


def strength(rho: float) -> str:
    """A word for a rank correlation, so the prose follows the numbers."""
    return ("not at all" if not rho > 0.1 else "weakly" if rho < 0.3 else "only moderately" if rho < 0.7
            else "well")


def seeds_of(s: dict, stage: str) -> list[int]:
    return sorted(int(m.group(1)) for k in s if (m := re.fullmatch(rf"{stage}_s(\d+)", k)))


def aux_text(aux: list[str], n_others: int) -> str:
    return "—" if not aux else f"all {n_others} others" if len(aux) == n_others else ", ".join(aux)


# --------------------------------------------------------------------------------------------- sections


def header(s: dict, out: dict) -> str:
    a, tc, sizes = s["args"], s["train_config"], s["sizes"]
    span = {k: (min(v[k] for v in sizes.values()), max(v[k] for v in sizes.values())) for k in ("train", "val", "test")}
    gpu_s = out_minutes(s) * 60
    cal = s.get("calibration", {})
    lam = f"{cal['lam']:g} ({cal['source']} on {len(cal['subsets'])} subsets)" if cal else f"{a['lam']}"
    out["run"] = {"gpu": s["machine"].get("gpu", s["device"]), "model": s["model"], "n_datasets": len(sizes),
                  "train_config": tc, "caps": {k: a[f"max_{k}_per_dataset"] for k in ("train", "val", "test")},
                  "sizes_min_max": span, "seeds": a["seeds"], "stage_seconds_total": gpu_s,
                  "complete": s.get("complete", False)}

    def rng(k: str) -> str:
        return f"{span[k][0]}" if span[k][0] == span[k][1] else f"{span[k][0]}–{span[k][1]}"
    prec = "fp32 weights, TF32 matmuls"  # suite.py's only precision
    return f"""# GroupLoRA benchmark report

Generated by `benchmarks/report.py` from `benchmarks/results/*.json`; every number below is also in
[`report/summary.json`](report/summary.json).

**What was run** (`benchmarks/suite.py`, {completeness(s)}): on one
{out['run']['gpu']} (torch {s['machine'].get('torch', '?')}), model `{s['model']}` ({prec}); the
`{a['preset']}` preset's {len(sizes)} datasets ({', '.join(sizes)}), capped at {a['max_train_per_dataset']} train /
{a['max_val_per_dataset']} validation / {a['max_test_per_dataset']} test examples each (actual: {rng('train')} /
{rng('val')} / {rng('test')}). LoRA r {tc['r']}, α {tc['alpha']}, on {', '.join(tc['target_modules'])}; lr {tc['lr']}
({tc['lr_schedule']}, warmup {tc['warmup_ratio']}), {tc['epochs']} epochs, batch {tc['batch_size']}, max length
{tc['max_length']}, best-validation-epoch checkpoints. Gradient features d = {a['d']}, λ = {lam}. Seeds
{', '.join(map(str, a['seeds']))} (the seed-0 adapter on all datasets is also the meta-initialization θ*). Total
stage time on the GPU: {gpu_s / 60:.0f} min, summed over stages (the seeds ran as parallel processes){stab_note(s)}.

Reproduce: see [Reproduce](#reproduce) at the end.
"""


def completeness(s: dict) -> str:
    if s.get("complete"):
        return "complete"
    skipped = [k for k, present in (("selection", seeds_of(s, "selection")), ("fidelity", "fidelity" in s),
                                    ("approx", "approx" in s), ("stability", "stability" in s)) if not present]
    return f"every stage but {', '.join(skipped)} (skipped)" if skipped else "INCOMPLETE (cut short)"


def stab_note(s: dict) -> str:
    st = s.get("stability")
    return "" if not st else (f"; the stability stage ({st['stage_seconds']:.0f} s) ran afterwards on "
                              f"{'the CPU' if st['device'] == 'cpu' else st['device']} from the run's features")


def approx_section(s: dict, fig: Path, out: dict) -> str:
    tabs = {k: pd.DataFrame(s["approx"][k]).groupby("scale").mean(numeric_only=True)
            for k in ("fresh_lora", "meta_init")}
    scales = list(tabs["fresh_lora"].index)
    # equal n per dataset, so the mean over datasets of the per-dataset means is the overall mean
    series = {f"{lab}, {stat} rel. error (%)": (tabs[k][col] * 100).tolist()
              for k, lab in (("fresh_lora", "θ0 = fresh LoRA"), ("meta_init", "θ0 = meta-init θ*"))
              for stat, col in (("mean", "mean_rel_error"), ("median", "median_rel_error"))}
    line_chart(scales, series, fig / "approx.png", title="First-order approximation error vs perturbation scale",
               xlabel="perturbation scale (relative size of Δ)", ylabel="relative error of f (%)", logx=False)
    out["approx"] = {k: t.reset_index().to_dict(orient="records") for k, t in tabs.items()}
    rows = [[sc] + [f"{tabs[k].loc[sc, c] * 100:.3f}%" for k in tabs for c in ("mean_rel_error", "median_rel_error")]
            + [g3(tabs[k].loc[sc, c]) for k in tabs for c in ("median_rel_error_of_change", "mean_abs_change")]
            for sc in scales]
    f, m = tabs["fresh_lora"], tabs["meta_init"]
    bar = "\\|Δf\\|"  # a pipe inside a markdown table cell must be escaped
    table = md_table(["scale", "fresh: mean", "fresh: median", "θ*: mean", "θ*: median",
                      f"fresh: err / {bar} (median)", f"θ*: err / {bar} (median)", f"fresh: mean {bar}",
                      f"θ*: mean {bar}"],
                     [[r[0], r[1], r[2], r[3], r[4], r[5], r[7], r[6], r[8]] for r in rows])
    n_ds = s["approx"]["fresh_lora"][0]["n"], len({r["dataset"] for r in s["approx"]["fresh_lora"]})
    ok = [sc for sc in scales if max(f.loc[sc, "mean_rel_error"], m.loc[sc, "mean_rel_error"]) < CLAIM_APPROX_MAX]
    holds = ("**the paper's claim holds at every scale**" if len(ok) == len(scales) else
             f"**the claim holds up to scale {max(ok)}**" if ok else "**above the paper's 1% at every scale**")
    out["approx_claim"] = {"threshold": CLAIM_APPROX_MAX, "holds_up_to_scale": max(ok) if ok else None,
                           "max_mean_fresh": float(f["mean_rel_error"].max()),
                           "max_mean_meta": float(m["mean_rel_error"].max())}
    return f"""## 1. First-order approximation error vs perturbation scale

Paper: {CLAIM_APPROX}

![approximation error](report/approx.png)

{table}

Relative error = |f(θ0+Δ) − f(θ0) − gᵀΔ| / |f(θ0+Δ)| with the full gradient g, f = gold-label log-odds, averaged
over {n_ds[1]} datasets × {n_ds[0]} (example, draw) pairs each (`median` = mean of the per-dataset medians). The scale
means different things at the two θ0 (`ml/approx.py`): for the **fresh LoRA** (B = 0) only lora_B is perturbed,
sized so the layer update ‖Δ_B A‖·scaling = scale·‖W_base‖; at the **meta-init θ*** every LoRA matrix moves by
scale·‖its own weights‖, a much smaller move in function space.

Reading: {holds} (mean relative error < {CLAIM_APPROX_MAX * 100:.0f}% at both θ0). The largest mean errors are
{f['mean_rel_error'].max() * 100:.1f}% for the fresh LoRA (median {f['median_rel_error'].max() * 100:.1f}%) and
{m['mean_rel_error'].max() * 100:.2f}% at θ*. For the fresh LoRA the error grows with the scale, as a Taylor remainder
should. At θ* these moves change f by only
{m['mean_abs_change'].min():.4f}–{m['mean_abs_change'].max():.4f} on average, so the stricter "error / |Δf|" column
({m['median_rel_error_of_change'].min():.2f}–{m['median_rel_error_of_change'].max():.2f}) is at the level of numerical
noise (likely the TF32 matmuls, ~1e-3 relative precision on f of order 1) and says little about the linearization;
how far real subset fine-tunes move from θ* is what section 2 tests.
"""


def fidelity_section(s: dict, old: dict, fig: Path, out: dict, results: Path, logs: Path) -> str:
    fd = s["fidelity"]
    p = pd.DataFrame(fd["pairs"])  # one row per (subset, member): the truth is the mean over seeds, test split
    td, bt = fd["truth_definition"], fd["by_truth"]
    seeds, ns = td["seeds"], len(td["seeds"])
    n_test = float(np.mean(list(td["n_per_dataset"].values())))
    n_sel = float(np.mean([v["select"] for v in s["sizes"].values()]))
    scatter_chart({"GradEx estimate at θ*": (p["true_loss"], p["est_loss"]),
                   "θ* unchanged (f = f0)": (p["true_loss"], p["zero_shot_loss"])}, fig / "fidelity.png",
                  title=f"Estimated vs real fine-tuned test loss ({len(p)} pairs, truth: mean of {ns} seeds)",
                  xlabel="true loss after fine-tuning from θ*", ylabel="estimated loss")
    keys = ("mean_relative_error_loss", "median_relative_error_loss", "spearman_loss", "mean_abs_error_accuracy",
            "spearman_loss_change")
    zs, ozs = fd["zero_shot_baseline"], old["zero_shot_baseline"]
    # the earlier run stores no change-Spearman for its baseline: f = f0 predicts no change at all
    variants = {f"**GradEx at θ*, λ = {fd['lam']:g}: truth = mean of {ns} seeds, test split**": bt["test/mean"],
                **{f"… truth = seed {k} alone, test split": bt[f"test/s{k}"] for k in seeds},
                f"… truth = mean of {ns} seeds, selection fold": bt["select/mean"],
                "… truth = seed 0 alone, selection fold (the measure before session 6)": bt["select/s0"],
                "θ* unchanged, f = f0 (truth = seed mean, test split)": zs,
                f"GradEx at fresh LoRA (earlier run, λ = {old['lam']})": old,
                "base + fresh LoRA unchanged (earlier run)": ozs}
    rows = [[name] + [g3(v[k]) if k in v else "—" for k in keys] for name, v in variants.items()]
    n, t = fd["n_subsets"], old["timing"]
    ft1, est1 = fd["finetune_s"] / n, fd["estimate_s"] / n
    # the number of subsets K at which K·ft1 / (extract + K·est1) reaches the paper's speedup
    k_paper = PAPER_SPEEDUP * fd["extract_s"] / (ft1 - PAPER_SPEEDUP * est1)
    aff = s["affinity"]
    # the subsets T really averages (subset_affinity reads the random size-3 ones only), at the fidelity runs'
    # per-subset cost (size 3 too); the estimate time is that of every estimated subset (singletons and pairs too)
    aff_n = aff.get("n_subsets_in_affinity", aff["n_subsets"])
    aff_ft = aff_n * ft1
    aff_speed = aff_ft / (fd["extract_s"] + aff["estimate_seconds"])
    lam_best = min((r for r in fd["lam_table"] if "eval" in r), key=lambda r: r["eval"]["mean_relative_error_loss"])
    gain = 1 - fd["mean_relative_error_loss"] / zs["mean_relative_error_loss"]
    moved, err = (p["true_loss"] - p["zero_shot_loss"]).abs().mean(), (p["est_loss"] - p["true_loss"]).abs().mean()
    est_moved = (p["est_loss"] - p["zero_shot_loss"]).abs().mean()
    lam_note = ("that is also the best grid value in hindsight on the reported subsets" if lam_best["lam"] == fd["lam"]
                else f"the hindsight-best grid value on the reported subsets is {lam_best['lam']} "
                     f"({lam_best['eval']['mean_relative_error_loss'] * 100:.1f}%)")
    recal = fd["lam_calibrated_on_this_truth"]
    single = [bt[f"test/s{k}"]["mean_relative_error_loss"] for k in seeds]
    noise = {fold: {"mean_relative_difference_loss": v["mean_relative_error_loss"],
                    "median_relative_difference_loss": v["median_relative_error_loss"], "n_pairs": v["n_pairs"]}
             for fold, v in fd.get("truth_noise", {}).items()}
    hard = hardest_share(logs, k=3)
    top = sorted(hard.get("select", {}), key=lambda d: -hard["select"][d])[:4]
    hard_md = ("" if not top else f" (the 3 hardest of a member's selection-fold examples carry "
               + ", ".join(f"{hard['select'][d] * 100:.0f}%" for d in top) + f" of its loss on {', '.join(top)}; "
               + ", ".join(f"{hard['test'][d] * 100:.0f}%" for d in top) + " of the test split's: "
               f"`{logs.name}/truth_s*.npz`)")
    out["fidelity_hardest3_share"] = hard
    # where the error sits: per dataset, the mean signed relative error and its share of the summed absolute error
    rel = (p["est_loss"] - p["true_loss"]) / p["true_loss"]
    per = pd.DataFrame({"dataset": p["dataset"], "signed": rel, "abs": rel.abs()}).groupby("dataset").agg(
        n=("abs", "size"), signed=("signed", "mean"), total=("abs", "sum"))
    per["share"] = per["total"] / per["total"].sum()
    worst = per["share"].idxmax()
    w = per.loc[worst]
    rest = (per["total"].sum() - w["total"]) / (len(p) - w["n"]) if len(p) > w["n"] else float("nan")
    out["fidelity_by_dataset"] = per[["n", "signed", "share"]].to_dict(orient="index")
    where_md = (f" The largest part of what is left sits on one dataset: on {worst} the estimate is off by {w['signed'] * 100:+.0f}% "
                f"on average ({int(w['n'])} pairs, {w['share'] * 100:.0f}% of the summed error); without it the mean would "
                f"be {rest * 100:.1f}%.")
    noise_md = "" if not noise else f"""
**How fine the truth is.** The seeds judged against each other (every ordered pair of seeds, the same measure the
estimate is judged by) differ by **{noise['test']['mean_relative_difference_loss'] * 100:.1f}% mean /
{noise['test']['median_relative_difference_loss'] * 100:.1f}% median on the test split** and by
{noise['select']['mean_relative_difference_loss'] * 100:.1f}% / {noise['select']['median_relative_difference_loss'] * 100:.1f}%
on the selection fold. A dataset's loss on ≈ {n_sel:.0f} selection-fold examples can be carried by a few hard
examples{hard_md}, so one fine-tune's truth there is as far from another seed's as
the estimate is from either; on ≈ {n_test:.0f} test examples the seeds agree
{'far more closely' if noise['test']['mean_relative_difference_loss'] < 0.7 * noise['select']['mean_relative_difference_loss'] else 'about as closely'},
and the estimate's error is {bt['test/mean']['mean_relative_error_loss'] * 100:.1f}% against their mean
({min(single) * 100:.1f}–{max(single) * 100:.1f}% against one seed alone).{where_md} The features, θ*, λ and the seed-0
fine-tunes are the ones the earlier measure used: "seed 0 alone, selection fold" is that measure again.
"""
    dims, dims_md = feature_dim_part(s)
    out["fidelity"] = {"this_run": {k: fd[k] for k in keys}, "this_run_f0_baseline": zs, "lam": fd["lam"],
                       "truth": {"fold": td["fold"], "seeds": seeds, "examples_per_dataset": n_test},
                       "by_truth": {k: {kk: v[kk] for kk in keys} for k, v in bt.items()},
                       "lam_calibrated_on_this_truth": recal, "truth_noise": noise, "feature_dim": dims,
                       "earlier_fresh_lora": {k: old[k] for k in keys}, "earlier_f0_baseline": ozs,
                       "earlier_lam": old["lam"], "earlier_lr": old["lr"],
                       "earlier_batch_size": old["finetune"]["batch_size"], "n_subsets": n, "n_pairs": len(p),
                       "finetune_s": fd["finetune_s"],
                       "extract_s": fd["extract_s"], "estimate_s": fd["estimate_s"], "speedup": fd["speedup"],
                       "finetune_s_per_subset": ft1, "estimate_s_per_subset": est1, "marginal_speedup": ft1 / est1,
                       "subsets_for_paper_speedup": k_paper, "earlier_speedup": old["speedup"],
                       "earlier_finetune_s_per_subset": t["finetune_s_per_subset"],
                       "affinity_subsets": aff_n, "affinity_estimate_s": aff["estimate_seconds"],
                       "affinity_equivalent_finetune_s": aff_ft, "affinity_speedup": aff_speed,
                       "error_reduction_vs_f0": gain, "mean_abs_real_change": moved, "mean_abs_error": err,
                       "mean_abs_estimated_change": est_moved, "lam_hindsight_best": lam_best["lam"],
                       "lam_hindsight_best_error": lam_best["eval"]["mean_relative_error_loss"]}
    return f"""## 2. Estimated vs real fine-tuning

Paper: {CLAIM_FIDELITY}

![estimate vs true loss](report/fidelity.png)

{n} random size-{len(p['members'][0])} subsets (λ picked on {s['args']['n_calibration']} further calibration
subsets, not reported), each really fine-tuned from θ* with the run's recipe, once per training seed
({', '.join(map(str, seeds))}). The truth of a (subset, member dataset) pair is the member's loss after fine-tuning,
mean log(1+exp(−f)), averaged over the seeds, on the member's **test split** (≈ {n_test:.0f} examples that neither
the estimator, nor λ, nor any checkpoint choice saw); one point per pair = {len(p)} pairs. The estimate is the
affinity's estimator as it is (the same features, θ*, λ and w), scored on those examples.

{md_table(['estimate', 'mean rel. loss error', 'median', 'Spearman (loss)', 'mean abs. accuracy error',
           'Spearman of the change'], rows)}

Reading: at the meta-initialization the estimate is **{fd['mean_relative_error_loss'] * 100:.1f}% mean /
{fd['median_relative_error_loss'] * 100:.1f}% median** relative loss error (ACL 2025: under 5%; GradEx: ~1%) with
Spearman {fd['spearman_loss']:.2f}. **The "no change" baseline** (predict θ*'s own loss for every subset) is at
**{zs['mean_relative_error_loss'] * 100:.1f}% / {zs['median_relative_error_loss'] * 100:.1f}%, Spearman
{zs['spearman_loss']:.2f}**: GradEx {'removes' if gain >= 0 else 'adds'} {abs(gain) * 100:.0f}% of that error, and
the estimated *change* of the loss ranks {strength(fd['spearman_loss_change'])} with the real change (Spearman
**{fd['spearman_loss_change']:.2f}**). At θ* each dataset's loss level is known before any fine-tuning; what an
estimator has to add is what fine-tuning on a given subset changes, and {'here it does not predict it: the low '
'errors and the high loss Spearman come from θ*, not from the estimate' if fd['spearman_loss_change'] < 0.3 else
'here it does, in part'}. Around a
fresh LoRA (the earlier run: lr {old['lr']}, batch {old['finetune']['batch_size']}, fine-tunes from the base model)
the same estimator was off by {old['mean_relative_error_loss'] * 100:.0f}% (Spearman {old['spearman_loss']:.2f}):
**starting at the meta-initialization is what brings the error down**, as GradEx prescribes (ACL 2025 linearizes at the
base model: the setting of the "fresh LoRA" rows), but at θ* the real fine-tunes move a dataset's loss by
{moved:.3f} on average, {'less than' if moved < err else 'about as much as' if moved < 1.5 * err else 'more than'} the
estimate's own error ({err:.3f}; the estimated moves average {est_moved:.3f}). λ: calibration chose {fd['lam']:g}
(one seed, selection fold, the pipeline's way); calibrated on this truth, the same calibration subsets choose
{recal:g}; {lam_note}. Runs before session 5 took the truth on the whole validation split while the estimates scored
its selection fold; that mismatch alone put the error at 11.1%{fold_note(results)}.
{noise_md}{dims_md}
Cost, for these {n} subsets: real fine-tuning {fd['finetune_s']:.0f} s (one seed) vs features {fd['extract_s']:.1f} s
(one-off) + estimation {fd['estimate_s']:.3f} s → **{fd['speedup']:.1f}×** (earlier fresh-LoRA run: {old['speedup']:.1f}×,
at {t['finetune_s_per_subset']:.1f} s of fine-tuning per subset vs {ft1:.1f} s here). Per extra subset: {ft1:.1f} s of
fine-tuning vs
{est1 * 1000:.1f} ms of estimation ({ft1 / est1:,.0f}×). The feature pass is paid once, so the speedup grows with the
number of subsets: the paper's {PAPER_SPEEDUP:.0f}× would take ≈ {k_paper:.0f} subsets at this cost, and the
{aff_n} random subsets the affinity averages (all {aff['n_subsets']} estimated in {aff['estimate_seconds']:.1f} s)
would have needed ≈ {aff_ft / 3600:.1f} h of fine-tuning → **≈ {aff_speed:.0f}×**.
"""


def affinity_section(s: dict, fig: Path, out: dict) -> str:
    a = s["affinity"]
    affinity_heatmap(np.asarray(a["T"]), a["names"], a["labels"], title="Task affinity T (GradEx estimates at θ*)",
                     path=fig / "affinity.png")
    out["affinity"] = {"m": a["m"], "groups": a["groups"], "m_scores": a["m_scores"], "n_subsets": a["n_subsets"],
                       "estimate_seconds": a["estimate_seconds"], "lam": a["lam"]}
    groups = md_table(["group", "datasets"], [[f"g{i}", ", ".join(g)] for i, g in enumerate(a["groups"])])
    scores = md_table(["m", "SDP objective", "score"], [[f"**{r['m']}**" if r["m"] == a["m"] else r["m"],
                                                        g3(r["objective"]), g3(r["score"])] for r in a["m_scores"]])
    return f"""## 3. Task affinity and the partition

T[i, j] = mean estimated −loss of target i over the random size-3 subsets that contain j
({a.get('n_subsets_in_affinity', 'all')} of the {a['n_subsets']} estimated subsets; singletons and pairs feed
`pairwise_affinity`; SQL model `subset_affinity`, run by DuckDB), λ = {a['lam']}, estimated in
{a['estimate_seconds']:.1f} s. It is symmetrized (row z-scores), the number of groups m is chosen by the score below,
and the SDP relaxation partitions the datasets into m = {a['m']} groups.

![affinity heatmap](report/affinity.png)

{groups}

{scores}
{stability_part(s, fig, out)}"""


def stability_part(s: dict, fig: Path, out: dict) -> str:
    """Section 3's stability subsection (suite.py's stability stage), if it was run."""
    st, a = s.get("stability"), s["affinity"]
    if not st:
        return ""
    names, n = st["names"], len(st["names"])
    affinity_heatmap(np.asarray(st["together_fixed_m"]), names, a["labels"], path=fig / "stability.png",
                     title=f"Share of {st['n_bootstrap']} bootstrap partitions (m = {st['m']}) that group i with j")
    per_pair = st["n_random"] * 3 / (n * (n - 1) / 2)  # size-3 subsets hold 3 pairs each
    ms = ", ".join(f"m = {m} in {c}" for m, c in st["m_counts"].items())
    rows = [[f"re-chosen ({ms})", st["ari_rechosen"]], [f"fixed at m = {st['m']}", st["ari_fixed_m"]]]
    table = md_table(["m", "ARI mean ± std", "median", "min", "draws identical"],
                     [[lab, f"{v['mean']:.2f} ± {v['std']:.2f}", f"{v['median']:.2f}", f"{v['min']:.2f}",
                       f"{v['share_identical'] * 100:.0f}%"] for lab, v in rows])
    r = st["ari_rechosen"]
    T = np.array(st["together_fixed_m"])
    ref = np.asarray(a["labels"])
    inside = T[(ref[:, None] == ref[None, :]) & ~np.eye(n, dtype=bool)].mean()
    out["stability"] = {k: st[k] for k in ("n_bootstrap", "lam", "m", "n_random", "ari_rechosen", "ari_fixed_m",
                                           "m_counts", "reproduces_committed")} | {
        "subsets_per_pair": per_pair, "mean_co_assignment_within_committed_groups": float(inside)}
    verdict = ("stable" if r["mean"] >= 0.8 else "moderately stable" if r["mean"] >= 0.5 else "**not stable**")
    return f"""
### Stability of the partition

The affinity stage (`benchmarks/chain.affinity_stage`: estimation → SQL → SDP, λ = {st['lam']:g}) re-run on
{st['n_bootstrap']} bootstrap draws of its {st['n_random']} random subsets (with replacement), each partition compared
with the one above by the adjusted Rand index (ARI: 1 = the same partition, 0 = chance level). The unresampled rerun
{'reproduces' if st['reproduces_committed'] else '**does not reproduce**'} the partition above.

{table}

![co-assignment under resampling](report/stability.png)

Reading: the partition is {verdict} under resampling of the subsets (ARI {r['mean']:.2f} ± {r['std']:.2f} with m
re-chosen; {r['share_identical'] * 100:.0f}% of the draws give the same partition); two datasets of one group above
share a group in {inside * 100:.0f}% of the draws (m fixed). Each pair of datasets is averaged over only
≈ {per_pair:.0f} subsets, and the estimated changes rank with the real ones at Spearman
{s['fidelity']['spearman_loss_change']:.2f} (section 2){': the differences between the entries of T are largely '
'resampling noise' if r['mean'] < 0.5 else ''}.
"""


def methods_section(s: dict, fig: Path, out: dict) -> str:
    seeds = seeds_of(s, "methods")
    names = list(s["sizes"])
    rows0 = s[f"methods_s{seeds[0]}"]["rows"][0]
    methods = {lab: k for lab, k in METHODS.items() if k == "zero_shot" or k in rows0}  # older runs lack options
    acc: dict[str, dict[str, list[float]]] = {lab: {} for lab in methods}  # label → dataset → per-seed values
    for seed in seeds:
        for r in s[f"methods_s{seed}"]["rows"]:
            for lab, key in methods.items():
                if key != "zero_shot":
                    acc[lab].setdefault(r["dataset"], []).append(r[key])
    acc["zero-shot"] = {d: [v] for d, v in s["zero_shot"]["accuracy"].items()}  # deterministic: one value
    per_seed_mean = {lab: np.mean([[v[d][i] for d in names] for i in range(len(next(iter(v.values()))))], axis=1)
                     for lab, v in acc.items()}
    avg = {lab: mean_std(x) for lab, x in per_seed_mean.items()}
    cell = lambda lab, d: (f"{acc[lab][d][0] * 100:.1f}" if lab == "zero-shot"  # noqa: E731
                           else pm(mean_std(acc[lab][d])))
    table = md_table(["dataset"] + list(methods), [[d] + [cell(lab, d) for lab in methods] for d in names]
                     + [["**mean**"] + [f"**{avg[lab][0] * 100:.1f}**" if lab == "zero-shot" else f"**{pm(avg[lab])}**"
                                        for lab in methods]])
    accuracy_table_png({lab: {d: float(np.mean(v[d])) * 100 for d in names} for lab, v in acc.items()},
                       fig / "accuracy.png", title=f"Test accuracy (%), mean over seeds {seeds}", fmt="{:.1f}")

    # training cost: the TrainResults behind each method (per seed; FLOPs are seed-independent, time is not)
    def runs_of(runs: dict, key: str) -> list[dict]:
        pick = {"one_adapter_all": ["all"], "one_adapter_all_qlora": ["all_qlora"],
                "one_per_dataset": [k for k in runs if k.startswith("single_")],
                "grouped": [k for k in runs if k.startswith("group_")]}
        pick["grouped_boosted"] = pick["grouped"] + [k for k in runs if k.startswith("boost_")]
        pick["ensemble"] = pick["grouped_boosted"]  # the ACL ensemble: group + boosting adapters only
        pick["ensemble_with_all"] = pick["grouped_boosted"] + ["all"]
        return [runs[k] for k in pick.get(key, [])]
    # what the chain needs before any group adapter: θ* (the seed-0 adapter on all) and the λ calibration fine-tunes
    theta = s["all_s0"]["run"]["flops"]
    cal_flops = sum(r.get("flops", 0) for r in s.get("calibration", {}).get("runs", {}).values())
    chain = {"grouped", "grouped_boosted", "ensemble", "ensemble_with_all"}
    # inference: adapter forward passes per test example (a boosting round is one more pass; 0 for zero-shot's base)
    passes = {lab: float(np.mean([1 + (r["rounds_kept"] if key in ("grouped_boosted", "ensemble", "ensemble_with_all")
                                       else 0) + (key == "ensemble_with_all")
                                  for seed in seeds for r in s[f"methods_s{seed}"]["rows"]]))
              for lab, key in methods.items()}
    cost = {}
    for lab, key in methods.items():
        per = [runs_of(s[f"methods_s{seed}"]["runs"], key) for seed in seeds]
        flops = float(np.mean([sum(r["flops"] for r in rr) for rr in per]))
        cost[lab] = {"flops": flops, "chain_flops": flops + (theta + cal_flops if key in chain else 0.0),
                     "steps": float(np.mean([sum(r["steps"] for r in rr) for rr in per])),
                     "peak_mib": max((r["peak_memory_bytes"] for rr in per for r in rr), default=0) / 2**20,
                     "seconds": float(np.mean([sum(r["seconds"] for r in rr) for rr in per])),
                     "n_runs": len(per[0]), "forward_passes_per_example": passes[lab]}
    base = cost["one adapter on all (LoRA)"]["flops"]
    cost_rows = [[lab, c["n_runs"], f"{c['steps']:.0f}", f"{c['flops'] / 1e12:.0f}", f"{c['flops'] / base:.2f}×",
                  f"{c['chain_flops'] / base:.2f}×", f"{c['forward_passes_per_example']:.2f}",
                  f"{c['peak_mib']:.0f}" if c["peak_mib"] else "—", f"{c['seconds']:.0f}"] for lab, c in cost.items()]
    cost_table = md_table(["method", "runs", "optimizer steps", "training TFLOPs", "vs one adapter on all",
                           "incl. θ* + calibration", "inference passes / example", "peak GPU memory (MiB)",
                           "training s"], cost_rows)
    # with the all-datasets adapter as an extra candidate (the named option, last weight): how much weight it takes
    share = [r["weights_with_all"][-1] / sum(r["weights_with_all"]) for seed in seeds
             for r in s[f"methods_s{seed}"]["rows"] if sum(r.get("weights_with_all") or [0]) > 0]
    n_w = sorted({len(r["weights"]) for seed in seeds for r in s[f"methods_s{seed}"]["rows"]})
    n_ad_all = f"{n_w[0] + 1}" if len(n_w) == 1 else f"{n_w[0] + 1}–{n_w[-1] + 1}"
    fallbacks = sum(bool(r.get("fallback")) for seed in seeds for r in s[f"methods_s{seed}"]["rows"])
    qlora, lora, gb, ens = "one adapter on all (QLoRA)", "one adapter on all (LoRA)", "grouped + boosting", "ensemble"
    pairs = ((ens, qlora), ("grouped", lora), ("one adapter per dataset", lora), (gb, "grouped"))
    d = {k: avg[k][0] - avg[ref][0] for k, ref in pairs}
    d["ensemble vs LoRA"] = avg[ens][0] - avg[lora][0]
    d["grouped + boosting vs LoRA"] = avg[gb][0] - avg[lora][0]
    d["grouped + boosting vs QLoRA"] = avg[gb][0] - avg[qlora][0]
    d["ensemble vs grouped + boosting"] = avg[ens][0] - avg[gb][0]
    gb_seed_wins = int(sum(per_seed_mean[gb] > per_seed_mean[lora]))
    wins = sum(np.mean(acc[ens][x]) > np.mean(acc[qlora][x]) for x in names)
    steps = {r["steps"] for seed in seeds for k, r in s[f"methods_s{seed}"]["runs"].items() if k.startswith("single_")}
    boosted = [len(s[f"methods_s{seed}"].get("boosted_groups", [])) for seed in seeds]
    n_groups = len(s["affinity"]["groups"])
    mode = s[f"methods_s{seeds[0]}"].get("boost_settings", {}).get("mode", "trained")
    out["methods"] = {"seeds": seeds, "mean_accuracy": {lab: {"mean": m, "std": sd} for lab, (m, sd) in avg.items()},
                      "per_seed_mean": {lab: [float(x) for x in v] for lab, v in per_seed_mean.items()},
                      "per_dataset": {lab: {x: dict(zip(("mean", "std"), mean_std(v[x]))) for x in names}
                                      for lab, v in acc.items()},
                      "cost": {lab: {**c, "relative_flops": c["flops"] / base,
                                     "relative_chain_flops": c["chain_flops"] / base} for lab, c in cost.items()},
                      "differences_pt": {k: v * 100 for k, v in d.items()}, "ensemble_wins_vs_qlora": int(wins),
                      "grouped_boosted_seed_wins_vs_lora": gb_seed_wins,
                      "ensemble_weight_share_on_all_adapter": float(np.mean(share)) if share else 0.0,
                      "ensemble_fallbacks": fallbacks, "single_dataset_steps": sorted(steps),
                      "boosted_groups_per_seed": boosted}
    mem_note = (" in this table, which counts the fp32 base the process keeps beside the 4-bit one; measured one "
                "base per process (below), QLoRA does save memory"
                if cost[qlora]["peak_mib"] >= 0.9 * cost[lora]["peak_mib"] else "")

    def sgn(x: float) -> str:
        return f"{x * 100:+.1f} pt"
    with_all = ("ensemble + all-datasets adapter (option)" in methods)
    return f"""## 4. Accuracy and cost of the methods

Paper: {CLAIM_ENSEMBLE}

Test accuracy (%), mean ± std (ddof 1) over seeds {', '.join(map(str, seeds))}; zero-shot is deterministic. The
grouped adapters use section 3's partition; "grouped + boosting" adds up to {s['args'].get('boost_rounds', 1)}
{mode} boosting rounds per group (residual fits with a step size, a round kept only if it lowers the held-out loss of
the selection fold; boosted groups per seed: {', '.join(map(str, boosted))} of {n_groups}); the ensemble (ACL 2025)
weights, per dataset, its group adapter and that group's boosting rounds, fit on the weights fold of validation, which
chooses neither checkpoints nor rounds (fell back to the group adapter in {fallbacks} dataset-seed cases).
{'"Ensemble + all-datasets adapter" is the named option that adds the all-datasets adapter as one more candidate.'
 if with_all else ''}

![accuracy table](report/accuracy.png)

{table}

Cost per method (mean over seeds). Training FLOPs = 4·N·T + 6·N_lora·T from `ml/flops.py` (QLoRA counts the same
FLOPs as LoRA; {mode} boosting {'trains nothing: its rounds are ridge fits on the gradient features, 0 FLOPs, their '
'seconds are forward passes' if mode == 'ridge' else 'trains one adapter per round'}). "incl. θ* + calibration" adds
what the grouped methods need first: the meta-initialization θ* (the seed-0 adapter on all datasets,
{theta / base:.2f}×) and the {len(s.get('calibration', {}).get('runs', {}))} λ-calibration fine-tunes
({cal_flops / base:.2f}×); the feature pass ({s['features']['seconds']:.0f} s) is not counted. Inference = adapter
forward passes per test example (each kept boosting round is one more). Peak memory = max over the runs:

{cost_table}

Reading: **grouped + boosting is the best method**: {sgn(d['grouped + boosting vs LoRA'])} over one LoRA adapter on
all (higher in {gb_seed_wins} of {len(seeds)} seeds) and {sgn(d['grouped + boosting vs QLoRA'])} over one QLoRA
adapter, at {cost[gb]['flops'] / base:.2f}× the training FLOPs ({cost[gb]['chain_flops'] / base:.2f}× counting θ*
and calibration) and {cost[gb]['forward_passes_per_example']:.1f} forward passes per example. The ACL ensemble is
**{sgn(d['ensemble'])} over one QLoRA adapter** ({wins} of {len(names)} datasets higher) and
{sgn(d['ensemble vs LoRA'])} vs one LoRA adapter on all: its weights, fit on ~{n_weights(s)} examples per dataset,
{'give back' if d['ensemble vs grouped + boosting'] < 0 else 'add'} {abs(d['ensemble vs grouped + boosting']) * 100:.1f}
pt {'of what boosting reached' if d['ensemble vs grouped + boosting'] < 0 else 'to boosting'} — not the paper's "up
to +10% for 9% more FLOPs". Grouped adapters alone are {sgn(d['grouped'])} vs one adapter on all, boosting adds
{sgn(d['grouped + boosting'])} to them, and one adapter per dataset is {sgn(d['one adapter per dataset'])}. With the
all-datasets adapter as an extra candidate the fitted weights put on average {np.mean(share) * 100 if share else 0:.0f}%
of their mass on it (one of {n_ad_all} candidates per dataset). QLoRA trains
{cost[qlora]['seconds'] / cost[lora]['seconds']:.1f}× slower than LoRA here (4-bit dequantization). Why the gains are
small:

- Scale: `{s['model']}` with {s['args']['max_train_per_dataset']} training examples per dataset and
  {s['train_config']['epochs']} epochs; the papers use larger models and datasets, where tasks can interfere more and
  a single adapter has less spare capacity.
- Little negative transfer to remove: pooling everything is the strongest regularizer here (one adapter per dataset,
  {'/'.join(map(str, sorted(steps)))} steps each, is {-d['one adapter per dataset'] * 100:.1f} pt below one adapter on
  all),
  and a group sees fewer examples than "all".
- The groups come from estimates whose changes rank with the real ones at Spearman
  {s['fidelity']['spearman_loss_change']:.2f} (section 2){stab_clause(s)}.
- Where interference does exist, the same chain finds and fixes it: section 7's positive control.
- QLoRA peaks at {cost[qlora]['peak_mib']:.0f} vs {cost[lora]['peak_mib']:.0f} MiB for LoRA{mem_note}.
"""


def n_weights(s: dict) -> str:
    w = [v["weights"] for v in s["sizes"].values() if "weights" in v]
    return f"{np.mean(w):.0f}" if w else "?"


def stab_clause(s: dict) -> str:
    st = s.get("stability")
    return "" if not st else (f", and the partition itself changes under resampling of the subsets (ARI "
                              f"{st['ari_rechosen']['mean']:.2f}, section 3)")


def memory_section(results: Path, out: dict) -> str:
    """LoRA vs QLoRA peak memory, each in a process of its own (benchmarks/peak_memory.py), if it was run."""
    path = results / "peak_memory_cuda.json"
    if not path.exists():
        return ""
    pm = json.loads(path.read_text())
    runs = {r["variant"]: r for r in pm["runs"]}
    out["peak_memory"] = runs
    rows = [[{"lora": "LoRA", "qlora": "QLoRA"}.get(v, v), f"{r['base_weights_mib']:.0f}", f"{r['process_peak_mib']:.0f}",
             f"{r['seconds']:.0f}"] for v, r in runs.items()]
    saved = runs["lora"]["process_peak_mib"] - runs["qlora"]["process_peak_mib"]
    return f"""### Peak memory with one base per process

The suite's per-run peaks above come from one process that keeps the fp32 base on the GPU while it trains the
QLoRA adapters, so they cannot show what 4-bit weights save. `benchmarks/peak_memory.py` trains the all-datasets
adapter once per variant, each in a fresh process with only its own base loaded (same data, batch {runs['lora']['batch_size']} × up to
{runs['lora']['max_length']} tokens, one epoch; `{path.name}`, {pm['device']}):

{md_table(["variant", "base weights on the GPU (MiB)", "process peak (MiB)", "seconds"], rows)}

QLoRA saves {saved:.0f} MiB ({saved / runs['lora']['process_peak_mib'] * 100:.0f}%) of the peak: the 4-bit weights
are {runs['qlora']['base_weights_mib']:.0f} instead of {runs['lora']['base_weights_mib']:.0f} MiB, and at 135M
parameters the activations of a training step dominate the rest.
"""


def selection_section(s: dict, fig: Path, out: dict, source: str | None = None) -> str:
    """Section 5 from suite JSON `s`; `source` names it when it is another run than the report's (the H200 rerun
    skipped the selection stages; the earlier H100 run has them)."""
    seeds = seeds_of(s, "selection")
    n_others = len(s["sizes"]) - 1
    parts, gains, res = [], {}, {}
    for target, c in s["choice"]["targets"].items():
        accs = {m: mean_std([s[f"selection_s{k}"]["accuracy"][target][m] for k in seeds]) for m in c["chosen"]}
        best = max(accs, key=lambda m: accs[m][0])
        best_gx = max(GRADEX, key=lambda m: accs[m][0])
        xs, ys = [c["est_loss"][m] for m in accs], [-accs[m][0] for m in accs]
        est_rank = spearmanr(xs, ys).statistic if np.ptp(xs) > 0 and np.ptp(ys) > 0 else float("nan")  # nan: a tie
        rows = [[f"**{m}**" if m == best else m, aux_text(c["chosen"][m], n_others), f"{c['est_loss'][m]:.3f}",
                 pm(accs[m])] for m in c["chosen"]]
        best_base = max((m for m in accs if m not in GRADEX), key=lambda m: accs[m][0])
        res[target] = {"accuracy": {m: {"mean": a, "std": sd} for m, (a, sd) in accs.items()}, "best": best,
                       "best_baseline": best_base,
                       "gradex_minus_best_baseline_pt": (accs[best_gx][0] - accs[best_base][0]) * 100,
                       "best_gradex": best_gx, "chosen": c["chosen"], "est_loss": c["est_loss"],
                       "spearman_est_loss_vs_accuracy": float(est_rank)}
        for m in accs:
            if m != "none":
                gains[f"{target}: {m}"] = (accs[m][0] - accs["none"][0]) * 100
        verdict = (f"best GradEx method {best_gx} ({pm(accs[best_gx])}) vs best baseline {best_base} "
                   f"({pm(accs[best_base])}): {(accs[best_gx][0] - accs[best_base][0]) * 100:+.1f} pt")
        pred = sorted((m for m in accs if c["est_loss"][m] == min(c["est_loss"].values())))
        res[target]["lowest_est_loss"] = pred
        parts.append(f"**{target}** — best by mean: {best} ({pm(accs[best])}); {verdict}. Lowest estimated loss: "
                     f"{' = '.join(pred)}; rank agreement of estimated loss with real accuracy over the "
                     f"{len(accs)} methods (Spearman, 1 = same order): {est_rank:.2f}.\n\n"
                     + md_table(["method", "auxiliaries", "est. target loss", "test accuracy (%)"], rows))
    bar_chart(gains, fig / "selection.png", title="Auxiliary selection: target accuracy gain over the target alone",
              xlabel=f"test accuracy − target alone (pt), mean over seeds {seeds}",
              highlight=[k for k in gains if k.split(": ")[1] in GRADEX], highlight_label="GradEx selection")
    out["selection"] = {"seeds": seeds, "targets": res, "gain_over_none_pt": gains}
    wins = sum(r["best"] in GRADEX for r in res.values())
    max_sd = max(v["std"] for r in res.values() for v in r["accuracy"].values()) * 100
    out["selection"]["gradex_wins"] = wins
    out["selection"]["max_std_pt"] = max_sd
    mean_rho = float(np.nanmean([r["spearman_est_loss_vs_accuracy"] for r in res.values()]))
    out["selection"]["mean_spearman_est_loss_vs_accuracy"] = mean_rho
    lam = s.get("calibration", {}).get("lam", s["affinity"].get("lam", s["args"]["lam"]))
    out["selection"]["source"] = source or "this run"
    out["selection"]["lam"] = lam
    where = (f"""**From the earlier run, not this one**: `{source}` ({s['machine'].get('gpu', s['device'])}, the method
before issue 13: λ = {lam:g} not calibrated, estimates and adapters as that run made them); the rerun above skipped
this experiment to save GPU time. Its numbers are that run's, including its section-2 change correlation.

""" if source else "")
    return f"""## 5. Auxiliary dataset selection

{where}Paper: {CLAIM_SELECTION}

Per target: each method picks up to {s['choice']['targets'][next(iter(res))]['settings']['top_k']} auxiliary datasets
(GradEx: `random_ensemble` = thresholded scores over {s['choice']['targets'][next(iter(res))]['settings']['n_subsets']}
estimated random subsets, `forward_selection` = greedy on the estimated loss; baselines: none, all, gradient cosine,
hidden-state cosine); target + auxiliaries are then fine-tuned with seeds {', '.join(map(str, seeds))} and scored on
the target's test split. "est. target loss" is GradEx's estimate of that choice (lower = predicted better).

![selection gains](report/selection.png)

{chr(10).join(p + chr(10) for p in parts)}
Reading: a GradEx method has the best mean on {wins} of {len(res)} targets. Seed std reaches {max_sd:.1f} pt, so
differences of a point or two are within noise. GradEx's estimated loss orders the methods
{strength(mean_rho)} by their real accuracy (mean Spearman over targets {mean_rho:.2f}); {'that run' if source
else 'section 2'}'s change correlation is {s['fidelity']['spearman_loss_change']:.2f}.
"""


def speed_section(results: Path, s: dict, out: dict) -> str:
    rows, feats, gjs = [], {}, []
    for p in sorted(results.glob("gradient_features_*.json")):
        g = json.loads(p.read_text())
        if g.get("ratio_to_floor") is None or g["model"] == "tiny":  # tiny is a CUDA correctness check only
            continue
        gjs.append(g)
        unit = "tok/CPU-s" if "process_time" in g.get("clock", "") else "tok/s"
        feats[p.stem] = {k: g[k] for k in ("model", "device_name", "dtype", "floor_tokens_per_s", "tokens_per_s",
                                           "ratio_to_floor", "ratio_to_floor_same_inputs", "speedup_vs_reference",
                                           "speedup_vs_per_example_loop", "projection_frac_of_model")}
        dev = g["device_name"] if g["device"] != "cpu" else f"CPU ({g['cpu_threads']} shared cores)"
        rows.append([f"{g['model']} ({g['dtype']})", dev, f"{g['floor_tokens_per_s']:,.0f} {unit}",
                     f"{g['tokens_per_s']:,.0f} {unit}",
                     f"{g['ratio_to_floor']:.2f} ({g['ratio_to_floor_same_inputs']:.2f})",
                     f"{g['speedup_vs_reference']:.1f}× ({g['speedup_vs_per_example_loop']:.1f}×)",
                     f"{g['projection_frac_of_model'] * 100:.2f}%"])
    e = json.loads((results / "estimation_speed.json").read_text())
    sc = e["scale"]
    out["speed"] = {"gradient_features": feats, "estimation": {
        "speedup_vs_reference": e["speedup_vs_reference"], "speedup_vs_reference_analytic_jac":
        e["speedup_vs_reference_analytic_jac"], "ours_fit_seconds": e["ours_fit_seconds"],
        "reference_seconds": e["reference"]["seconds_all_subsets"],
        "reference_analytic_jac_seconds": e["reference_analytic_jac"]["seconds_all_subsets"],
        "scale_seconds": e["scale_seconds"], "scale": sc, "n_subsets": e["n_subsets"], "n_datasets": e["n_datasets"]},
        "suite_features": {k: s["features"][k] for k in ("seconds", "examples", "examples_per_s")}}
    shape = sorted({(g["batch"], g["seq_len"], g["d"]) for g in gjs})
    shape_txt = "; ".join(f"batch {b} × {n} tokens, d = {d}" for b, n, d in shape)
    return f"""## 6. Speed benchmarks

Details and how to read them: [benchmarks/README.md](README.md). Gradient features ({shape_txt};
ratio = our feature pass / one forward + backward, in parentheses vs the same pass without hooks; speedup vs the
papers' per-example reference, in parentheses vs a per-example loop):

{md_table(['model', 'device', 'floor', 'ours', 'ratio to floor', 'speedup vs reference', 'projection / model'], rows)}

In the suite run the feature pass took {s['features']['seconds']:.1f} s for {s['features']['examples']:,} examples
({s['features']['examples_per_s']:.0f} examples/s).

Estimation (`estimation_speed.json`, shared {e['machine']['logical_cpus']}-core CPU, threads = {e['threads']}):
{e['n_subsets']} subsets of {e['n_datasets']}
datasets fit in {e['ours_fit_seconds']:.2f} s vs {e['reference']['seconds_all_subsets']:.0f} s for the papers'
BFGS without a gradient (**{e['speedup_vs_reference']:.0f}×**) and
{e['reference_analytic_jac']['seconds_all_subsets']:.1f} s
with their analytic gradient (**{e['speedup_vs_reference_analytic_jac']:.0f}×**); at scale, {sc['n_datasets']} datasets
and {sc['n_subsets']:,} subsets fit + score ({sc['score_rows']:,} rows) in **{e['scale_seconds']:.1f} s**.
"""


def positive_control_section(results: Path, fig: Path, out: dict) -> str:
    """The positive control (benchmarks/positive_control.py): label-swapped twins, where the right partition is known."""
    path = results / "positive_control_cuda.json"
    if not path.exists():
        return ""
    pc = json.loads(path.read_text())
    png = results / "positive_control_cuda.png"
    if png.exists():
        shutil.copy2(png, fig / "positive_control.png")
    acc = pc["mean_accuracy"]
    rows = [[m, f"{acc[m]['mean']:.3f} ± {acc[m]['std']:.3f}"] for m in acc]
    twins = [t for s in pc["seeds"] for t in pc[f"affinity_s{s}"]["twins"]]
    negative = sum(t["affinity_sym"] < 0 for t in twins)
    out["positive_control"] = {k: pc[k] for k in ("ensemble_minus_all_adapter", "flops_ratio", "twins_separated",
                                                  "n_datasets", "seeds")} | {"twin_affinity_negative": negative,
                                                                             "twin_pairs": len(twins)}
    return "\n".join([
        "## 7. Positive control: label-swapped twins", "",
        f"{pc['n_datasets']} datasets: {len(pc['pairs'])} real binary datasets and, for each, a twin with the same "
        "texts, splits and template but its label words swapped, so one adapter on everything fights itself. The "
        "chain (the same ml/ functions as the assets: features at the meta-initialization, λ calibrated against real "
        "fine-tunes, the SQL affinity, SDP, best-epoch adapters, residual boosting, ensemble weights on a separate "
        f"validation fold) ran with seeds {pc['seeds']} on {pc['machine'] if isinstance(pc.get('machine'), str) else 'the GPU'}.",
        "", md_table(["method", "mean test accuracy"], rows), "",
        f"Ensemble − one adapter on all: **{pc['ensemble_minus_all_adapter']:+.3f}**; training FLOPs of the ensemble "
        f"over the all-datasets adapter: **{pc['flops_ratio']:.2f}×**; every twin pair separated by the partition: "
        f"**{pc['twins_separated']}**; the symmetrized affinity between twins was negative in {negative} of "
        f"{len(twins)} (pair, seed) cases.", "",
        "![positive control](report/positive_control.png)" if png.exists() else "", ""])


SIMILARITY = ("gradient_cosine", "hidden_cosine")  # the baselines the GradEx selection claim is measured against


def fold_note(results: Path) -> str:
    """θ*'s own loss on the selection fold vs the whole validation split (benchmarks/fold_check.py), if measured."""
    path = results / "fold_check_cpu.json"
    if not path.exists():
        return ""
    fc = json.loads(path.read_text())
    return (f". At θ* itself, with no fine-tuning, the two folds' losses differ by {fc['mean_relative_difference'] * 100:.1f}% "
            f"on average and by up to {fc['max_relative_difference'] * 100:.0f}% ({fc['max_at']}; "
            f"`results/fold_check_cpu.json`)")


def hardest_share(folder: Path, k: int = 3) -> dict[str, dict[str, float]]:
    """{fold: {dataset: share of a member's loss its k hardest examples carry}}, averaged over the fidelity runs
    (every subset and seed) from the per-example cross-entropies suite.py stores (truth_s<seed>.npz); {} if none."""
    shares: dict[tuple[str, str], list[float]] = {}
    for path in sorted(folder.glob("truth_s*.npz")):
        z = np.load(path)
        for key in z.files:
            _, dataset, fold = key.split("/")
            ce = np.sort(z[key])[::-1]
            if ce.sum() > 0:
                shares.setdefault((fold, dataset), []).append(float(ce[:k].sum() / ce.sum()))
    out: dict[str, dict[str, float]] = {}
    for (fold, dataset), v in sorted(shares.items()):
        out.setdefault(fold, {})[dataset] = float(np.mean(v))
    return out


def feature_dim_part(s: dict) -> tuple[list[dict], str]:
    """The same real fine-tunes scored with features of other projection dimensions (suite.py feature_dim)."""
    fdim = s.get("feature_dim")
    if not fdim or not fdim.get("sweep"):
        return [], ""
    fd = s["fidelity"]
    def hindsight(table: list[dict]) -> tuple[float, float]:
        best = min((r for r in table if "eval" in r), key=lambda r: r["eval"]["mean_relative_error_loss"])
        return best["lam"], best["eval"]["mean_relative_error_loss"]
    ref = fdim.get("truth", "select/mean")  # the sweep's features hold the selection fold: judged on it
    rows = [{"d": fdim["d_affinity"], "lam": fd["lam"],
             "eval_mean_relative_error_loss": fd["by_truth"][ref]["mean_relative_error_loss"],
             "hindsight": hindsight(fd["lam_tables"][ref])}]
    rows += [{"d": x["d"], "lam": x["lam"], "eval_mean_relative_error_loss": x["eval"]["mean_relative_error_loss"],
              "hindsight": hindsight(x["table"])} for x in fdim["sweep"]]
    table = md_table(["d", "λ (chosen on the calibration subsets)", "mean rel. loss error (reported subsets)",
                      "best λ in hindsight (its error)"],
                     [[r["d"], f"{r['lam']:g}", f"{r['eval_mean_relative_error_loss'] * 100:.1f}%",
                       f"{r['hindsight'][0]:g} ({r['hindsight'][1] * 100:.1f}%)"] for r in rows])
    best = min(rows, key=lambda r: r["eval_mean_relative_error_loss"])
    verdict = ("a larger projection does not lower the error: d is not what limits the estimate" if best["d"] ==
               fdim["d_affinity"] else f"d = {best['d']} is closer; the affinity still uses d = {fdim['d_affinity']}")
    return rows, f"""
**Is d the limit?** The same fine-tunes scored with features of other projection dimensions at the same θ* (λ chosen
again on the calibration subsets; truth: the seed mean on the selection fold, the rows those features hold): {verdict}.

{table}
"""


def differences(s: dict, out: dict) -> str:
    """Claim by claim: the papers' number, ours, and a verdict; then what the positive control shows instead."""
    f, m, ac = out["fidelity"], out["methods"], out["approx_claim"]
    sel, pc, st = out.get("selection"), out.get("positive_control"), out.get("stability")
    fr, f0 = f["this_run"], f["this_run_f0_baseline"]
    rows, verdicts = [], {}

    def claim(key: str, text: str, ours: str, verdict: str) -> None:
        verdicts[key] = verdict
        rows.append([text, ours, f"**{verdict}**"])

    last = out["approx"]["fresh_lora"][-1]
    claim("approximation", "first-order approximation < 1% error",
          f"θ*: ≤ {ac['max_mean_meta'] * 100:.2f}% at every scale (tiny moves, section 1); fresh LoRA: "
          f"{last['mean_rel_error'] * 100:.1f}% at scale {last['scale']}"
          + (f", < 1% up to {ac['holds_up_to_scale']}" if ac["holds_up_to_scale"] is not None else ""),
          "reproduced" if ac["max_mean_meta"] < CLAIM_APPROX_MAX and ac["max_mean_fresh"] < CLAIM_APPROX_MAX
          else "reproduced at θ*, partly at a fresh LoRA" if ac["max_mean_meta"] < CLAIM_APPROX_MAX else "not reproduced")
    beats_f0 = fr["mean_relative_error_loss"] < f0["mean_relative_error_loss"]
    claim("estimation", "estimates within 5% of real fine-tuning (ACL 2025; GradEx ~1%)",
          f"{fr['mean_relative_error_loss'] * 100:.1f}% mean / {fr['median_relative_error_loss'] * 100:.1f}% median "
          f"on {f['n_subsets']} subsets at λ = {f['lam']:g}; predicting no change: "
          f"{f0['mean_relative_error_loss'] * 100:.1f}% / {f0['median_relative_error_loss'] * 100:.1f}%; Spearman of "
          f"the loss change {fr['spearman_loss_change']:.2f}"
          + f" (truth: mean of {len(f['truth']['seeds'])} training seeds on ≈ {f['truth']['examples_per_dataset']:.0f} "
            f"test examples per dataset; against one seed alone "
            + ", ".join(f"{f['by_truth'][f'test/s{k}']['mean_relative_error_loss'] * 100:.1f}%"
                        for k in f["truth"]["seeds"])
            + (f"; two seeds of the same fine-tune differ by {f['truth_noise']['test']['mean_relative_difference_loss'] * 100:.1f}%"
               if f.get("truth_noise") else "") + ")",
          "reproduced" if fr["mean_relative_error_loss"] <= 0.05 and beats_f0 and fr["spearman_loss_change"] >= 0.5
          else "not reproduced" if not beats_f0 or fr["spearman_loss_change"] < 0.3 else "partly")
    claim("cost", f"{PAPER_SPEEDUP:.0f}× less cost than fine-tuning each subset",
          f"{f['speedup']:.0f}× for the {f['n_subsets']} fidelity subsets; ≈ {f['affinity_speedup']:.0f}× for the "
          f"{f['affinity_subsets']} subsets the affinity averages",
          ("reproduced (cost only: the estimates it buys are no better than no change)" if not beats_f0 else
           "reproduced") if f["affinity_speedup"] >= PAPER_SPEEDUP else "partly")
    e, gb = m["differences_pt"]["ensemble"], m["differences_pt"]["grouped + boosting vs QLoRA"]
    cost_e = m["cost"]["ensemble"]
    pc_txt = (f"; positive control: {pc['ensemble_minus_all_adapter'] * 100:+.0f} pt over one adapter on all at "
              f"{pc['flops_ratio']:.2f}× its FLOPs" if pc else "")
    claim("ensemble", "ensemble up to +10% over one QLoRA adapter for ~9% more FLOPs (ACL 2025)",
          f"ensemble {e:+.1f} pt, grouped + boosting {gb:+.1f} pt over one QLoRA adapter, at "
          f"{cost_e['relative_flops']:.2f}× the training FLOPs ({cost_e['relative_chain_flops']:.2f}× with θ* and "
          f"calibration){pc_txt}",
          ("not reproduced on the real suite; reproduced in the positive control" if pc and
           pc["ensemble_minus_all_adapter"] >= 0.05 else "not reproduced") if e < 3 else
          "partly" if e < 10 else "reproduced")
    if sel:
        vs_sim = {t: max(v["accuracy"][g]["mean"] for g in GRADEX) - max(v["accuracy"][b]["mean"] for b in SIMILARITY)
                  for t, v in sel["targets"].items() if all(b in v["accuracy"] for b in SIMILARITY)}
        mean_sim = float(np.mean(list(vs_sim.values()))) * 100 if vs_sim else float("nan")
        out["selection"]["gradex_minus_best_similarity_pt"] = {t: x * 100 for t, x in vs_sim.items()}
        src = f" ({sel['source']}, λ = {sel['lam']:g}, not rerun)" if sel.get("source", "this run") != "this run" else ""
        claim("selection", "GradEx selection up to +3.8% over similarity selection (GradEx)",
              "best GradEx − best similarity method: " + ", ".join(f"{t} {x * 100:+.1f} pt" for t, x in vs_sim.items())
              + f" (mean {mean_sim:+.1f} pt; seed std up to {sel['max_std_pt']:.1f} pt){src}",
              "reproduced" if mean_sim >= 3.8 else "partly" if mean_sim > sel["max_std_pt"] / 2 else
              "not reproduced (GradEx ahead on every target, within seed noise)"
              if vs_sim and min(vs_sim.values()) > 0 else "not reproduced")
    out["claims"] = verdicts
    real_gap = -m["differences_pt"]["one adapter per dataset"]
    control = "" if not pc else f"""
**Where the real suite shows no gain, the positive control shows the chain works when there is something to fix**
(section 7): {pc['n_datasets']} datasets, half of them label-swapped twins of the other half. One adapter on everything
must fight itself there, and it does (chance accuracy); the affinity between twins came out negative in
{pc['twin_affinity_negative']} of {pc['twin_pairs']} (pair, seed) cases, the partition {'separated every twin pair' if pc['twins_separated'] else
'did not separate every twin pair'}, and the ensemble beat the all-datasets adapter by
**{pc['ensemble_minus_all_adapter'] * 100:+.0f} pt at {pc['flops_ratio']:.2f}× its training FLOPs**. Why the real
suite differs: its datasets do not interfere much — one adapter on all beats one adapter per dataset by
{real_gap:.1f} pt, so pooling helps more than separating — and the transfer differences between them are small:
fine-tuning θ* on a subset moves a member's test loss by {f['mean_abs_real_change']:.3f} on average, and the estimate
resolves that move only in part (its error {f['mean_abs_error']:.3f}; loss-change Spearman
{fr['spearman_loss_change']:.2f}){'' if not st else
f"; the partition built on those differences changes under a bootstrap of the subsets (ARI {st['ari_rechosen']['mean']:.2f})"}.
A twin's swapped labels flip the sign of its gradient features, a signal far above that noise.
"""
    return f"""## Where we differ from the papers: claim by claim

{md_table(["the papers' claim", "this run", "verdict"], rows)}
{control}
Model, data and hardware differ from the papers' (`{s['model']}`, {s['args']['max_train_per_dataset']} training
examples per dataset, fp32 weights with TF32 matmuls), so "not reproduced" means not at this scale.
"""


def reproduce(s: dict) -> str:
    gpu = s["machine"].get("gpu", s["device"])
    return f"""## Reproduce

```bash
# render this report from the committed JSONs (CPU, seconds)
.venv/bin/python benchmarks/report.py
# the GPU run (about {out_minutes(s)} min of stages on one {gpu}), through the device tool after the park calls
# (benchmarks/README.md, "The GPU run"): the shared stages, then the seeds as parallel processes (+ approx,
# stability in a fourth); suite_cuda.json comes back in the call's files
LIMIT=200 bash benchmarks/gpu/remote.sh run --only approx
LIMIT=330 bash benchmarks/gpu/remote.sh suite3    # and again (LIMIT=470) until every seed is done
# the committed fidelity (session 6, a fresh machine with the shared stages parked): the truth's three training seeds
# as parallel processes, then the features of the test split, the fidelity and the feature-dimension sweep; and the
# selection stage's seeds; merged into suite_cuda.json with benchmarks/merge_stages.py (see its provenance)
LIMIT=560 bash benchmarks/gpu/remote.sh fid3
LIMIT=500 bash benchmarks/gpu/remote.sh run --seeds 0 --only fidelity --truth-seeds 0 1 2 --sweep-d 400 800
LIMIT=430 bash benchmarks/gpu/remote.sh sel3
# the committed run's stability stage ran on the CPU, from the work folder the calls returned (work.tgz)
.venv/bin/python benchmarks/suite.py --device cpu --data <full pack> --work <unpacked work.tgz> --seeds 0 1 2 \\
    --only all methods approx stability --out /tmp/suite_cpu.json
# or everything in one process on any GPU machine with network, then render
.venv/bin/python benchmarks/report.py --run -- --device cuda --data <full pack>
```

Getting the data pack and the model onto a machine without network, and resuming across time limits:
[benchmarks/README.md, "The GPU run"](README.md#the-gpu-run). The speed benchmarks have their own commands in
[benchmarks/README.md](README.md).
"""


def out_minutes(s: dict) -> int:
    """GPU minutes summed over stages; the stability stage runs on the CPU afterwards."""
    return round(sum(v.get("stage_seconds", 0.0) for k, v in s.items() if isinstance(v, dict) and k != "stability")
                 / 60)


# ------------------------------------------------------------------------------------------------- main


def render(suite: Path, results: Path, out_dir: Path) -> dict:
    """Write out_dir/REPORT.md, out_dir/report/*.png and out_dir/report/summary.json; return the summary."""
    s = json.loads(suite.read_text())
    old = json.loads((results / "estimation_fidelity_cuda.json").read_text())
    sel, sel_src = s, None  # the selection experiment: this run's, else the earlier H100 run's (clearly labelled)
    if not seeds_of(s, "selection") and (results / EARLIER).exists():
        sel, sel_src = json.loads((results / EARLIER).read_text()), EARLIER
    fig = out_dir / "report"
    fig.mkdir(parents=True, exist_ok=True)
    summary: dict = {}
    md = [header(s, summary), approx_section(s, fig, summary), fidelity_section(s, old, fig, summary, results, suite.with_suffix('')),
          affinity_section(s, fig, summary), methods_section(s, fig, summary), memory_section(results, summary),
          selection_section(sel, fig, summary, sel_src) if seeds_of(sel, "selection") else "",
          speed_section(results, s, summary), positive_control_section(results, fig, summary),
          differences(s, summary), reproduce(s)]
    (out_dir / "REPORT.md").write_text(reflow("\n".join(md)).rstrip() + "\n")
    (fig / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True, default=float) + "\n")
    return summary


def print_table(summary: dict) -> None:
    """A short headline table on stdout."""
    m, f, e = summary["methods"], summary["fidelity"], summary["speed"]["estimation"]
    print(f"{'method':<30}{'mean acc %':>14}{'FLOPs vs all':>14}")
    for lab, v in m["mean_accuracy"].items():
        print(f"{lab:<30}{v['mean'] * 100:>8.1f} ± {v['std'] * 100:<4.1f}{m['cost'][lab]['relative_flops']:>13.2f}×")
    print(f"estimation at θ*: {f['this_run']['mean_relative_error_loss'] * 100:.1f}% mean rel. loss error "
          f"(f=f0: {f['this_run_f0_baseline']['mean_relative_error_loss'] * 100:.1f}%, fresh LoRA: "
          f"{f['earlier_fresh_lora']['mean_relative_error_loss'] * 100:.0f}%), speedup {f['speedup']:.1f}× "
          f"for {f['n_subsets']} subsets")
    print(f"selection: GradEx best on {summary['selection']['gradex_wins']}/{len(summary['selection']['targets'])} "
          f"targets; solver {e['speedup_vs_reference']:.0f}× / {e['speedup_vs_reference_analytic_jac']:.0f}× vs the "
          f"papers' BFGS")


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []  # everything after -- goes to suite.py
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", action="store_true", help="run benchmarks/suite.py (args after --) first")
    p.add_argument("--suite", type=Path, default=None, help="suite JSON (default: results/suite_cuda.json, or "
                   "what --run wrote)")
    p.add_argument("--results", type=Path, default=RESULTS, help="folder with the other result JSONs")
    p.add_argument("--out", type=Path, default=HERE, help="writes OUT/REPORT.md and OUT/report/")
    a = p.parse_args(own)
    suite = a.suite or a.results / "suite_cuda.json"
    if a.run:
        sys.path.insert(0, str(HERE))
        import suite as suite_mod  # heavy (torch); only when running
        res = suite_mod.main(extra)
        sargs = suite_mod.parse_args(extra)
        suite = a.suite or sargs.out or HERE / "results" / f"suite_{res['device']}.json"
    summary = render(suite, a.results, a.out)
    print_table(summary)
    print(f"wrote {a.out / 'REPORT.md'} and {a.out / 'report'}/")
    return summary


if __name__ == "__main__":
    main()
