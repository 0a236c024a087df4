"""Promotion against the baselines and the champion, on a real (temporary) MLflow sqlite store. Versions are created
with their tags directly: promotion reads only tags and aliases, so no model files are needed. The `champion` asset
is run by Dagster with a stand-in upstream asset (see below) to show that a run promotes the version it registered."""

from __future__ import annotations

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import dagster as dg  # noqa: E402
import pytest  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from grouplora.orchestration.registry import PROMOTION_TAG, promote  # noqa: E402

NAME = "grouplora-ensemble"


@pytest.fixture()
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_experiment("grouplora", artifact_location=(tmp_path / "artifacts").as_uri())
    client.create_registered_model(NAME)
    return client, uri


def version(client: MlflowClient, challenger: bool = True, **tags: float) -> str:
    exp = client.get_experiment_by_name("grouplora").experiment_id
    run = client.create_run(exp)
    client.set_terminated(run.info.run_id, "FINISHED")
    mv = client.create_model_version(NAME, source=run.info.artifact_uri + "/model", run_id=run.info.run_id,
                                     tags={"base_model": "tiny", **{k: str(v) for k, v in tags.items()}})
    if challenger:
        client.set_registered_model_alias(NAME, "challenger", mv.version)
    return str(mv.version)


def champion_of(client: MlflowClient) -> str | None:
    try:
        return str(client.get_model_version_by_alias(NAME, "champion").version)
    except Exception:
        return None


def test_a_first_version_below_a_baseline_is_not_promoted(store):
    """The bug: the first registered ensemble became champion although zero-shot and one adapter beat it."""
    client, uri = store
    v1 = version(client, val_accuracy=0.55, val_zero_shot=0.60, val_one_adapter_all=0.70)
    r = promote(NAME, tracking_uri=uri)
    assert not r.promoted and champion_of(client) is None
    assert "does not beat the zero-shot baseline (val_zero_shot=0.6)" in r.reason
    assert client.get_model_version(NAME, v1).tags[PROMOTION_TAG] == f"not promoted: {r.reason}"


@pytest.mark.parametrize("tags, promoted, why", [
    ({"val_accuracy": 0.80, "val_zero_shot": 0.5, "val_one_adapter_all": 0.6}, True, "beats the baselines"),
    ({"val_accuracy": 0.80, "val_zero_shot": 0.5, "val_one_adapter_all": 0.8}, False, "one adapter on all"),
    ({"val_accuracy": 0.80, "val_zero_shot": 0.9, "val_one_adapter_all": 0.6}, False, "zero-shot baseline"),
    ({"val_accuracy": 0.70, "val_zero_shot": 0.5, "val_one_adapter_all": 0.6}, False, "does not beat champion v1"),
    ({"val_accuracy": 0.75, "val_zero_shot": 0.5, "val_one_adapter_all": 0.6}, False, "does not beat champion v1"),
    ({"val_accuracy": 0.80}, True, "beats v1"),  # no baselines recorded: the champion alone
    ({"val_accuracy": float("nan"), "val_zero_shot": 0.5}, False, "no finite val_accuracy"),
])
def test_the_challenger_must_beat_every_baseline_and_the_champion(store, tags, promoted, why):
    client, uri = store
    v1 = version(client, val_accuracy=0.75, val_zero_shot=0.5, val_one_adapter_all=0.6)
    assert promote(NAME, tracking_uri=uri).promoted and champion_of(client) == v1
    v2 = version(client, **tags)
    r = promote(NAME, tracking_uri=uri)
    assert r.promoted is promoted and why in r.reason, r.reason
    assert champion_of(client) == (v2 if promoted else v1)
    assert client.get_model_version(NAME, v2).tags[PROMOTION_TAG].startswith("promoted" if promoted else "not promoted")


def test_grouplora_promote_shows_the_reason(store):
    from grouplora.registry_cli import promote as promote_cmd

    client, uri = store
    version(client, val_accuracy=0.55, val_zero_shot=0.60)
    res = CliRunner().invoke(promote_cmd, ["--tracking-uri", uri])
    assert res.exit_code == 0, res.output
    assert "not promoted: challenger v1 val_accuracy=0.55 does not beat the zero-shot baseline" in res.stdout
    assert "champion: none" in res.stdout
    res = CliRunner().invoke(promote_cmd, ["--tracking-uri", uri, "--name", "no-such-model"])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1 and "no-such-model" in res.output


def test_a_run_promotes_the_version_it_registered(store, tmp_path, monkeypatch):
    """Two runs registered v2 and v3; v3 moved `challenger` last. The run that registered v2 promotes v2 (it beats
    the champion), not v3, whatever `challenger` names. The real `champion` asset runs; its upstream is a stand-in
    with the same key that records "registered v2" the way `registered_ensemble` does (the real one needs a trained
    ensemble, which is beside the point here)."""
    from grouplora.assets.registry import champion
    from grouplora.orchestration.resources import MlflowResource
    from grouplora.orchestration.settings import EnsembleSettings

    client, uri = store
    v1 = version(client, val_accuracy=0.6)
    assert promote(NAME, tracking_uri=uri).promoted
    v2 = version(client, val_accuracy=0.7, val_zero_shot=0.5)
    v3 = version(client, val_accuracy=0.9, val_zero_shot=0.5)  # another run's, and the `challenger` now

    @dg.asset(name="registered_ensemble")
    def registered_stand_in() -> dg.MaterializeResult:
        return dg.MaterializeResult(metadata={"version": v2})

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    (tmp_path / "dagster_home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster_home")) as instance:
        result = dg.materialize([registered_stand_in, champion], instance=instance,
                                resources={"mlflow_tracking": MlflowResource(tracking_uri=uri),
                                           "ensemble_settings": EnsembleSettings(registered_name=NAME)})
        assert result.success
        meta = result.asset_materializations_for_node("champion")[0].metadata
    assert champion_of(client) == v2 and v1 != v2
    assert meta["challenger_version"].value == v2 and meta["promoted"].value is True
    assert PROMOTION_TAG not in client.get_model_version(NAME, v3).tags  # untouched
