"""The Dagster UI over a pipeline's state, in a real browser: does it still load with 100+ partitions?

Serves a GROUPLORA_HOME (e.g. the one `benchmarks/pipeline_gpu.py` left on the H200 and `remote.sh pipe` brought
back as plhome.tgz) with `grouplora ui` on 127.0.0.1, opens the global lineage, the ensemble's upstream lineage and
the gradient_features partitions page in headless Debian chromium (playwright), times each page until it shows what
it should, and saves screenshots. Adds a `ui` key (seconds per page, partitions shown, screenshot paths) to
--json (other keys kept).

    tar xzf plhome.tgz -C /tmp && python benchmarks/ui_screenshot.py --home /tmp/plhome --datasets /work/packs/scale \\
        --json benchmarks/results/pipeline_cuda.json --shots benchmarks/results/pipeline_cuda_ui
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from grouplora.orchestration.servers import free_port, wait_http

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def shown(page, needles: list[str], timeout: float) -> tuple[float, str, bool]:
    """Seconds until the page's text holds every needle (or the timeout), the text, and whether it did."""
    t0 = time.monotonic()
    text = ""
    while time.monotonic() - t0 < timeout:
        text = page.inner_text("body")
        if all(n in text for n in needles):
            return time.monotonic() - t0, text, True
        page.wait_for_timeout(250)
    return time.monotonic() - t0, text, False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", type=Path, required=True, help="the GROUPLORA_HOME to serve")
    ap.add_argument("--datasets", type=Path, required=True, help="the data pack the pipeline ran on")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "pipeline_cuda.json")
    ap.add_argument("--shots", type=Path, default=ROOT / "benchmarks" / "results" / "pipeline_cuda_ui")
    ap.add_argument("--timeout", type=float, default=120)
    a = ap.parse_args()
    from playwright.sync_api import sync_playwright

    a.shots.mkdir(parents=True, exist_ok=True)
    names = sorted(p.stem for p in a.datasets.glob("*.parquet"))
    env = {**os.environ, "GROUPLORA_HOME": str(a.home), "GROUPLORA_DATASETS": str(a.datasets),
           "DAGSTER_HOME": str(a.home / "dagster_home"), "MLFLOW_DISABLE_TELEMETRY": "true",
           "DAGSTER_DISABLE_TELEMETRY": "1"}
    port, mlflow_port = free_port(), free_port()
    log = open(a.shots / "ui.log", "w")
    ui = subprocess.Popen([str(Path(sys.executable).parent / "grouplora"), "ui", "--host", "127.0.0.1", "--port",
                           str(port), "--mlflow-port", str(mlflow_port)], cwd=ROOT, env=env, stdout=log,
                          stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    pages = {  # name: (path, what it must show)
        "global_lineage": ("/asset-groups", ["data", "features", "estimates", "adapters", "ensemble"]),
        "ensemble_lineage": ("/assets/ensemble?view=lineage&lineageScope=upstream&lineageDepth=10",
                             ["gradient_features", "subset_estimates", "task_partition", "adapter"]),
        "features_partitions": ("/assets/gradient_features?view=partitions", [names[0], names[-1]]),
        "dataset_partitions": ("/assets/dataset?view=partitions", [names[0], names[-1]]),
    }
    res: dict = {"partitions": len(names), "pages": {}}
    try:
        wait_http(f"{url}/server_info", 240)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1800, "height": 1100})
                page.set_default_timeout(int(a.timeout * 1000))
                for name, (path, needles) in pages.items():
                    t0 = time.monotonic()
                    page.goto(url + path, wait_until="domcontentloaded")
                    secs, text, ok = shown(page, needles, a.timeout)
                    shot = a.shots / f"{name}.png"
                    page.screenshot(path=str(shot), full_page=False)
                    res["pages"][name] = {"path": path, "loaded": ok, "seconds": round(time.monotonic() - t0, 2),
                                          "shows": needles, "screenshot": str(shot.relative_to(ROOT))
                                          if shot.is_relative_to(ROOT) else str(shot)}
                    if not ok:
                        res["pages"][name]["text"] = text[:1500]
                    print(f"{name}: {'loaded' if ok else 'NOT loaded'} in {secs:.1f} s -> {shot}", flush=True)
            finally:
                browser.close()
    finally:
        ui.send_signal(signal.SIGINT)
        try:
            ui.wait(timeout=60)
        except subprocess.TimeoutExpired:
            ui.kill()
        log.close()
    res["all_loaded"] = all(v["loaded"] for v in res["pages"].values())
    old = json.loads(a.json.read_text()) if a.json.exists() else {}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(old | {"ui": res}, indent=2) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
