"""Settings a user can set: the project settings file (YAML, `--settings` / $GROUPLORA_SETTINGS), `--device` and
`--dtype`; checked with one clear error, and carried by every run (its run config) and by the Definitions the UI
loads (the launchpad's defaults)."""

from __future__ import annotations

from typing import get_args

import pytest
from click.testing import CliRunner

from grouplora.ml.data_format import ConfigError
from grouplora.orchestration.resources import (SETTINGS_SECTIONS, BaseModelResource, make_resources,
                                               project_settings, settings_run_config)
from grouplora.orchestration.settings import DEVICE_ENV, DTYPE_ENV, SETTINGS_ENV, read_settings_file

GOOD = """\
gradient:
  d: 7
  batch_size: 4
estimation:
  lam: 1e-4          # YAML 1.1 reads this as a string: the model parses it
training: {epochs: 1, qlora: false}
ensemble: {boost_mode: trained}
selection: {top_k: 2}
partition: {method: spectral}
model: {dtype: bfloat16, device: cpu}
"""


@pytest.fixture()
def no_settings_env(monkeypatch):
    """Every settings variable unset here, and restored after: the CLI sets them in this process. (setenv first:
    delenv of an unset variable records nothing, so what the CLI set would leak into later tests.)"""
    for env in (SETTINGS_ENV, DEVICE_ENV, DTYPE_ENV):
        monkeypatch.setenv(env, "")
        monkeypatch.delenv(env)
    return monkeypatch


def test_a_settings_file_sets_every_concern_and_the_flags_win_over_it(tmp_path, no_settings_env):
    path = tmp_path / "settings.yaml"
    path.write_text(GOOD)
    assert project_settings()["gradient_settings"].d == 200  # no file: the defaults
    no_settings_env.setenv(SETTINGS_ENV, str(path))
    r = make_resources()  # what the Definitions (and so the UI's launchpad) are built with
    assert (r["gradient_settings"].d, r["gradient_settings"].batch_size, r["gradient_settings"].seed) == (7, 4, 0)
    assert r["estimation_settings"].lam == 1e-4 and r["training_settings"].epochs == 1
    assert r["ensemble_settings"].boost_mode == "trained" and r["selection_settings"].top_k == 2
    assert r["partition_settings"].method == "spectral"
    assert (r["base_model"].dtype, r["base_model"].device) == ("bfloat16", "cpu")
    no_settings_env.setenv(DTYPE_ENV, "float16")  # --dtype
    no_settings_env.setenv(DEVICE_ENV, "cuda:1")  # --device
    assert (project_settings()["base_model"].dtype, project_settings()["base_model"].device) == ("float16", "cuda:1")
    # a run's config sets every field of every settings resource, defaults included: nothing is left to whatever
    # Definitions a process cached
    config = settings_run_config()
    assert set(config) == {key for key, _ in SETTINGS_SECTIONS.values()}
    assert config["gradient_settings"]["config"]["d"] == 7 and config["gradient_settings"]["config"]["seed"] == 0
    assert config["base_model"]["config"] == {"name": "", "dtype": "float16", "device": "cuda:1",
                                              "load_in_4bit": False, "max_length": 256, "batch_size": 16,
                                              "max_tokens": 0}


@pytest.mark.parametrize("text, problem", [
    ("gradient:\n  d: 0\n", "gradient: GradientSettings: d must be >= 1, got 0"),
    ("gradient:\n  d: many\n", "gradient.d: Input should be a valid integer"),
    ("gradient:\n  dims: 7\n", "gradient: unknown setting(s) ['dims']"),
    ("gradients:\n  d: 7\n", "unknown section(s) ['gradients']"),
    ("partition: {method: kmeans}\n", "partition.method: Input should be 'sdp' or 'spectral'"),
    ("model: {device: gpu}\n", "model.device: device 'gpu' is not one of auto, cpu, cuda, cuda:N"),
    ("model: {dtype: float64}\n", "model.dtype: Input should be 'float32', 'bfloat16' or 'float16'"),
    ("model: {max_tokens: -1}\n", "model.max_tokens: must be >= 0 (0 = not set), got -1"),
    ("gradient: {max_tokens: -5}\n", "gradient: GradientSettings: max_tokens must be >= 0, got -5"),
    ("training: 3\n", "training must be a mapping of setting to value, got 3"),
    ("- gradient\n", "expected a mapping of sections"),
    ("gradient: {d: 7\n", "not valid YAML"),
    ("!!python/object:os.system {}\n", "not valid YAML"),  # safe-loaded: no Python objects
])
def test_a_bad_settings_file_is_one_clear_error_naming_the_file_and_the_key(tmp_path, text, problem):
    path = tmp_path / "settings.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        read_settings_file(path, SETTINGS_SECTIONS)
    message = str(e.value)
    assert message.startswith(f"{path}: ") and problem in message and "\n" not in message, message


def test_the_cli_refuses_bad_settings_with_exit_2_before_running_anything(tmp_path, no_settings_env):
    from grouplora.cli import DTYPES, main

    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  epochs: 0\n")
    no_settings_env.setenv("GROUPLORA_HOME", str(tmp_path / "var"))
    for command in (["run"], ["demo"], ["select", "--target", "x"]):
        result = CliRunner().invoke(main, [*command, "--settings", str(bad)])
        assert result.exit_code == 2, result.output
        assert str(bad) in result.output and "epochs must be >= 1, got 0" in result.output, result.output
        assert result.output.count("Error") == 1
    result = CliRunner().invoke(main, ["run", "--device", "gpu"])
    assert result.exit_code == 2 and "device 'gpu' is not one of" in result.output
    assert not (tmp_path / "var").exists()  # nothing ran, nothing was written
    assert set(DTYPES) == set(get_args(BaseModelResource.model_fields["dtype"].annotation))


def test_a_value_of_the_settings_file_reaches_the_asset(plain_project, no_settings_env):
    """GradientSettings.d from the file is the d of the stored features, through the CLI's runner, even though
    this process loaded (and cached) the Definitions before the file existed; the run records its settings; a
    rerun skips what is current, and a changed setting re-runs what it changes."""
    import dagster as dg

    from grouplora.orchestration import run
    from grouplora.orchestration.definitions import defs
    from grouplora.orchestration.resources import DatasetSourceResource
    from grouplora.orchestration.store import FEATURES, ArtifactStore

    assert defs.resources["gradient_settings"].d != 7
    path = plain_project / "settings.yaml"
    path.write_text("gradient: {d: 7}\nmodel: {device: cpu}\n")
    no_settings_env.setenv(SETTINGS_ENV, str(path))
    versions = {"reviews": DatasetSourceResource().version("reviews")}
    assert run.run_datasets(["reviews"], versions, executor="in_process") == (["reviews"], {})
    _, X, sidecar = ArtifactStore().read_features(["reviews"], FEATURES)
    assert sidecar["d"] == 7 and X.shape[1] == 7 and sidecar["settings"].startswith("d7-")
    with dg.DagsterInstance.get() as instance:
        (record,) = instance.get_runs()
    assert record.run_config["resources"]["gradient_settings"]["config"]["d"] == 7
    assert record.run_config["resources"]["base_model"]["config"]["device"] == "cpu"

    assert run.run_datasets(["reviews"], versions, executor="in_process") == ([], {})  # current: skipped
    path.write_text("gradient: {d: 5}\nmodel: {device: cpu}\n")
    assert run.run_datasets(["reviews"], versions, executor="in_process") == (["reviews"], {})
    assert ArtifactStore().read_features(["reviews"], FEATURES)[2]["d"] == 5
