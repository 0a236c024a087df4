"""Choosing auxiliary datasets for a target (issue 7): ml/selection.py on synthetic features, then the Dagster path
(meta_init_adapter -> meta_gradient_features -> target_selection) and `grouplora select` on the tiny model."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from grouplora.ml.estimation import FeatureSet, Split, synthetic_features
from grouplora.ml.selection import (METHODS, cosine_to, forward_selection, mean_hidden_state, random_ensemble_scores,
                                    select_auxiliaries, target_estimates, threshold_select)

TARGET = "ds000"  # cluster 0 of synthetic_features(n_clusters=3): ds003 and ds006 share its helpful direction


def same_cluster(name: str) -> bool:
    return int(name[2:]) % 3 == 0


@pytest.fixture(scope="module")
def suite() -> FeatureSet:
    """Nine datasets in three task clusters; the target has only 5 training examples (a low-resource target,
    which is when auxiliary data matters): same-cluster auxiliaries then help it, the others barely do."""
    fs = synthetic_features(n_datasets=9, n_train=100, n_val=100, d=100, signal=1.0, n_clusters=3, seed=0)
    train = dict(fs.train)
    train[TARGET] = Split(train[TARGET].f0[:5], train[TARGET].G[:5])
    return FeatureSet(train, fs.val)


def test_forward_selection_first_picks_a_same_cluster_dataset_and_lowers_the_loss(suite):
    chosen, path = forward_selection(suite, TARGET, max_k=2)
    assert chosen and same_cluster(chosen[0]), chosen
    assert path["added"].tolist() == ["", *chosen]
    assert (path["gain"].iloc[1:] > 0).all() and path["est_loss"].is_monotonic_decreasing
    # the path's losses are the estimator's own for those sets
    est = target_estimates(suite, TARGET, [[], chosen[:1]])
    assert np.allclose(est["est_loss"], path["est_loss"].iloc[:2], rtol=1e-3)  # the solver's tolerance
    assert est["est_loss"][1] < est["est_loss"][0]
    # min_gain above every gain: nothing is added
    none, only_start = forward_selection(suite, TARGET, max_k=2, min_gain=10.0)
    assert none == [] and len(only_start) == 1


def test_random_ensemble_scores_cover_every_auxiliary_and_threshold_respects_top_k(suite):
    scores, est = random_ensemble_scores(suite, TARGET, n_subsets=40, size=3, seed=0)
    aux = [n for n in suite.names if n != TARGET]
    assert sorted(scores["aux"]) == aux and (scores["n_sets"] > 0).all()
    assert len(est) == 40 and all(len(s) == 3 and TARGET not in s for s in est["aux"])
    assert len({tuple(s) for s in est["aux"]}) == 40  # distinct sets
    # more sets than there are: all C(8, 3) = 56 of them, once each
    assert len(random_ensemble_scores(suite, TARGET, n_subsets=500, size=3, seed=0)[1]) == 56
    assert scores["score"].is_monotonic_decreasing
    # n_sets counts the sampled sets that contain each auxiliary (each set has three)
    assert scores["n_sets"].sum() == 3 * len(est)
    mean = scores.attrs["mean_score"]
    assert mean == pytest.approx(-est["est_loss"].mean())
    above = threshold_select(scores)
    assert above and all(scores.set_index("aux").loc[a, "score"] > mean for a in above)
    assert threshold_select(scores, top_k=2) == above[:2]
    assert threshold_select(scores, top_k=1, threshold=-np.inf) == [scores["aux"][0]]
    assert threshold_select(scores, threshold=np.inf) == []
    assert all(same_cluster(a) for a in above[:2]), above


def test_select_auxiliaries_runs_every_method_and_table_marks_the_choices(suite):
    hidden = {n: np.eye(len(suite.names))[i] for i, n in enumerate(suite.names)}
    hidden["ds005"] = hidden[TARGET] * 3.0  # the same direction: hidden_cosine must rank it first
    sel = select_auxiliaries(suite, TARGET, hidden=hidden, top_k=2, n_subsets=40, size=3, seed=0)
    assert set(sel.chosen) == set(METHODS)
    assert sel.chosen["none"] == [] and sel.chosen["all"] == [n for n in suite.names if n != TARGET]
    assert sel.chosen["hidden_cosine"][0] == "ds005"
    assert all(len(sel.chosen[m]) <= 2 for m in ("random_ensemble", "forward_selection", "gradient_cosine"))
    assert all(same_cluster(a) for a in sel.chosen["gradient_cosine"])
    table = sel.table()
    assert len(table) == 8 and set(table["aux"]) == set(sel.chosen["all"])
    for m, chosen in sel.chosen.items():
        assert set(table.loc[table[f"chosen_{m}"], "aux"]) == set(chosen), m
    steps = table.dropna(subset=["forward_step"]).sort_values("forward_step")["aux"].tolist()
    assert steps == sel.chosen["forward_selection"]
    assert sel.settings["size"] == 3 and sel.settings["n_subsets"] == 40
    # each method's row: the target's estimate after exactly that choice ("none" = the forward path's start)
    m = sel.methods.set_index("method")
    assert list(m.index) == list(sel.chosen) and (m["n_aux"] == [len(v) for v in sel.chosen.values()]).all()
    assert m.loc["none", "est_loss"] == pytest.approx(sel.forward_path["est_loss"][0], rel=1e-3)  # solver tol
    fwd = target_estimates(suite, TARGET, [sel.chosen["forward_selection"]])["est_loss"][0]
    assert m.loc["forward_selection", "est_loss"] == pytest.approx(fwd, rel=1e-6)
    # without hidden states the hidden_cosine method is left out
    assert "hidden_cosine" not in select_auxiliaries(suite, TARGET, top_k=1, n_subsets=10, size=2).chosen


def test_cosine_to_ranks_an_identical_vector_first():
    rng = np.random.default_rng(0)
    t = rng.standard_normal(16)
    vectors = {"target": t, "same": 2.5 * t, "opposite": -t, **{f"r{i}": rng.standard_normal(16) for i in range(5)}}
    cos = cosine_to(vectors, "target")
    assert "target" not in cos.index and len(cos) == 7
    assert cos.index[0] == "same" and cos.iloc[0] == pytest.approx(1.0)
    assert cos.index[-1] == "opposite" and cos.iloc[-1] == pytest.approx(-1.0)


def test_unknown_target_is_named(suite):
    with pytest.raises(ValueError, match="'nope'"):
        select_auxiliaries(suite, "nope")
    with pytest.raises(ValueError, match="'nope'"):
        forward_selection(suite, "nope")


def test_mean_hidden_state_is_the_mean_over_prompts(tiny, one_thread):
    model, tok = tiny
    prompts = ["is 4 even\nAnswer:", "the film was good, really good\nAnswer:", "hi\nAnswer:"]
    both = mean_hidden_state(model, tok, prompts, batch_size=2, max_length=64)
    each = [mean_hidden_state(model, tok, [p], max_length=64) for p in prompts]
    assert both.shape == (model.config.hidden_size,)
    np.testing.assert_allclose(both, np.mean(each, axis=0), atol=1e-4)
    assert not np.allclose(each[0], each[1], atol=1e-3)  # different prompts, different states
    with pytest.raises(ValueError):
        mean_hidden_state(model, tok, [])


def test_bar_chart_highlights_names(tmp_path):
    from grouplora.ml.plots import bar_chart

    values = {"a": 0.3, "b": -0.1, "c": 0.05}
    plain = bar_chart(values, tmp_path / "plain.png", "t", "x").read_bytes()
    marked = bar_chart(values, tmp_path / "marked.png", "t", "x", highlight=["a"], highlight_label="chosen")
    assert marked.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and marked.read_bytes() != plain
    with pytest.raises(ValueError, match="zzz"):
        bar_chart(values, tmp_path / "bad.png", "t", "x", highlight=["zzz"])


def test_selection_settings_are_validated():
    from grouplora.orchestration.settings import SelectionSettings

    s = SelectionSettings()
    assert (s.top_k, s.n_subsets, s.size, s.lam, s.min_gain, s.seed, s.hidden_max_examples) == (3, 200, 0, None, 0.0,
                                                                                               0, 64)
    assert SelectionSettings(lam=1e-3).lam == 1e-3  # pinned
    for bad, field in [({"top_k": 0}, "top_k"), ({"n_subsets": 0}, "n_subsets"), ({"size": -1}, "size"),
                       ({"lam": 0.0}, "lam"), ({"lam": float("nan")}, "lam"), ({"min_gain": -0.1}, "min_gain"),
                       ({"hidden_max_examples": 0}, "hidden_max_examples")]:
        with pytest.raises(ValueError, match=field):
            SelectionSettings(**bad)


# ------------------------------------------------------------------------------------------- Dagster + CLI


@pytest.fixture()
def project(news_project):
    return news_project


def test_selection_through_dagster_and_the_cli(project, monkeypatch):
    import duckdb
    from click.testing import CliRunner
    from safetensors.torch import load_file

    from grouplora.cli import main
    from grouplora.ml.projection import Projection
    from grouplora.orchestration import freshness, run
    from grouplora.orchestration.resources import make_resources

    resources = make_resources()
    sources = resources["sources"]
    versions = {n: sources.version(n) for n in sources.files()}
    names = sorted(versions)
    assert names == ["facts", "news", "parity", "reviews"]
    ran = run.run_selection("reviews", names, versions, executor="in_process")
    assert ran == [*(f"dataset:{n}" for n in names), "meta_init_adapter",
                   *(f"meta_gradient_features:{n}" for n in names), "meta_lam_calibration", "target_selection:reviews"]
    storage = project / "var" / "storage"

    # the meta-init adapter: peft files, trained (B != 0), on every dataset
    folder = storage / "adapters" / "meta_init"
    assert (folder / "adapter_config.json").exists()
    weights = load_file(folder / "adapter_model.safetensors")
    b = [w for k, w in weights.items() if "lora_B" in k]
    assert b and max(float(w.abs().max()) for w in b) > 0
    record = json.loads((folder / "meta_init.json").read_text())
    assert record["datasets"] == names and record["n_examples"] > 0 and record["flops"] > 0
    assert not list(folder.parent.glob(".meta_init*"))  # no temp or old folders left beside it

    # meta features: taken at that adapter, with the lora_A gradients (a fresh LoRA's projection has B only)
    side = json.loads((storage / "features_meta" / "reviews.json").read_text())
    assert side["include_a"] is True and side["theta0_fingerprint"] == record["fingerprint"]
    with resources["base_model"].lora(resources["gradient_settings"]) as (fresh_model, _):
        fresh = Projection.for_model(fresh_model, d=side["d"], seed=side["seed"])
    assert side["matrices"] == 2 * len(fresh.names)
    assert side["projection_checksum"] != fresh.checksum()
    assert not (storage / "features").exists()  # the base features were not needed

    # λ calibrated at the meta-initialization (real fine-tunes from it), and the selection used it
    cal = json.loads((storage / "calibration" / "features_meta.json").read_text())
    assert cal["theta0"] == "meta_init" and cal["source"] == "calibrated" and cal["runs"]
    assert cal["theta0_fingerprint"] == record["fingerprint"]
    chosen = json.loads((storage / "selection" / "reviews.json").read_text())
    assert chosen["lam"] == cal["lam"] and chosen["settings"]["lam"] == cal["lam"]

    # the scores table: one row per auxiliary, a chosen_<method> column per method
    table = pd.read_parquet(storage / "selection" / "reviews.parquet")
    assert sorted(table["aux"]) == ["facts", "news", "parity"] and set(table["target"]) == {"reviews"}
    assert {f"chosen_{m}" for m in METHODS} <= set(table.columns)
    assert table["chosen_all"].all() and not table["chosen_none"].any()
    assert table["chosen_hidden_cosine"].sum() == 3  # top_k = 3 of 3 auxiliaries
    assert np.isfinite(table[["score", "gradient_cosine", "hidden_cosine"]].to_numpy(dtype=float)).all()
    png = storage / "selection" / "reviews.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.stem for p in (storage / "hidden_states").glob("*.npz")) == names
    with duckdb.connect(str(project / "var" / "warehouse.duckdb"), read_only=True) as con:
        rows = con.execute("SELECT target, aux, chosen_forward_selection FROM target_selection").fetchall()
        n_meta = con.execute("SELECT count(*) FROM meta_gradient_features").fetchone()[0]
        n_fit = con.execute("SELECT count(*) FROM datasets WHERE split IN ('train', 'validation')").fetchone()[0]
    assert sorted(a for _, a, _ in rows) == ["facts", "news", "parity"]
    assert n_meta == n_fit

    # the CLI: an unknown target names the known ones; a second target reuses the adapter, the features and the
    # cached hidden states, and prints every method's choice and the table
    cli = CliRunner()
    bad = cli.invoke(main, ["select", "--target", "movies"])
    assert bad.exit_code != 0 and "unknown target 'movies'" in bad.output and "facts, news, parity, reviews" in bad.output
    out = cli.invoke(main, ["select", "--target", "parity"])
    assert out.exit_code == 0, out.output
    assert "meta_init_adapter: current" in out.output and "target_selection:parity: ran" in out.output
    assert "meta_gradient_features:news: current" in out.output and "meta_lam_calibration: current" in out.output
    for method in METHODS:
        assert f"  {method} " in out.output
    assert "| aux" in out.output and "chosen_by" in out.output and "reviews" in out.output
    instance = run.get_instance()
    latest = freshness.latest_materialization(instance, "target_selection", "parity")
    assert latest.asset_materialization.metadata["hidden_states_computed"].value == []
    with duckdb.connect(str(project / "var" / "warehouse.duckdb"), read_only=True) as con:
        targets = dict(con.execute("SELECT target, count(*) FROM target_selection GROUP BY 1").fetchall())
    assert targets == {"reviews": 3, "parity": 3}

    # a retraining that fails while writing the new adapter leaves the old one whole
    import dagster as dg

    import grouplora.orchestration.store as store_module

    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    copied = []

    def copy_then_fail(src, dst):  # the first file arrives (as different bytes), the second fails
        copied.append(src)
        if len(copied) == 2:
            raise OSError("disk full")
        Path(dst).write_bytes(b"a newer adapter file")

    monkeypatch.setattr(store_module, "copy2", copy_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        run.run_job(instance, run.selection_job, tags={"dagster/partition": "reviews"}, executor="in_process",
                    asset_selection=[dg.AssetKey("meta_init_adapter")])
    assert len(copied) == 2  # one new file was already written when it failed
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert not list(folder.parent.glob(".meta_init*"))
