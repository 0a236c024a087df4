"""Time projected per-example LoRA gradients: ours (hooks, one forward + one backward per batch) against the
floor (a plain forward + backward of the summed outputs) and the papers' reference (autograd.grad per example,
flatten, copy to host, dense ±1/√d numpy projection), all in one process on the same LoRA model and batch.

    python benchmarks/gradient_features.py --model smollm2-135m-instruct --device cpu --repeats 3
    python benchmarks/gradient_features.py --model llama-8b --device cuda --dtype bfloat16

llama-1b / llama-8b are randomly initialised LlamaConfig models of those shapes (no weights needed: the
timings are real even though the outputs are not). Writes benchmarks/results/gradient_features_<device>_<model>.json.

--pipeline: the pipeline's own pass instead, on real prompts (--data, a data pack folder): `compute_features` as
the gradient_features asset calls it (one call per dataset, train + validation, batched by a token budget, the
zero-shot log-probs from the same pass) against the floor, a plain forward + backward of Σ f into the LoRA .grad
over the same prompts in length-sorted batches of B examples, at the best B of a sweep; same process, same model.
Writes features_examples_per_s and features_ratio_to_best_floor (= floor examples/s at its best B / features
examples/s; ≤ 1.11 means ≥ 0.9x the floor) into benchmarks/results/pipeline_<device>.json (other keys kept):

    python benchmarks/gradient_features.py --pipeline --device cuda --data /root/data
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

from grouplora.ml.features import GradientHooks, batch_features
from grouplora.ml.lora import add_lora, lora_weights
from grouplora.ml.model import label_token_ids, load_base_model
from grouplora.ml.projection import Projection
from grouplora.ml.scoring import label_logits, log_odds, token_batches

LLAMA_SHAPES = {  # Llama 3.2 1B and Llama 3.1 8B
    "llama-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),
    "llama-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False),
}
REF_MATRIX_BUDGET = 8 << 30  # bytes of host memory the reference's dense D x d matrix may take


def build_model(name: str, dtype: torch.dtype, device: str):
    if name in LLAMA_SHAPES:
        from transformers import LlamaConfig, LlamaForCausalLM
        cfg = LlamaConfig(**LLAMA_SHAPES[name], max_position_embeddings=4096, rope_theta=500000.0)
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM._from_config(cfg, dtype=dtype)
        return model.eval(), None
    return load_base_model(name, dtype=dtype, device=device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fns: dict, device: str, warmup: int, repeats: int) -> dict[str, list[tuple[float, float]]]:
    """(wall, cpu) seconds per call of each fn; the fns take turns in every round, so drifting load (shared
    CPUs, clocks) hits them alike. cpu = process_time, the CPU seconds of all our threads."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    out: dict[str, list[tuple[float, float]]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            out[k].append((time.perf_counter() - t0, time.process_time() - c0))
    return out


def dense_sign_matrix(D: int, d: int, seed: int = 0) -> np.ndarray:
    """The reference's ±1/√d projection matrix, D x d float32 on the host."""
    rng = np.random.default_rng(seed)
    m = np.empty((D, d), dtype=np.float32)
    for i in range(0, D, 1 << 16):  # in blocks: int8 signs, then scale, to keep the peak small
        blk = rng.integers(0, 2, size=(min(1 << 16, D - i), d), dtype=np.int8)
        m[i: i + len(blk)] = (2 * blk.astype(np.float32) - 1) / np.sqrt(d)
    return m


