"""The paper-reproduction script (benchmarks/suite.py) end to end on the tiny model and a small real-format
folder: every stage runs, a rerun resumes from the cached stages, and the results hold together."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

pytestmark = pytest.mark.usefixtures("one_thread")


def five_datasets(folder: Path, make_folder) -> Path:
    make_folder(folder, news=True)
    pd.DataFrame({"text": [f"buy cheap pills now {i}" if i % 2 else f"lunch at noon {i}" for i in range(24)],
                  "label": ["spam", "ham"] * 12}).to_csv(folder / "mail.csv", index=False)
    return folder


def test_suite_runs_every_stage_and_resumes(tmp_path, capsys, make_folder):
    import suite

    data = five_datasets(tmp_path / "data", make_folder)
    args = ["--model", "tiny", "--device", "cpu", "--data", str(data), "--work", str(tmp_path / "work"),
            "--out", str(tmp_path / "suite.json"), "--max-train", "8", "--max-val", "4", "--max-test", "6",
            "--seeds", "0", "1", "--n-random", "4", "--n-fidelity", "8", "--n-calibration", "1", "--epochs", "1",
            "--targets", "reviews", "missing_target", "--n-select", "4", "--approx-datasets", "1",
            "--approx-examples", "1", "--hidden-examples", "4", "--max-m", "2", "--n-bootstrap", "3",
            "--truth-seeds", "0", "1", "--sweep-d", "16"]
    res = suite.main(args)
    assert res["complete"]
    names = sorted(res["sizes"])
    assert len(names) == 5
    # one row per dataset and seed, every method scored, accuracies are proportions of the test split
    for s in (0, 1):
        rows = pd.DataFrame(res[f"methods_s{s}"]["rows"])
        assert sorted(rows["dataset"]) == names
        for col in ("one_adapter_all", "one_adapter_all_qlora", "one_per_dataset", "grouped", "grouped_boosted",
                    "ensemble"):
            assert rows[col].between(0, 1).all()
        runs = res[f"methods_s{s}"]["runs"]
        assert runs["all_qlora"]["qlora"] and runs["all_qlora"]["flops"] > 0
    groups = res["affinity"]["groups"]
    assert sorted(sum(groups, [])) == names and res["affinity"]["m"] == len(groups) == 2
    assert res["fidelity"]["n_subsets"] == 8 and len(res["fidelity"]["pairs"]) == 8 * 3
    fid = res["fidelity"]
    assert fid["truth_definition"]["seeds"] == [0, 1] and fid["truth_definition"]["fold"] == "test"
    # every truth is a mean over the rows the estimates score: the selection fold or the test split of the member
    for fold in ("select", "test"):
        for ref in ("s0", "s1", "mean"):
            t = fid["truths"][fold][ref]
            assert all(v["n"] == res["sizes"][m][fold] for tt in t.values() for m, v in tt.items())
    # the mean truth is the mean of the seeds' truths; the headline is the estimates against it on the test split
    p0 = fid["pairs"][0]
    assert p0["true_loss"] == pytest.approx((p0["true_loss_s0"] + p0["true_loss_s1"]) / 2)
    assert fid["mean_relative_error_loss"] == fid["by_truth"]["test/mean"]["mean_relative_error_loss"]
    # the seeds judged against each other; the per-example cross-entropies stored give the same losses
    tn = fid["truth_noise"]["test"]
    assert tn["n_pairs"] == 2 * 8 * 3 and tn["mean_relative_error_loss"] >= 0
    z = np.load(tmp_path / "work" / "truth_s1.npz")
    sid, m = p0["subset_id"], p0["dataset"]
    assert float(z[f"{sid}/{m}/test"].mean()) == pytest.approx(p0["true_loss_s1"], rel=1e-5)
    assert len(z[f"{sid}/{m}/select"]) == res["sizes"][m]["select"]
    assert res["features_test"]["train_relative_max_diff"] < 1e-3
    # the same fine-tunes scored with features of another dimension: λ chosen on the calibration subsets only
    (sweep,) = res["feature_dim"]["sweep"]
    assert sweep["d"] == 16 and sweep["lam"] in res["calibration"]["grid"]
    # selection: the unknown target is left out; "none" trains on the target alone, "all" on every dataset
    choice = res["choice"]["targets"]
    assert list(choice) == ["reviews"]
    assert choice["reviews"]["chosen"]["none"] == [] and len(choice["reviews"]["chosen"]["all"]) == 4
    assert set(res["selection_s1"]["accuracy"]["reviews"]) == set(choice["reviews"]["chosen"])
    assert {r["scale"] for r in res["approx"]["meta_init"]} == {0.001, 0.005, 0.01, 0.02}
    # stability: the affinity stage re-run unresampled gives the committed partition; m fixed keeps it fixed
    st = res["stability"]
    assert st["reproduces_committed"] and st["n_bootstrap"] == len(st["draws"]) == 3
    assert all(d["fixed"]["m"] == res["affinity"]["m"] and -1 <= d["rechosen"]["ari"] <= 1 for d in st["draws"])
    assert st["ari_fixed_m"]["min"] <= st["ari_fixed_m"]["mean"] <= 1
    # a rerun resumes from the stage files: nothing is trained again
    capsys.readouterr()
    again = suite.main(args)
    assert "==" not in capsys.readouterr().out
    assert again["methods_s1"]["rows"] == res["methods_s1"]["rows"]
    assert json.loads((tmp_path / "suite.json").read_text())["complete"]
    # the report renders from that JSON: every section, its pictures, and numbers recomputed from the rows
    import report
    (tmp_path / "suite").mkdir()  # the per-example truths beside the suite JSON, as results/suite_cuda/ holds them
    for f in (tmp_path / "work").glob("truth_s*.npz"):
        shutil.copy(f, tmp_path / "suite" / f.name)
    summary = report.main(["--suite", str(tmp_path / "suite.json"), "--out", str(tmp_path / "report")])
    hard = summary["fidelity_hardest3_share"]
    assert set(hard) == {"select", "test"} and all(0 < v <= 1 for by in hard.values() for v in by.values())
    text = (tmp_path / "report" / "REPORT.md").read_text()
    for heading in ("## 1.", "## 2.", "## 3.", "## 4.", "## 5.", "## 6.", "## Where we differ"):
        assert heading in text
    assert "How fine the truth is" in text and "Is d the limit?" in text
    for png in ("approx", "fidelity", "affinity", "accuracy", "selection"):
        assert (tmp_path / "report" / "report" / f"{png}.png").stat().st_size > 1000
    per_seed = [pd.DataFrame(res[f"methods_s{s}"]["rows"])["ensemble"].mean() for s in (0, 1)]
    got = summary["methods"]["mean_accuracy"]["ensemble"]
    assert got["mean"] == pytest.approx(sum(per_seed) / 2) and got["std"] == pytest.approx(pd.Series(per_seed).std())


def test_merge_stages_replaces_drops_and_judges_completeness(tmp_path):
    import merge_stages

    work = tmp_path / "work"
    work.mkdir()
    (work / "fidelity.json").write_text(json.dumps({"mean_relative_error_loss": 0.04}))
    into = {"args": {"seeds": [0]}, "fidelity": {"mean_relative_error_loss": 0.07}, "truth_noise": {}, "provenance": "a"}
    for k in ("zero_shot", "features", "calibration", "affinity", "choice", "approx", "stability", "all_s0",
              "methods_s0"):
        into[k] = {}
    out = merge_stages.merge(into, work, ["fidelity"], ["truth_noise"], "b")
    assert out["fidelity"] == {"mean_relative_error_loss": 0.04} and "truth_noise" not in out
    assert out["provenance"] == "a; b" and not out["complete"]  # selection_s0 is missing
    into["selection_s0"] = {}
    assert merge_stages.merge(into, work, ["fidelity"], [], "c")["complete"]
    with pytest.raises(FileNotFoundError, match="methods_s1"):
        merge_stages.merge(into, work, ["methods_s1"], [], "d")
    with pytest.raises(ValueError, match="not a stage name"):
        merge_stages.merge(into, work, ["../fidelity"], [], "e")
