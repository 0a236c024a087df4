"""Scale-out on Ray: the real per-dataset assets (tiny model) run through dagster-ray's `ray_executor` on a local
Ray head with 2 logical GPUs. Needs the ray extra: `make test-ray` installs it and runs this file.

Ray is started with `ray start --head --block` in its own process group and stopped by signalling that process,
which shuts down exactly the processes it started (`ray stop` would stop every Ray process of this user on the
machine). Every Ray port is on 127.0.0.1 (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps Ray from advertising the
host's own address; the dashboard, which serves the job API, binds 127.0.0.1).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from itertools import combinations
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head on loopback with 2 logical GPUs (no real GPU needed), shared by this file's tests; yields the job
    API address."""
    from ray.job_submission import JobSubmissionClient

    temp = Path(tempfile.mkdtemp(prefix="glr-ray-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    gcs, dash, agent, agent_grpc, metrics, client, env_agent = _free_ports(7)
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    log = open(temp / "ray_start.log", "w")
    proc = subprocess.Popen(
        [str(bin_dir / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--num-cpus=8", "--num-gpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
         f"--ray-client-server-port={client}", f"--runtime-env-agent-port={env_agent}", f"--temp-dir={temp}",
         "--disable-usage-stats"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                JobSubmissionClient(address).list_jobs()
                break
            except Exception:  # noqa: BLE001 - not up yet
                if proc.poll() is not None or time.monotonic() > deadline:
                    log_text = (temp / "ray_start.log").read_text()[-3000:]
                    raise RuntimeError(f"Ray head did not start: {log_text}") from None
                time.sleep(1)
        yield address
    finally:
        proc.send_signal(signal.SIGTERM)  # ray start --block stops what it started
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything of that process group still alive
        except ProcessLookupError:
            pass
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _finished_ray_jobs(address: str, timeout_s: float = 120) -> dict:
    """{(Dagster run id, step): Ray job} once every job has ended: a step's job may still be exiting after Dagster
    recorded the step's success."""
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + timeout_s
    while True:
        jobs = JobSubmissionClient(address).list_jobs()
        if all(j.status.is_terminal() for j in jobs) or time.monotonic() > deadline:
            return {(j.metadata.get("dagster/run-id"), j.metadata.get("dagster/op")): j for j in jobs}
        time.sleep(2)


def _overlaps(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def _max_concurrency(intervals: list[tuple[float, float]]) -> int:
    edges = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])  # an end before a start at a tie
    best = now = 0
    for _, d in edges:
        now += d
        best = max(best, now)
    return best


def test_ray_executor_runs_each_step_as_a_ray_job_on_its_own_gpu(plain_project, ray_head, concurrent_partition_runs):
    import dagster as dg
    from ray.job_submission import JobStatus

    from grouplora.orchestration.devices import GPU_STEP_ENV, read_placements
    from pipeline_jobs import CPU_STEPS, GPU_STEPS

    start = time.monotonic()
    dagster_home = Path(os.environ["DAGSTER_HOME"])
    dagster_home.mkdir(parents=True, exist_ok=True)
    (dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    keys = ["reviews", "parity", "facts"]
    with dg.DagsterInstance.get() as instance:
        instance.add_dynamic_partitions("datasets", keys)
    # three partitions' runs at once: 3 GPU steps (one theta0_pass each) want 2 GPUs
    results = concurrent_partition_runs(keys, "ray", ray_head)

    ray_jobs = _finished_ray_jobs(ray_head)
    gpu_runs = []
    with dg.DagsterInstance.get() as instance:
        for r in results:
            done = {e.step_key for e in instance.all_logs(r["run_id"], of_type=dg.DagsterEventType.STEP_SUCCESS)}
            assert done == set(GPU_STEPS + CPU_STEPS)
            placements = read_placements(instance, r["run_id"])
            for step in done:
                job, where = ray_jobs[(r["run_id"], step)], placements[step]  # every step ran as a Ray job
                assert job.status == JobStatus.SUCCEEDED and where["ray_step_key"] == step
                env = job.runtime_env["env_vars"]
                if step in GPU_STEPS:  # Ray set CUDA_VISIBLE_DEVICES to the one GPU it assigned
                    assert env.get(GPU_STEP_ENV) == "1" and "CUDA_VISIBLE_DEVICES" not in env
                    assert where["cuda_visible_devices"] in {"0", "1"}
                    gpu_runs.append(((where["process_start"], where["finished"]), where["cuda_visible_devices"]))
                else:  # a CPU step sees no GPU at all, and the model goes to the CPU
                    assert env.get("CUDA_VISIBLE_DEVICES") == "" and GPU_STEP_ENV not in env
                    assert where["cuda_visible_devices"] == "" and where["device"] == "cpu"
    pairs = [(a, b) for a, b in combinations(gpu_runs, 2) if _overlaps(a[0], b[0])]
    assert pairs, f"no two GPU steps ran at the same time, nothing to compare: {gpu_runs}"
    assert all(a[1] != b[1] for a, b in pairs)  # steps that overlapped held different GPUs
    assert _max_concurrency([span for span, _ in gpu_runs]) <= 2
    print(f"\nray test: {len(ray_jobs)} Ray jobs, {len(pairs)} overlapping GPU pairs, "
          f"{time.monotonic() - start:.0f}s after the head was up")


def test_the_cli_runner_runs_the_projects_jobs_on_ray_with_its_settings(plain_project, ray_head, monkeypatch):
    """`grouplora run --executor ray`'s path: orchestration.run runs the project's own dataset_job (the real
    Definitions, with the Ray executor) and every step is a Ray job; GPU steps ask for a GPU by their decorators;
    the settings file's values reach the steps on Ray."""
    import dagster as dg
    from ray.job_submission import JobStatus

    from grouplora.orchestration import run
    from grouplora.orchestration.devices import GPU_STEP_ENV
    from grouplora.orchestration.resources import DatasetSourceResource
    from grouplora.orchestration.store import FEATURES, ArtifactStore

    settings = plain_project / "settings.yaml"
    settings.write_text("gradient: {d: 6}\n")
    monkeypatch.setenv("GROUPLORA_SETTINGS", str(settings))
    monkeypatch.setenv("RAY_ADDRESS", ray_head)
    versions = {"facts": DatasetSourceResource().version("facts")}
    assert run.run_datasets(["facts"], versions, executor="ray") == (["facts"], {})
    assert ArtifactStore().read_features(["facts"], FEATURES)[2]["d"] == 6
    with dg.DagsterInstance.get() as instance:
        (record,) = instance.get_runs()
    jobs = {op: j for (run_id, op), j in _finished_ray_jobs(ray_head).items() if run_id == record.run_id}
    gpu = {"theta0_pass"}  # zero_shot_scores and gradient_features: one step
    assert gpu | {"dataset", "dataset_dataset_schema"} <= set(jobs)  # the asset checks are steps too
    assert all(j.status == JobStatus.SUCCEEDED for j in jobs.values()), {k: j.status for k, j in jobs.items()}
    for step, job in jobs.items():
        env = job.runtime_env["env_vars"]
        assert (GPU_STEP_ENV in env) == (step in gpu) and ("CUDA_VISIBLE_DEVICES" in env) == (step not in gpu), step