def movie_prompts(n: int) -> tuple[list[str], list[int]]:
    """n real movie-review snippets (Pang & Lee, human-rated in the VADER paper), balanced, clear-cut."""
    from grouplora.ml.archives import ArchiveSpec, fetch_archive, read_member
    a = fetch_archive(ArchiveSpec("vaderSentiment", "3.3.2", "sdist"))
    inner = tarfile.open(fileobj=io.BytesIO(read_member(a, "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz")))
    rows = inner.extractfile("hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt").read().decode("latin-1")
    pos, neg = [], []
    for line in rows.splitlines():
        _, score, text = line.split("\t", 2)
        s = float(score)
        if abs(s) >= 1.5:
            (pos if s > 0 else neg).append(text.replace("''", '"'))
    prompts, labels = [], []
    for p, q in zip(pos[: n // 2], neg[: n // 2]):
        prompts += [f"Review: {p}\nSentiment:", f"Review: {q}\nSentiment:"]
        labels += [0, 1]
    return prompts, labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct",
                    choices=["smollm2-135m-instruct", "llama-1b", "llama-8b", "tiny"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--d", type=int, default=200)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--targets", default="q_proj,v_proj")
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bfloat16 on cuda, else float32)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--ref-repeats", type=int, default=0, help="repeats of the (slow) reference; 0: --repeats")
    ap.add_argument("--approx", type=int, default=0,
                    help="also measure first-order approximation errors and projection distortion on N real "
                         "movie reviews (real models only)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: time by process_time, for CPUs shared with other jobs")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--pipeline", action="store_true", help="time the pipeline's compute_features on --data")
    ap.add_argument("--data", type=Path, default=None, help="a data pack folder (pipeline mode)")
    ap.add_argument("--budgets", default="", help="pipeline mode: token budgets to try (default by device)")
    ap.add_argument("--floor-batches", default="", help="pipeline mode: floor batch sizes (default by device)")
    ap.add_argument("--max-length", type=int, default=256, help="pipeline mode: BaseModelResource.max_length")
    ap.add_argument("--max-examples", type=int, default=0, help="pipeline mode: cap examples per dataset (0: all)")
    args = ap.parse_args()
    if args.pipeline:
        return pipeline(args)

    dev = args.device
    dtype = getattr(torch, args.dtype or ("bfloat16" if dev.startswith("cuda") else "float32"))
    t0 = time.perf_counter()
    model, tok = build_model(args.model, dtype, dev)
    load_s = time.perf_counter() - t0
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    pm = add_lora(model, r=args.r, alpha=2 * args.r, target_modules=tuple(args.targets.split(",")))
    proj = Projection.for_model(pm, d=args.d, seed=0)
    vocab = model.config.vocab_size
    lab = torch.tensor(label_token_ids(tok, [" positive", " negative"]) if tok else [100, 200], device=dev)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, args.seq_len), generator=g).to(dev)
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 2, (args.batch,), generator=g).to(dev)
    params = [lora_weights(pm)[n] for n in proj.names]  # B only for a fresh LoRA
    all_lora = [p for p in pm.parameters() if p.requires_grad]

    def floor():  # what a training step costs: forward, then backward of Σ f into every LoRA weight's .grad
        f = log_odds(label_logits(pm, ids, mask, lab), labels)
        f.sum().backward()
        for p in all_lora:
            p.grad = None

    def floor_same_inputs():  # the same pass ours makes, without the hooks
        f = log_odds(label_logits(pm, ids, mask, lab), labels)
        torch.autograd.grad(f.sum(), params)

    hooks = GradientHooks(pm, proj)
    ours_out = {}

    def ours():
        ours_out["f"], ours_out["phi"] = batch_features(pm, hooks, ids, mask, labels, lab)

    # The reference, as in the papers' code (GradEx's fast_estimate_compute_gradients.py): one batched forward,
    # then per example autograd.grad(retain_graph=True) over every trainable LoRA weight, flatten, .cpu(), and
    # a numpy product with a dense ±1/√d D x d host matrix (made once, outside the timing; float32 here where
    # the paper's code used float64: kinder to the reference).
    D, D_ref = proj.dim, sum(p.numel() for p in all_lora)
    ref_rows = min(D_ref, REF_MATRIX_BUDGET // (4 * args.d))
    ref_scaled = ref_rows < D_ref
    t1 = time.perf_counter()
    R = dense_sign_matrix(ref_rows, args.d)
    ref_matrix_s = time.perf_counter() - t1

    def reference():
        f = log_odds(label_logits(pm, ids, mask, lab), labels)
        for b in range(args.batch):
            gs = torch.autograd.grad(f[b], all_lora, retain_graph=True)
            g = torch.cat([x.reshape(-1) for x in gs]).float().cpu().numpy()
            g[:ref_rows] @ R  # if the matrix did not fit, time a block and scale (below)

    # A stronger loop baseline: one forward + one backward per example (batch of 1), only the matrices we
    # project, and one host matmul per batch.
    R_loop = R[:D] if D <= ref_rows else dense_sign_matrix(D, args.d)
    loop_grads: list[torch.Tensor] = []

    def per_example_loop():
        host = []
        for b in range(args.batch):
            f = log_odds(label_logits(pm, ids[b: b + 1], mask[b: b + 1], lab), labels[b: b + 1])
            gs = torch.autograd.grad(f.sum(), params)
            host.append(torch.cat([x.reshape(-1) for x in gs]).float().cpu().numpy())
        if not loop_grads:
            loop_grads.append(torch.from_numpy(host[0]))
        np.stack(host) @ R_loop

    with torch.enable_grad():
        times = timed({"floor": floor, "floor_same_inputs": floor_same_inputs, "ours": ours,
                       "per_example_loop": per_example_loop}, dev, args.warmup, args.repeats)
        times |= timed({"reference": reference}, dev, min(args.warmup, 1), args.ref_repeats or args.repeats)
        if dev.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            ours()
            peak_ours = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            floor()
            peak_floor = torch.cuda.max_memory_allocated()
    if ref_scaled:  # the host projection part, scaled from the block we could hold to the full D rows
        gh = np.random.default_rng(1).standard_normal(ref_rows, dtype=np.float32)
        blk = timed({"blk": lambda: gh @ R}, "cpu", 1, 3)["blk"]
        extra = args.batch * (D_ref / ref_rows - 1)
        bw, bc = statistics.median(t[0] for t in blk), statistics.median(t[1] for t in blk)
        times["reference"] = [(w + extra * bw, c + extra * bc) for w, c in times["reference"]]
    hooks.remove()

    # correctness check outside the timing: our feature of example 0 vs projecting its autograd gradient
    sizes = [p.numel() for p in params]
    g0 = dict(zip(proj.names, [t.reshape(p.shape).to(dev) for t, p in zip(torch.split(loop_grads[0], sizes), params)]))
    phi_ref = proj.project(g0).cpu()
    check = float((ours_out["phi"][0].cpu() - phi_ref).norm() / phi_ref.norm())

    # wall-clock on a GPU; CPU seconds (process_time) where --clock cpu: on a CPU shared with other jobs the
    # wall time of identical runs varied 6x here, while the CPU seconds our threads used stayed put
    col = 1 if args.clock == "cpu" else 0
    med = {k: statistics.median(t[col] for t in v) for k, v in times.items()}
    tokens = args.batch * args.seq_len
    res = {
        "model": args.model, "device": dev,
        "device_name": torch.cuda.get_device_name() if dev.startswith("cuda") else platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": __import__("transformers").__version__, "peft": __import__("peft").__version__,
        "dtype": str(dtype).removeprefix("torch."), "batch": args.batch, "seq_len": args.seq_len, "d": args.d,
        "lora_r": args.r, "lora_targets": args.targets, "lora_matrices_projected": len(proj.names),
        "projected_dim_D": D, "model_load_s": round(load_s, 2),
        "floor_s": med["floor"], "floor_same_inputs_s": med["floor_same_inputs"], "ours_s": med["ours"],
        "reference_s": med["reference"], "per_example_loop_s": med["per_example_loop"],
        "tokens_per_s": tokens / med["ours"], "floor_tokens_per_s": tokens / med["floor"],
        "reference_tokens_per_s": tokens / med["reference"],
        "ratio_to_floor": med["ours"] / med["floor"],
        "ratio_to_floor_same_inputs": med["ours"] / med["floor_same_inputs"],
        "speedup_vs_reference": med["reference"] / med["ours"],
        "speedup_vs_per_example_loop": med["per_example_loop"] / med["ours"],
        "projection_bytes": proj.nbytes, "model_bytes": model_bytes,
        "projection_frac_of_model": proj.nbytes / model_bytes, "projection_checksum": proj.checksum(),
        "reference_dim_D": D_ref, "reference_matrix_bytes": D_ref * args.d * 4, "reference_matrix_make_s": round(ref_matrix_s, 2),
        "reference_projection_scaled": ref_scaled,
        "reference_note": ("as GradEx's code: one batched forward, autograd.grad(retain_graph=True) per example over "
                           "all trainable LoRA weights, flatten, .cpu(), per-example numpy product with a dense "
                           "±1/√d D x d float32 host matrix"
                           + (f"; the matrix did not fit in {REF_MATRIX_BUDGET >> 30} GiB: its product was timed "
                              f"on {ref_rows} of {D_ref} rows and scaled" if ref_scaled else "")),
        "per_example_loop_note": "forward + autograd.grad per example (batch of 1) over the projected matrices "
                                 "only, .cpu(), one numpy product per batch with a dense D x d host matrix",
        "check_rel_diff_vs_autograd": check,
        "clock": ("process_time: CPU seconds of all threads (tokens_per_s = tokens per CPU-second)"
                  if args.clock == "cpu" else "wall-clock (perf_counter, synchronised)"), "stat": "median",
        "repeats": args.repeats, "ref_repeats": len(times["reference"]), "warmup": args.warmup,
        "wall_s": {k: [round(t[0], 5) for t in v] for k, v in times.items()},
        "cpu_s": {k: [round(t[1], 5) for t in v] for k, v in times.items()},
    }
    if dev.startswith("cuda"):
        res["peak_mem_ours_bytes"], res["peak_mem_floor_bytes"] = peak_ours, peak_floor
    if args.approx and tok is not None:
        res["approx"] = approx_report(pm, tok, args.approx, proj)

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gradient_features_{dev.split(':')[0]}_{args.model}.json"
    path.write_text(json.dumps(res, indent=2) + "\n")
    print(f"{args.model} on {res['device_name']} ({res['dtype']}), batch {args.batch} x {args.seq_len}, d={args.d}, "
          f"D={D:,}, {len(proj.names)} LoRA matrices")
    print(f"{'':22s}{'median s':>10s}{'tokens/s':>12s}{'vs floor':>10s}   ({args.clock} clock)")
    for k in ["floor", "floor_same_inputs", "ours", "per_example_loop", "reference"]:
        print(f"{k:22s}{med[k]:10.4f}{tokens / med[k]:12.0f}{med[k] / med['floor']:10.2f}")
    print(f"speedup vs reference {res['speedup_vs_reference']:.1f}x; projection {proj.nbytes / 2**20:.2f} MiB = "
          f"{100 * res['projection_frac_of_model']:.2f}% of the model ({model_bytes / 2**20:.0f} MiB); "
          f"check vs autograd {check:.1e} -> {path}")
    if "approx" in res:
        print(json.dumps(res["approx"], indent=2))


def pipeline_prompts(folder: Path, max_examples: int = 0) -> list[tuple[str, list[str], list[int], list[str]]]:
    """[(dataset, train + validation prompts, labels, label words)] of a data pack, as the dataset asset renders them."""
    from grouplora.ml.data_format import classes_for, discover, load_dataset, load_suite_config
    cfg = load_suite_config(folder / "datasets.yaml")
    out = []
    for name, path in sorted(discover(folder).items()):
        c = cfg.for_dataset(name)
        df = load_dataset(path, c)
        df = df[df["split"].isin(["train", "validation"])]
        if max_examples:
            df = df.head(max_examples)
        out.append((name, df["prompt"].tolist(), df["label_id"].tolist(), c.words_for(classes_for(df, c))))
    return out


def pipeline(args) -> None:
    """compute_features as the gradient_features asset runs it vs the forward+backward floor at its best batch."""
    from grouplora.ml.features import compute_features
    if args.data is None:
        raise SystemExit("--pipeline needs --data (a data pack folder: grouplora data build --preset full)")
    dev = args.device
    cuda = dev.startswith("cuda")
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    budgets = [int(b) for b in (args.budgets or ("4096,8192,16384,32768,65536" if cuda else "512,1024,2048")).split(",")]
    floor_bs = [int(b) for b in (args.floor_batches or ("16,32,64,128,256,512" if cuda else "8,16,32")).split(",")]
    t0 = time.perf_counter()
    model, tok = build_model(args.model, dtype, dev)
    load_s = time.perf_counter() - t0
    pm = add_lora(model, r=args.r, alpha=2 * args.r, target_modules=tuple(args.targets.split(",")))
    proj = Projection.for_model(pm, d=args.d, seed=0)
    sets = [(n, p, y, label_token_ids(tok, w)) for n, p, y, w in pipeline_prompts(args.data, args.max_examples)]
    n_ex = sum(len(p) for _, p, _, _ in sets)
    all_lora = [p for p in pm.parameters() if p.requires_grad]

    def features(budget: int):
        for _, prompts, labels, lab in sets:  # one call per dataset partition, as the asset makes them
            compute_features(pm, tok, prompts, labels, lab, proj, batch_size=None, max_tokens=budget,
                             max_length=args.max_length, return_logprobs=True)

    # The floor's batches are tokenized and on the device before the clock starts: a floor kinder than our pass.
    floor_data = {}
    for b in floor_bs:
        floor_data[b] = []
        for _, prompts, labels, lab in sets:
            y = torch.as_tensor(labels)
            lab_t = torch.as_tensor(lab, device=dev)
            for idx, enc in token_batches(tok, prompts, args.max_length, batch_size=b):
                floor_data[b].append((enc["input_ids"].to(dev), enc["attention_mask"].to(dev), y[idx].to(dev), lab_t))

    def floor(b: int):
        for ids, mask, y, lab_t in floor_data[b]:
            f = log_odds(label_logits(pm, ids, mask, lab_t), y)
            f.sum().backward()
            for p in all_lora:
                p.grad = None

    fns = {f"floor_b{b}": (lambda b=b: floor(b)) for b in floor_bs}
    fns |= {f"features_t{t}": (lambda t=t: features(t)) for t in budgets}
    with torch.enable_grad():
        times = timed(fns, dev, args.warmup, args.repeats)
    peaks = {}
    if cuda:
        for k, fn in fns.items():
            torch.cuda.reset_peak_memory_stats()
            fn()
            peaks[k] = torch.cuda.max_memory_allocated()
    col = 1 if args.clock == "cpu" else 0
    eps = {k: n_ex / statistics.median(t[col] for t in v) for k, v in times.items()}
    best_floor = max((k for k in eps if k.startswith("floor_")), key=eps.get)
    best_feat = max((k for k in eps if k.startswith("features_")), key=eps.get)
    lengths = [len(r) for _, p, _, _ in sets for r in tok(p)["input_ids"]]
    res = {
        "features_examples_per_s": round(eps[best_feat], 1),
        "features_ratio_to_best_floor": round(eps[best_floor] / eps[best_feat], 4),
        "features_max_tokens": int(best_feat.removeprefix("features_t")),
        "floor_examples_per_s": round(eps[best_floor], 1), "floor_best_batch": int(best_floor.removeprefix("floor_b")),
        "features_benchmark": {
            "what": "compute_features(return_logprobs=True) per dataset on train+validation prompts, batched by a "
                    "token budget, vs floor = forward + f.sum().backward() into LoRA .grad in length-sorted batches of "
                    "B examples (pre-tokenized, on the device), best B; ratio = floor ex/s / features ex/s",
            "model": args.model, "device": dev,
            "device_name": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
            "dtype": str(dtype).removeprefix("torch."), "lora_param_dtype": str(all_lora[0].dtype).removeprefix("torch."),
            "torch": torch.__version__, "transformers": __import__("transformers").__version__,
            "peft": __import__("peft").__version__, "data": str(args.data), "datasets": len(sets),
            "examples": n_ex, "tokens": sum(lengths), "mean_tokens": round(sum(lengths) / len(lengths), 1),
            "max_length": args.max_length, "d": args.d, "lora_r": args.r, "model_load_s": round(load_s, 2),
            "examples_per_s": {k: round(v, 1) for k, v in eps.items()},
            "peak_memory_bytes": peaks, "clock": args.clock, "repeats": args.repeats, "warmup": args.warmup,
            "wall_s": {k: [round(t[0], 4) for t in v] for k, v in times.items()},
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"pipeline_{dev.split(':')[0]}.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps(old | res, indent=2) + "\n")
    for k, v in eps.items():
        print(f"{k:18s} {v:10.1f} examples/s" + (f"  peak {peaks[k] / 2**30:.2f} GiB" if k in peaks else ""))
    print(f"features {res['features_examples_per_s']} ex/s at max_tokens {res['features_max_tokens']}; floor "
          f"{res['floor_examples_per_s']} ex/s at batch {res['floor_best_batch']}; ratio "
          f"{res['features_ratio_to_best_floor']} -> {path}")


def approx_report(pm, tok, n: int, proj: Projection) -> dict:
    """First-order error on real reviews, and how well the projection keeps the real gradients' geometry."""
    from grouplora.ml.approx import approximation_errors, per_example_gradients
    prompts, labels = movie_prompts(n)
    lab = label_token_ids(tok, [" positive", " negative"])
    t0 = time.perf_counter()
    rows = approximation_errors(pm, tok, prompts, labels, lab, n_draws=3, seed=0)
    grads = per_example_gradients(pm, tok, prompts, labels, lab, proj.names)
    G = torch.stack([torch.cat([g[k].reshape(-1) for k in proj.names]) for g in grads])  # (n, D) float64
    gram = G @ G.T
    norms = gram.diag().sqrt()
    dist = {}
    for seed in range(3):
        P = Projection(proj.shapes, d=proj.d, seed=seed)
        F = torch.stack([P.project({k: v.float() for k, v in g.items()}) for g in grads]).double()
        err = ((F @ F.T) - gram) / (norms[:, None] * norms[None, :])
        dist[f"seed{seed}"] = {"norm_rel_err_abs_mean": float(err.diag().abs().mean()),
                               "offdiag_err_abs_mean": float(err[~torch.eye(len(G), dtype=bool)].abs().mean()),
                               "max_abs_err": float(err.abs().max())}
    cos = (gram / (norms[:, None] * norms[None, :]))[~torch.eye(len(G), dtype=bool)]
    return {"n_prompts": len(prompts), "prompt_format": "Review: {text}\\nSentiment:", "labels": [" positive", " negative"],
            "source": "vaderSentiment 3.3.2 sdist, movieReviewSnippets_GroundTruth.txt, |score| >= 1.5",
            "errors": rows, "projection_distortion_real_grads": dist,
            "real_grad_abs_cos_mean": float(cos.abs().mean()), "seconds": round(time.perf_counter() - t0, 1)}


if __name__ == "__main__":
    sys.exit(main())
