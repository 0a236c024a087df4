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
}
GRADEX = ("random_ensemble", "forward_selection")  # the selection methods that use GradEx estimates


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
    gpu_s = sum(v.get("stage_seconds", 0.0) for v in s.values() if isinstance(v, dict))
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

**What was run** (`benchmarks/suite.py`, {'complete' if s.get('complete') else 'INCOMPLETE (cut short)'}): on one
{out['run']['gpu']} (torch {s['machine'].get('torch', '?')}), model `{s['model']}` ({prec}); the
`{a['preset']}` preset's {len(sizes)} datasets ({', '.join(sizes)}), capped at {a['max_train_per_dataset']} train /
{a['max_val_per_dataset']} validation / {a['max_test_per_dataset']} test examples each (actual: {rng('train')} /
{rng('val')} / {rng('test')}). LoRA r {tc['r']}, α {tc['alpha']}, on {', '.join(tc['target_modules'])}; lr {tc['lr']}
({tc['lr_schedule']}, warmup {tc['warmup_ratio']}), {tc['epochs']} epochs, batch {tc['batch_size']}, max length
{tc['max_length']}. Gradient features d = {a['d']}, λ = {a['lam']}. Seeds {', '.join(map(str, a['seeds']))}
(the seed-0 adapter on all datasets is also the meta-initialization θ*). Selection targets: {', '.join(a['targets'])}.
Total stage time on the GPU: {gpu_s / 60:.0f} min.

