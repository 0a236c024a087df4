"""The UIs in a real browser: after a tiny pipeline run, `grouplora ui` serves the Dagster asset lineage and the
MLflow registry; headless Debian chromium (no browser download) driven by playwright checks what they render.

Everything stays on 127.0.0.1; screenshots go to tests/artifacts/ (git-ignored)."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from grouplora.orchestration.servers import free_port, wait_http


ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
CHAIN = ["dataset", "gradient_features", "subset_estimates", "subset_affinity", "task_partition", "adapter", "ensemble"]


def page_text_with(page, names: list[str], timeout: float) -> str:
    """The page's rendered text once it names every one of `names` (or whatever it shows at the deadline)."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = page.inner_text("body")
        if all(n in text for n in names):
            break
        page.wait_for_timeout(1000)
    return text


@pytest.fixture()
def project(tmp_path, make_folder):
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (`apt-get install -y chromium`; .ci/run does)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as e:
        pytest.fail(f"playwright is missing ({e}): it is in the `test` extra (pip install -e '.[test]')")
    folder = make_folder(tmp_path / "datasets")
    env = {**os.environ, "GROUPLORA_HOME": str(tmp_path / "var"), "GROUPLORA_DATASETS": str(folder),
           "GROUPLORA_BASE_MODEL": "tiny", "DAGSTER_HOME": str(tmp_path / "var" / "dagster_home"),
           "MLFLOW_DISABLE_TELEMETRY": "true", "DAGSTER_DISABLE_TELEMETRY": "1", "PYTHONUNBUFFERED": "1"}
    grouplora = str(Path(sys.executable).parent / "grouplora")
    done = subprocess.run([grouplora, "run", "--datasets", str(folder)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return tmp_path, env


def test_ui_shows_the_asset_chain_and_the_champion(project):
    from playwright.sync_api import sync_playwright

    tmp_path, env = project
    ARTIFACTS.mkdir(exist_ok=True)
    dagster_port, mlflow_port = free_port(), free_port()
    log = open(tmp_path / "ui.log", "w")
    ui = subprocess.Popen([str(Path(sys.executable).parent / "grouplora"), "ui", "--host", "127.0.0.1",
                           "--port", str(dagster_port), "--mlflow-port", str(mlflow_port)],
                          cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    dagster_url, mlflow_url = f"http://127.0.0.1:{dagster_port}", f"http://127.0.0.1:{mlflow_port}"
    try:
        wait_http(f"{dagster_url}/server_info", 180, [ui])
        wait_http(f"{mlflow_url}/health", 120, [ui])
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1800, "height": 1100})
                page.set_default_timeout(60_000)

                # Dagster: the global lineage shows the asset groups (collapsed: too many assets to draw each)...
                page.goto(f"{dagster_url}/asset-groups", wait_until="domcontentloaded")
                text = page_text_with(page, ["data", "features", "estimates", "sql", "grouping", "adapters"], 60)
                page.screenshot(path=str(ARTIFACTS / "dagster_global_lineage.png"), full_page=True)
                for group in ("data", "features", "estimates", "sql", "grouping", "adapters", "ensemble"):
                    assert group in text, f"global lineage does not show group {group}: {text[:2000]}"
                # ...and the ensemble's upstream lineage graph draws every asset of the chain as its own node.
                page.goto(f"{dagster_url}/assets/ensemble?view=lineage&lineageScope=upstream&lineageDepth=10",
                          wait_until="domcontentloaded")
                text = page_text_with(page, CHAIN, 90)
                page.screenshot(path=str(ARTIFACTS / "dagster_asset_graph.png"), full_page=True)
                missing = [n for n in CHAIN if n not in text]
                assert not missing, f"asset graph does not show {missing}; it shows: {text[:2000]}"

                # Dagster: the automation sensor (declarative automation) is on.
                page.goto(f"{dagster_url}/automation", wait_until="domcontentloaded")
                text = page_text_with(page, ["automation_sensor", "dataset_files_sensor", "nightly_recheck"], 60)
                page.screenshot(path=str(ARTIFACTS / "dagster_automation.png"), full_page=True)
                for name in ("automation_sensor", "dataset_files_sensor", "nightly_recheck"):
                    assert name in text, f"automation page does not list {name}: {text[:2000]}"

                # MLflow: the registered ensemble, with its champion alias.
                page.goto(f"{mlflow_url}/#/models/grouplora-ensemble", wait_until="domcontentloaded")
                text = page_text_with(page, ["grouplora-ensemble", "champion"], 90)
                page.screenshot(path=str(ARTIFACTS / "mlflow_registered_model.png"), full_page=True)
                assert "grouplora-ensemble" in text and "champion" in text, text[:2000]
            finally:
                browser.close()
    finally:
        if ui.poll() is None:
            ui.send_signal(signal.SIGINT)  # `supervise` passes SIGINT on to dagster dev and mlflow, then waits
        try:
            code = ui.wait(timeout=60)
        except subprocess.TimeoutExpired:
            ui.kill()
            ui.wait(timeout=10)
            raise AssertionError("`grouplora ui` did not stop within 60 s of SIGINT")
        log.close()
        shutil.copy(tmp_path / "ui.log", ARTIFACTS / "ui.log")
    assert code == 0, f"`grouplora ui` exited with {code}"
    said = (tmp_path / "ui.log").read_text()  # it told the user when each server answered
    assert "Dagster UI is up" in said and "MLflow UI is up" in said, said[-3000:]
    for port in (dagster_port, mlflow_port):  # both servers are gone
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still answers after shutdown"
