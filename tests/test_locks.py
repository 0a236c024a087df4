"""home_lock: processes that share a GROUPLORA_HOME take turns at first-time initialization, say once that they
wait, give up with a clear error after the timeout, and a killed holder never leaves the lock stuck. The last
test is the race itself (benchmarks/init_race.py): three processes initializing the Dagster instance and the
MLflow store of a new home at once, under the lock."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from grouplora.orchestration.locks import LockTimeout, home_lock

ROOT = Path(__file__).resolve().parents[1]
HOLD = """
import sys, time
from grouplora.orchestration.locks import home_lock
with home_lock(sys.argv[1], timeout=float(sys.argv[3]), message="waiting for the other one"):
    open(sys.argv[2], "a").write("in\\n")
    time.sleep(float(sys.argv[4]))
    open(sys.argv[2], "a").write("out\\n")
"""


def hold(lock: Path, log: Path, timeout: float, seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLD, str(lock), str(log), str(timeout), str(seconds)],
                            stderr=subprocess.PIPE, text=True)


def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_holders_take_turns_and_the_waiter_says_so_once(tmp_path):
    lock, log = tmp_path / "home" / ".init.lock", tmp_path / "log"
    first = hold(lock, log, 30, 1.5)
    wait_for(lambda: log.exists())
    second = hold(lock, log, 30, 0)
    assert first.wait(30) == 0 and second.wait(30) == 0
    assert log.read_text() == "in\nout\nin\nout\n"  # never both inside
    err = second.stderr.read()
    assert err.count("waiting for the other one") == 1 and first.stderr.read() == ""


def test_timeout_names_the_lock_and_its_holder(tmp_path):
    lock, log = tmp_path / ".init.lock", tmp_path / "log"
    holder = hold(lock, log, 30, 30)
    try:
        wait_for(lambda: log.exists())
        said = []
        start = time.monotonic()
        with pytest.raises(LockTimeout, match=rf"{lock}: still locked after 0.5s by pid {holder.pid} on "):
            with home_lock(lock, timeout=0.5, notify=said.append):
                pass
        assert 0.4 < time.monotonic() - start < 5
        assert said == [f"waiting for {lock} (held by pid {holder.pid} on {__import__('socket').gethostname()}) ..."]
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_holder_frees_the_lock_at_once(tmp_path):
    lock, log = tmp_path / ".init.lock", tmp_path / "log"
    holder = hold(lock, log, 30, 600)
    wait_for(lambda: log.exists())
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    start = time.monotonic()
    with home_lock(lock, timeout=5, notify=lambda m: pytest.fail(f"waited: {m}")):
        assert lock.read_text().startswith("pid ")
    assert time.monotonic() - start < 1


def test_first_initialization_of_a_new_home_under_the_lock(tmp_path):
    """Three processes open the Dagster instance and the MLflow store of a new home at the same moment. Without
    the lock this fails (2 of 3 workers in every trial measured here: "table alembic_version already exists",
    "duplicate column name", see benchmarks/results/init_race.json); with it all succeed and the home works."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import init_race

    result = init_race.trial(tmp_path / "home", procs=3, lock=True)
    assert [w["ok"] for w in result["workers"]] == [True, True, True], result
    assert result["home_ok"], result
    assert sum(w["waited"] for w in result["workers"]) >= 1  # they really did meet at the lock