Reproduce: `.venv/bin/python benchmarks/report.py --run -- --device cuda --data <full pack>` (how to get the pack and
the model onto the GPU machine: [benchmarks/README.md, "The GPU run"](README.md#the-gpu-run)).
"""


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


def fidelity_section(s: dict, old: dict, fig: Path, out: dict) -> str:
    fd = s["fidelity"]
    p = pd.DataFrame(fd["pairs"])
    scatter_chart({"GradEx estimate at θ*": (p["true_loss"], p["est_loss"]),
                   "θ* unchanged (f = f0)": (p["true_loss"], p["zero_shot_loss"])}, fig / "fidelity.png",
                  title=f"Estimated vs real fine-tuned validation loss ({len(p)} pairs)",
                  xlabel="true loss after fine-tuning from θ*", ylabel="estimated loss")
    keys = ("mean_relative_error_loss", "median_relative_error_loss", "spearman_loss", "mean_abs_error_accuracy",
            "spearman_loss_change")
    zs, ozs = fd["zero_shot_baseline"], old["zero_shot_baseline"]
    # the earlier run stores no change-Spearman for its baseline: f = f0 predicts no change at all
    variants = {f"GradEx at meta-init θ* (this run, λ = {fd['lam']})": fd, "θ* unchanged, f = f0 (this run)": zs,
                f"GradEx at fresh LoRA (earlier run, λ = {old['lam']})": old,
                "base + fresh LoRA unchanged (earlier run)": ozs}
    rows = [[name] + [g3(v[k]) if k in v else "—" for k in keys] for name, v in variants.items()]
    n, t = fd["n_subsets"], old["timing"]
    ft1, est1 = fd["finetune_s"] / n, fd["estimate_s"] / n
    # the number of subsets K at which K·ft1 / (extract + K·est1) reaches the paper's speedup
    k_paper = PAPER_SPEEDUP * fd["extract_s"] / (ft1 - PAPER_SPEEDUP * est1)
    aff = s["affinity"]
    aff_ft = aff["n_subsets"] * ft1  # at the fidelity runs' per-subset cost (they were size 3; affinity mixes 1–3)
    aff_speed = aff_ft / (fd["extract_s"] + aff["estimate_seconds"])
    lam_best = min((r for r in fd["lam_table"] if "eval" in r), key=lambda r: r["eval"]["mean_relative_error_loss"])
    gain = 1 - fd["mean_relative_error_loss"] / zs["mean_relative_error_loss"]
    lam_note = ("that is also the best grid value in hindsight on the reported subsets" if lam_best["lam"] == fd["lam"]
                else f"the hindsight-best grid value on the reported subsets is {lam_best['lam']} "
                     f"({lam_best['eval']['mean_relative_error_loss'] * 100:.1f}%)")
    out["fidelity"] = {"this_run": {k: fd[k] for k in keys}, "this_run_f0_baseline": zs, "lam": fd["lam"],
                       "earlier_fresh_lora": {k: old[k] for k in keys}, "earlier_f0_baseline": ozs,
                       "earlier_lam": old["lam"], "earlier_lr": old["lr"],
                       "earlier_batch_size": old["finetune"]["batch_size"], "n_subsets": n, "n_pairs": len(p),
                       "finetune_s": fd["finetune_s"],
                       "extract_s": fd["extract_s"], "estimate_s": fd["estimate_s"], "speedup": fd["speedup"],
                       "finetune_s_per_subset": ft1, "estimate_s_per_subset": est1, "marginal_speedup": ft1 / est1,
                       "subsets_for_paper_speedup": k_paper, "earlier_speedup": old["speedup"],
                       "earlier_finetune_s_per_subset": t["finetune_s_per_subset"],
                       "affinity_subsets": aff["n_subsets"], "affinity_estimate_s": aff["estimate_seconds"],
                       "affinity_equivalent_finetune_s": aff_ft, "affinity_speedup": aff_speed,
                       "error_reduction_vs_f0": gain, "lam_hindsight_best": lam_best["lam"],
                       "lam_hindsight_best_error": lam_best["eval"]["mean_relative_error_loss"]}
    return f"""## 2. Estimated vs real fine-tuning

Paper: {CLAIM_FIDELITY}

![estimate vs true loss](report/fidelity.png)

{n} random size-{len(p['members'][0])} subsets (λ picked on {s['args']['n_calibration']} further calibration
subsets, not reported), each
really fine-tuned from θ* with the run's recipe; one point per (subset, member dataset) = {len(p)} pairs, validation
loss mean log(1+exp(−f)).

{md_table(['estimate', 'mean rel. loss error', 'median', 'Spearman (loss)', 'mean abs. accuracy error',
           'Spearman of the change'], rows)}

Reading: at the meta-initialization the estimate is **{fd['mean_relative_error_loss'] * 100:.1f}% mean /
{fd['median_relative_error_loss'] * 100:.1f}% median** relative loss error (ACL 2025: under 5%; GradEx: ~1%) with
Spearman
{fd['spearman_loss']:.2f}. Part of that comes from θ* itself: "nothing changes" is already within
{zs['mean_relative_error_loss'] * 100:.1f}%, so GradEx {'removes' if gain >= 0 else 'adds'} {abs(gain) * 100:.0f}% of
that error, and the
estimated *change* ranks {strength(fd['spearman_loss_change'])} with the real one (Spearman
{fd['spearman_loss_change']:.2f}). Around a
fresh LoRA (the earlier run: lr {old['lr']}, batch {old['finetune']['batch_size']}, fine-tunes from the base model)
the same estimator was off by {old['mean_relative_error_loss'] * 100:.0f}% (Spearman {old['spearman_loss']:.2f}):
**the meta-initialization is what makes the linearization usable**, as GradEx prescribes (ACL 2025 linearizes at the
base model: the setting of the "fresh LoRA" rows). λ: calibration chose
{fd['lam']}; {lam_note}.

Cost, for these {n} subsets: real fine-tuning {fd['finetune_s']:.0f} s vs features {fd['extract_s']:.1f} s (one-off)
+ estimation {fd['estimate_s']:.3f} s → **{fd['speedup']:.1f}×** (earlier fresh-LoRA run: {old['speedup']:.1f}×, at
{t['finetune_s_per_subset']:.1f} s of fine-tuning per subset vs {ft1:.1f} s here). Per extra subset: {ft1:.1f} s of
fine-tuning vs
{est1 * 1000:.1f} ms of estimation ({ft1 / est1:,.0f}×). The feature pass is paid once, so the speedup grows with the
number of subsets: the paper's {PAPER_SPEEDUP:.0f}× would take ≈ {k_paper:.0f} subsets at this cost, and the affinity
stage's {aff['n_subsets']} subsets (estimated in {aff['estimate_seconds']:.1f} s) would have needed ≈
{aff_ft / 3600:.1f} h of fine-tuning → ≈ {aff_speed:.0f}×.
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
"""


def methods_section(s: dict, fig: Path, out: dict) -> str:
    seeds = seeds_of(s, "methods")
    names = list(s["sizes"])
    acc: dict[str, dict[str, list[float]]] = {lab: {} for lab in METHODS}  # label → dataset → per-seed values
    for seed in seeds:
        for r in s[f"methods_s{seed}"]["rows"]:
            for lab, key in METHODS.items():
                if key != "zero_shot":
                    acc[lab].setdefault(r["dataset"], []).append(r[key])
    acc["zero-shot"] = {d: [v] for d, v in s["zero_shot"]["accuracy"].items()}  # deterministic: one value
    per_seed_mean = {lab: np.mean([[v[d][i] for d in names] for i in range(len(next(iter(v.values()))))], axis=1)
                     for lab, v in acc.items()}
    avg = {lab: mean_std(x) for lab, x in per_seed_mean.items()}
    cell = lambda lab, d: (f"{acc[lab][d][0] * 100:.1f}" if lab == "zero-shot"  # noqa: E731
                           else pm(mean_std(acc[lab][d])))
    table = md_table(["dataset"] + list(METHODS), [[d] + [cell(lab, d) for lab in METHODS] for d in names]
                     + [["**mean**"] + [f"**{avg[lab][0] * 100:.1f}**" if lab == "zero-shot" else f"**{pm(avg[lab])}**"
                                        for lab in METHODS]])
    accuracy_table_png({lab: {d: float(np.mean(v[d])) * 100 for d in names} for lab, v in acc.items()},
                       fig / "accuracy.png", title=f"Test accuracy (%), mean over seeds {seeds}", fmt="{:.1f}")

    # training cost: the TrainResults behind each method (per seed; FLOPs are seed-independent, time is not)
    def runs_of(runs: dict, key: str) -> list[dict]:
        pick = {"one_adapter_all": ["all"], "one_adapter_all_qlora": ["all_qlora"],
                "one_per_dataset": [k for k in runs if k.startswith("single_")],
                "grouped": [k for k in runs if k.startswith("group_")]}
        pick["grouped_boosted"] = pick["grouped"] + [k for k in runs if k.startswith("boost_")]
        pick["ensemble"] = pick["grouped_boosted"]  # the ACL ensemble: group + boosting adapters only
        return [runs[k] for k in pick.get(key, [])]
    cost = {}
    for lab, key in METHODS.items():
        per = [runs_of(s[f"methods_s{seed}"]["runs"], key) for seed in seeds]
        cost[lab] = {"flops": float(np.mean([sum(r["flops"] for r in rr) for rr in per])),
                     "peak_mib": max((r["peak_memory_bytes"] for rr in per for r in rr), default=0) / 2**20,
                     "seconds": float(np.mean([sum(r["seconds"] for r in rr) for rr in per])),
                     "n_runs": len(per[0])}
    base = cost["one adapter on all (LoRA)"]["flops"]
    cost_rows = [[lab, c["n_runs"], f"{c['flops'] / 1e12:.0f}", f"{c['flops'] / base:.2f}×",
                  f"{c['peak_mib']:.0f}" if c["peak_mib"] else "—", f"{c['seconds']:.0f}"] for lab, c in cost.items()]
    cost_table = md_table(["method", "runs", "training TFLOPs", "vs one adapter on all", "peak GPU memory (MiB)",
                           "training s"], cost_rows)
    # with the all-datasets adapter as an extra candidate (the named option, last weight): how much weight it takes
    share = [r["weights_with_all"][-1] / sum(r["weights_with_all"]) for seed in seeds
             for r in s[f"methods_s{seed}"]["rows"] if sum(r.get("weights_with_all") or [0]) > 0]
    n_w = sorted({len(r["weights"]) for seed in seeds for r in s[f"methods_s{seed}"]["rows"]})
    n_ad = f"{n_w[0]}" if len(n_w) == 1 else f"{n_w[0]}–{n_w[-1]}"
    qlora, lora = "one adapter on all (QLoRA)", "one adapter on all (LoRA)"
    pairs = (("ensemble", qlora), ("grouped", lora), ("one adapter per dataset", lora),
             ("grouped + boosting", "grouped"))
    d = {k: avg[k][0] - avg[ref][0] for k, ref in pairs}
    d["ensemble vs LoRA"] = avg["ensemble"][0] - avg[lora][0]
    wins = sum(np.mean(acc["ensemble"][x]) > np.mean(acc[qlora][x]) for x in names)
    steps = {r["steps"] for seed in seeds for k, r in s[f"methods_s{seed}"]["runs"].items() if k.startswith("single_")}
    out["methods"] = {"seeds": seeds, "mean_accuracy": {lab: {"mean": m, "std": sd} for lab, (m, sd) in avg.items()},
                      "per_dataset": {lab: {x: dict(zip(("mean", "std"), mean_std(v[x]))) for x in names}
                                      for lab, v in acc.items()},
                      "cost": {lab: {**c, "relative_flops": c["flops"] / base} for lab, c in cost.items()},
                      "differences_pt": {k: v * 100 for k, v in d.items()}, "ensemble_wins_vs_qlora": int(wins),
                      "ensemble_weight_share_on_all_adapter": float(np.mean(share)) if share else 0.0,
                      "single_dataset_steps": sorted(steps)}
    mem_note = (" in this table, which counts the fp32 base the process keeps beside the 4-bit one; measured one "
                "base per process (below), QLoRA does save memory"
                if cost[qlora]["peak_mib"] >= 0.9 * cost[lora]["peak_mib"] else "")

    def sgn(x: float) -> str:
        return f"{x * 100:+.1f} pt"
    return f"""## 4. Accuracy and cost of the methods

Paper: {CLAIM_ENSEMBLE}

Test accuracy (%), mean ± std (ddof 1) over seeds {', '.join(map(str, seeds))}; zero-shot is deterministic. The
grouped adapters use section 3's partition; "grouped + boosting" adds a boosting adapter per group (kept only where it
lowers validation loss); the ensemble weights the group, boosting and all-datasets adapters per dataset, fit on
validation.

![accuracy table](report/accuracy.png)

{table}

Training cost per method (mean over seeds; FLOPs = 4·N·T + 6·N_lora·T from `ml/flops.py`, so QLoRA counts the same
FLOPs as LoRA; peak memory = max over the runs; the feature pass for the affinities,
{s['features']['seconds']:.0f} s, is not included):

{cost_table}

Reading: the ensemble is **{sgn(d['ensemble'])} over one QLoRA adapter** ({wins} of {len(names)} datasets higher) and
{sgn(d['ensemble vs LoRA'])} vs one LoRA adapter on all, at {cost['ensemble']['flops'] / base:.1f}× the FLOPs — not the
paper's "up to +10% for 9% more FLOPs". Grouped adapters are {sgn(d['grouped'])} vs one adapter on all, boosting
adds {sgn(d['grouped + boosting'])} to them, and one adapter per dataset is {sgn(d['one adapter per dataset'])}. The
validation-fitted ensemble weights put on average {np.mean(share) * 100:.0f}% of their mass on the all-datasets adapter
(of {n_ad} adapters per dataset). QLoRA trains
{cost[qlora]['seconds'] / cost[lora]['seconds']:.1f}× slower than LoRA here (4-bit dequantization). Plausible reasons
for the gap:

- Scale: `{s['model']}` with {s['args']['max_train_per_dataset']} training examples per dataset and
  {s['train_config']['epochs']} epochs; the papers use larger models and datasets, where tasks can interfere more and
  a single adapter has less spare capacity.
- With so little data per task, pooling everything is the strongest regularizer: a per-dataset adapter gets
  {'/'.join(map(str, sorted(steps)))} steps and underfits, and a group sees fewer examples than "all".
- The groups come from estimates (section 2: {s['fidelity']['mean_relative_error_loss'] * 100:.1f}% error, change
  Spearman {s['fidelity']['spearman_loss_change']:.2f}), not from fine-tuning every combination.
- Cost accounting: the grouped adapters alone cost {cost['grouped']['flops'] / base:.2f}× one adapter (each example
  is trained on once, as in the paper's grouping); our ensemble adds a boosting adapter per boosted group and the
  all-datasets adapter (which is also θ*), hence {cost['ensemble']['flops'] / base:.1f}×. QLoRA peaks at
  {cost[qlora]['peak_mib']:.0f} vs {cost[lora]['peak_mib']:.0f} MiB for LoRA{mem_note}.
"""


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


def selection_section(s: dict, fig: Path, out: dict) -> str:
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
    return f"""## 5. Auxiliary dataset selection

Paper: {CLAIM_SELECTION}

Per target: each method picks up to {s['choice']['targets'][next(iter(res))]['settings']['top_k']} auxiliary datasets
(GradEx: `random_ensemble` = thresholded scores over {s['choice']['targets'][next(iter(res))]['settings']['n_subsets']}
estimated random subsets, `forward_selection` = greedy on the estimated loss; baselines: none, all, gradient cosine,
hidden-state cosine); target + auxiliaries are then fine-tuned with seeds {', '.join(map(str, seeds))} and scored on
the target's test split. "est. target loss" is GradEx's estimate of that choice (lower = predicted better).

![selection gains](report/selection.png)

{chr(10).join(p + chr(10) for p in parts)}
Reading: a GradEx method has the best mean on {wins} of {len(res)} targets. Seed std reaches {max_sd:.1f} pt, so
differences of a point or two are within noise. GradEx's estimated loss orders the methods
{strength(mean_rho)} by their real accuracy (mean Spearman over targets {mean_rho:.2f}), in line with section 2's
change correlation ({s['fidelity']['spearman_loss_change']:.2f}).
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


def differences(s: dict, out: dict) -> str:
    f, m, sel, ac = out["fidelity"], out["methods"], out["selection"], out["approx_claim"]
    last = out["approx"]["fresh_lora"][-1]
    approx_line = (f"matches the papers' < 1% up to scale {ac['holds_up_to_scale']}; at {last['scale']} the "
                   f"fresh LoRA's mean is {last['mean_rel_error'] * 100:.1f}% "
                   f"(median {last['median_rel_error'] * 100:.1f}%), at θ* at most {ac['max_mean_meta'] * 100:.2f}%"
                   if ac["holds_up_to_scale"] is not None else
                   f"above the papers' 1% (fresh LoRA up to {ac['max_mean_fresh'] * 100:.1f}%)")
    sel_diffs = ", ".join(f"{t} {v['gradex_minus_best_baseline_pt']:+.1f} pt" for t, v in sel["targets"].items())
    return f"""## Where we differ from the papers and why

- **Approximation error**: {approx_line}.
- **Estimation error**: {f['this_run']['mean_relative_error_loss'] * 100:.1f}% mean (median
  {f['this_run']['median_relative_error_loss'] * 100:.1f}%) relative loss error at θ* vs the papers' < 5% (ACL 2025)
  and ~1% (GradEx); linearized at the base model with a fresh LoRA it was
  {f['earlier_fresh_lora']['mean_relative_error_loss'] * 100:.0f}%. Only {f['n_subsets']} subsets and {f['n_pairs']}
  pairs, and the "nothing changes" baseline is already at
  {f['this_run_f0_baseline']['mean_relative_error_loss'] * 100:.1f}%, so much of the agreement comes from starting
  at θ*.
- **Speedup**: {f['speedup']:.1f}× for {f['n_subsets']} subsets vs the papers' 30–105×; the feature pass is a fixed
  cost, so the ratio grows with the number of subsets (≈ {f['subsets_for_paper_speedup']:.0f} for 105×; ≈
  {f['affinity_speedup']:.0f}× for the affinity stage's {f['affinity_subsets']} subsets).
- **Ensemble**: {m['differences_pt']['ensemble']:+.1f} pt over QLoRA at {m['cost']['ensemble']['relative_flops']:.1f}×
  the FLOPs, vs the paper's up to +10% for 9% more. `{s['model']}` with {s['args']['max_train_per_dataset']}
  examples per dataset and {s['train_config']['epochs']} epochs gains most from pooling everything: grouped adapters
  ({m['differences_pt']['grouped']:+.1f} pt vs one adapter on all) and per-dataset adapters
  ({m['differences_pt']['one adapter per dataset']:+.1f} pt) see less data, and the ensemble's fitted weights lean on
  the all-datasets adapter ({m['ensemble_weight_share_on_all_adapter'] * 100:.0f}% of the mass). The grouped adapters
  alone cost {m['cost']['grouped']['relative_flops']:.2f}× one adapter; the boosting adapters and the all-datasets
  adapter in the ensemble bring it to {m['cost']['ensemble']['relative_flops']:.1f}×.
- **Auxiliary selection**: a GradEx method has the best mean on {sel['gradex_wins']} of {len(sel['targets'])} targets
  (best GradEx − best baseline: {sel_diffs}), within seed noise (std up to {sel['max_std_pt']:.1f} pt over
  {len(sel['seeds'])} seeds), vs the paper's up to +3.8% over similarity selection; the paper evaluates larger models
  on instruction and chain-of-thought data.
- **Precision**: fp32 weights with TF32 matmuls; the papers' runs
  are not directly comparable in model, data or hardware.
"""


def reproduce(s: dict) -> str:
    gpu = s["machine"].get("gpu", s["device"])
    return f"""## Reproduce

```bash
# render this report from the committed JSONs (CPU, seconds)
.venv/bin/python benchmarks/report.py
# run the whole suite on a GPU machine, then render (about {out_minutes(s)} min of stages on one {gpu})
.venv/bin/python benchmarks/report.py --run -- --device cuda --data <full pack>
```

Getting the data pack and the model onto a machine without network, and resuming across time limits:
[benchmarks/README.md, "The GPU run"](README.md#the-gpu-run). The speed benchmarks have their own commands in
[benchmarks/README.md](README.md).
"""


def out_minutes(s: dict) -> int:
    return round(sum(v.get("stage_seconds", 0.0) for v in s.values() if isinstance(v, dict)) / 60)


# ------------------------------------------------------------------------------------------------- main


def render(suite: Path, results: Path, out_dir: Path) -> dict:
    """Write out_dir/REPORT.md, out_dir/report/*.png and out_dir/report/summary.json; return the summary."""
    s = json.loads(suite.read_text())
    old = json.loads((results / "estimation_fidelity_cuda.json").read_text())
    fig = out_dir / "report"
    fig.mkdir(parents=True, exist_ok=True)
    summary: dict = {}
    md = [header(s, summary), approx_section(s, fig, summary), fidelity_section(s, old, fig, summary),
          affinity_section(s, fig, summary), methods_section(s, fig, summary), memory_section(results, summary),
          selection_section(s, fig, summary),
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
