"""Peak GPU memory of training one adapter, LoRA vs QLoRA, each in a process of its own (one base loaded).

suite.py keeps the fp32 base on the GPU while it trains the QLoRA adapters, so its per-run peaks cannot show what
4-bit weights save. Here each variant runs in a fresh subprocess: load the base (fp32 or nf4), train one adapter on
the suite's training mixture (same caps, config and batch shapes as suite.py) for --epochs, and report
torch.cuda.max_memory_allocated over the whole process (weights + activations + optimizer) and the weights alone.

    python benchmarks/peak_memory.py --device cuda --data <full pack>   # -> results/peak_memory_cuda.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def one(variant: str, argv: list[str]) -> dict:
    """Runs in the child process: everything on the GPU belongs to this one variant."""
    import suite
    from estimation_fidelity import load_data
    from grouplora.ml.model import load_base_model
    from grouplora.ml.training import train_adapter

    a = suite.parse_args(argv)
    qlora = variant == "qlora"
    model, tok = load_base_model(a.model, device=a.device, load_in_4bit=qlora)
    weights = torch.cuda.memory_allocated() if a.device.startswith("cuda") else 0
    data, _ = load_data(suite.data_folder(a), tok, a)
    cfg = suite.TrainConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj"), lr=a.lr, epochs=a.epochs,
                            batch_size=a.batch_size, max_length=a.max_length, warmup_ratio=0.1, qlora=qlora)
    if a.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        res = train_adapter((model, tok), suite.examples_of(data), cfg, Path(tmp) / "adapter")
    peak = torch.cuda.max_memory_allocated() if a.device.startswith("cuda") else res.peak_memory_bytes
    return {"variant": variant, "process_peak_mib": peak / 2**20, "base_weights_mib": weights / 2**20,
            "steps": res.steps, "seconds": time.perf_counter() - t, "final_loss": res.final_loss,
            "tokens": res.tokens, "batch_size": a.batch_size, "max_length": a.max_length}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", choices=["lora", "qlora"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=None)
    own, rest = p.parse_known_args()
    if own.child:
        print("RESULT " + json.dumps(one(own.child, rest)), flush=True)
        return
    rows = []
    for variant in ("lora", "qlora"):
        proc = subprocess.run([sys.executable, __file__, "--child", variant, *rest], capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            raise RuntimeError(f"{variant} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(lines[-1][7:]))
        print(f"{variant:6} peak {rows[-1]['process_peak_mib']:8.0f} MiB  (base weights "
              f"{rows[-1]['base_weights_mib']:6.0f} MiB)  {rows[-1]['seconds']:.1f} s", flush=True)
    device = "cuda" if "cuda" in " ".join(rest) or torch.cuda.is_available() else "cpu"
    out = own.out or Path(__file__).resolve().parent / "results" / f"peak_memory_{device}.json"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    out.write_text(json.dumps({"benchmark": "peak_memory", "device": gpu, "args": rest, "runs": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
