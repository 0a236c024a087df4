"""Incremental re-materialization: after one dataset file changes, Dagster's automation conditions request exactly
the work that change needs, step by step (evaluated in process with `dg.evaluate_automation_conditions`); adding a
dataset registers its partition, removing one re-runs the suite without it."""

import json

import dagster as dg
import pytest

from grouplora.orchestration.partitions import dataset_partitions

SUITE = {"approximation_error", "lam_calibration", "subset_estimates", "zero_shot_report", "subset_affinity",
         "pairwise_affinity", "affinity_report", "estimate_verification", "task_partition"}


@pytest.fixture()
def project(news_project):
    return news_project


def requested(result) -> dict[str, set]:
    """{asset: requested partition keys (None for an unpartitioned asset)} of one evaluation."""
    out = {}
    for r in result.results:
        if isinstance(r.key, dg.AssetKey) and result.get_requested_partitions(r.key):
            out[r.key.to_user_string()] = set(result.get_requested_partitions(r.key))
    return out


def spec_of(project) -> dict:
    return json.loads((project / "var" / "storage" / "partition" / "task_partition.json").read_text())


def test_one_changed_dataset_reruns_only_what_depends_on_it(project, tick_sensor):
    from grouplora.orchestration import run
    from grouplora.orchestration.definitions import defs
    from grouplora.orchestration.resources import make_resources
    from grouplora.orchestration.sensors import dataset_files_sensor

    sources = make_resources()["sources"]
    versions = {n: sources.version(n) for n in sources.files()}
    assert sorted(versions) == ["facts", "news", "parity", "reviews"]

    # Everything once.
    run.run_datasets(versions, versions, executor="in_process")
    run.run_suite(executor="in_process")
    before = spec_of(project)
    old_keys = {g["key"] for g in before["groups"]} | {before["baseline"]["key"]}
    run.run_adapters(sorted(old_keys), executor="in_process")
    run.run_ensemble(executor="in_process")
    instance = run.get_instance()

    def evaluate(cursor):
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=cursor)
        return result, requested(result)

    def materialize(job_fn, assets=None, partition=None):
        run.run_job(instance, job_fn, tags={"dagster/partition": partition} if partition else None,
                    asset_selection=[dg.AssetKey(a) for a in assets] if assets else None, executor="in_process")

    # A settled pipeline: nothing to do.
    result, asked = evaluate(None)
    assert asked == {}, asked
    result, asked = evaluate(result.cursor)
    assert asked == {}, asked

    # One file changes; the sensor re-materializes its `dataset` partition (here: just that step).
    with open(project / "datasets" / "reviews.csv", "a") as f:
        f.write("a brand new review,pos\nanother awful review,neg\n")
    versions["reviews"] = sources.version("reviews")
    # (the nightly re-check would find it too, without the sensor's cursor)
    from grouplora.orchestration.sensors import nightly_recheck
    nightly = nightly_recheck(dg.build_schedule_context(instance=instance, resources={"sources": sources}))
    assert [r.partition_key for r in nightly] == ["reviews"]
    materialize(run.dataset_job, ["dataset"], "reviews")

    # 1. exactly the changed partition's per-dataset assets; the suite waits for them.
    result, asked = evaluate(result.cursor)
    assert asked == {"zero_shot_scores": {"reviews"}, "gradient_features": {"reviews"}}, asked
    materialize(run.dataset_job, ["zero_shot_scores", "gradient_features"], "reviews")

    # 2. then the suite-wide assets (unpartitioned), all in one tick, nothing per dataset.
    result, asked = evaluate(result.cursor)
    assert asked == {a: {None} for a in SUITE}, asked
    run.run_suite(executor="in_process")

    # 3. then adapters only for the new keys: groups with `reviews` in them (their data version changed) and the
    #    baseline; a group without `reviews` and with unchanged members keeps its key and is not retrained.
    after = spec_of(project)
    new_keys = {g["key"] for g in after["groups"]} | {after["baseline"]["key"]}
    for g in after["groups"]:
        if "reviews" not in g["members"] and g["members"] in [h["members"] for h in before["groups"]]:
            assert g["key"] in old_keys
        if "reviews" in g["members"]:
            assert g["key"] not in old_keys
    assert after["baseline"]["key"] != before["baseline"]["key"]
    result, asked = evaluate(result.cursor)
    assert asked == {"adapter": new_keys - old_keys}, asked
    run.run_adapters(sorted(new_keys - old_keys), executor="in_process")

    # 4. then the ensemble, its registration, the promotion step and the SQL report over its results.
    result, asked = evaluate(result.cursor)
    assert asked == {"ensemble": {None}, "registered_ensemble": {None}, "champion": {None},
                     "accuracy_report": {None}}, asked
    run.run_ensemble(executor="in_process")

    # 5. settled again.
    result, asked = evaluate(result.cursor)
    assert asked == {}, asked
    assert isinstance(nightly_recheck(dg.build_schedule_context(instance=instance, resources={"sources": sources})),
                      dg.SkipReason)

    # Adding and removing files: the sensor (ticked by hand, applying its partition requests as the daemon does).
    resources = {"sources": make_resources()["sources"]}

    def tick(cursor):
        return tick_sensor(dataset_files_sensor, instance, cursor, resources)

    settled = json.dumps(versions, sort_keys=True)
    assert tick(settled).run_requests == []

    # Removal: the partition goes, a suite run is requested, and the next partition no longer lists the dataset.
    (project / "datasets" / "parity.jsonl").unlink()
    removed = tick(settled)
    assert sorted(instance.get_dynamic_partitions(dataset_partitions.name)) == ["facts", "news", "reviews"]
    assert [(r.job_name, r.partition_key) for r in removed.run_requests] == [("suite_job", None)]
    run.run_suite(executor="in_process")
    spec = spec_of(project)
    assert spec["datasets"] == ["facts", "news", "reviews"]
    assert "parity" not in {m for g in spec["groups"] for m in g["members"]} | set(spec["baseline"]["members"])
    result, asked = evaluate(result.cursor)
    assert set(asked) == {"adapter"} and asked["adapter"] == (
        {g["key"] for g in spec["groups"]} | {spec["baseline"]["key"]}) - new_keys - old_keys, asked

    # Addition: a new file adds its partition and requests its dataset run; the suite waits for its features.
    (project / "datasets" / "parity.jsonl").write_text(
        "\n".join(json.dumps({"text": f"is {i} odd", "label": "yes" if i % 2 else "no"}) for i in range(18)) + "\n")
    added = tick(removed.cursor)
    assert sorted(instance.get_dynamic_partitions(dataset_partitions.name)) == ["facts", "news", "parity", "reviews"]
    assert [(r.job_name, r.partition_key) for r in added.run_requests] == [("dataset_job", "parity")]
    result, asked = evaluate(result.cursor)
    assert not set(asked) & (SUITE | {"ensemble", "registered_ensemble", "champion"}), asked
