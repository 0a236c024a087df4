"""MLflow registry for the ensemble: log versions, promote by alias, load the champion and predict
(in-process, through the click command, from a fresh interpreter, and through `mlflow models serve` over
HTTP). A real sqlite store in tmp."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from grouplora.ml.ensemble import AdapterSpec, DatasetSpec, Ensemble, predict, release  # noqa: E402
from grouplora.ml.model import label_token_ids, load_base_model, model_fingerprint  # noqa: E402
from grouplora.ml.prompts import render  # noqa: E402
from grouplora.ml.training import TrainConfig, TrainExample, train_adapter  # noqa: E402
from grouplora.orchestration.servers import free_port, wait_http  # noqa: E402
from grouplora.orchestration.registry import (ENSEMBLE_JSON, MODEL_CODE, load_for_prediction,  # noqa: E402
                                              log_ensemble, promote)
from grouplora.registry_cli import predict as predict_cmd  # noqa: E402
from grouplora.registry_cli import promote as promote_cmd  # noqa: E402

NAME = "toy-ensemble"
SENT = ("Review: {text} Sentiment:", [" positive", " negative"])
SPAM = ("Email: {text} Label:", [" spam", " ham"])
SENT_TRAIN = [("wonderful great acting", 0), ("a dull boring film", 1), ("great and wonderful", 0),
              ("terrible plot, dull", 1)]
SPAM_TRAIN = [("win a free prize now", 0), ("meeting moved to friday", 1), ("click here for a free prize", 0),
              ("see the agenda for friday", 1)]
# what the registered model is asked: the datasets interleaved, so row order must survive the grouping
QUERY = pd.DataFrame({"dataset": ["sent", "spam", "sent", "spam"],
                      "text": ["wonderful great acting", "win a free prize now", "a dull boring film",
                               "meeting moved to friday"]})


pytestmark = pytest.mark.usefixtures("one_thread")


def write_ensemble(path: Path, adapters: dict[str, Path], weights: dict, tok, fingerprint: str) -> Path:
    datasets = {name: DatasetSpec(label_words=words, template=tmpl, label_ids=label_token_ids(tok, words))
                for name, (tmpl, words) in (("sent", SENT), ("spam", SPAM))}
    # sent has class names unlike its label words; spam has none: its labels are the stripped words
    ens = Ensemble(base_model="tiny", base_fingerprint=fingerprint,
                   adapters=[AdapterSpec(n, str(p), [n]) for n, p in adapters.items()],
                   weights=weights, datasets=datasets, meta={"classes": {"sent": ["pos", "neg"]}})
    return ens.save(path)


def reference(ensemble_json: Path, model, tok, merged: bool = False) -> pd.DataFrame:
    """What ml.ensemble.predict says on QUERY, mapped to class names by hand."""
    ens = Ensemble.load(ensemble_json)
    classes = {"sent": ["pos", "neg"], "spam": ["spam", "ham"]}
    label, prob = [], []
    for d, text in zip(QUERY["dataset"], QUERY["text"]):
        y, p = predict(ens, model, tok, d, [render(ens.datasets[d].template, text)], merged=merged)
        label.append(classes[d][int(y[0])])
        prob.append(float(p[0, y[0]]))
    release(model)
    return pd.DataFrame({"dataset": QUERY["dataset"], "label": label, "probability": prob})


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """Train two adapters, log three ensemble versions (metrics 0.6, 0.5, 0.7), promoting after each."""
    root = tmp_path_factory.mktemp("registry")
    work = root / "work"  # deleted after logging: the registered artifacts must stand on their own
    model, tok = load_base_model("tiny")
    fp = model_fingerprint(model)
    cfg = TrainConfig(r=4, alpha=8, lr=1e-2, epochs=3, batch_size=4)
    adapters = {}
    for name, (tmpl, words), rows in (("sent", SENT, SENT_TRAIN), ("spam", SPAM, SPAM_TRAIN)):
        ids = label_token_ids(tok, words)
        examples = [TrainExample(render(tmpl, t), y, ids) for t, y in rows]
        train_adapter(model, examples, cfg, work / "adapters" / name, tokenizer=tok)
        adapters[name] = work / "adapters" / name
    v1_json = write_ensemble(work / "v1" / ENSEMBLE_JSON, adapters,
                             {"sent": {"sent": 1.0, "spam": 0.3}, "spam": {"sent": 0.2, "spam": 1.0}}, tok, fp)
    # the champion: two adapters in one pass for sent; spam's second adapter has α = 0 (skipped)
    v3_json = write_ensemble(work / "v3" / ENSEMBLE_JSON, adapters,
                             {"sent": {"sent": 2.0, "spam": 0.5}, "spam": {"spam": 2.0, "sent": 0.0}}, tok, fp)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    steps = []
    for path, acc in ((v1_json, 0.6), (v1_json, 0.5), (v3_json, 0.7)):
        info = log_ensemble(path, registered_name=NAME, tracking_uri=uri, metrics={"val_accuracy": acc})
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        challenger = str(client.get_model_version_by_alias(NAME, "challenger").version)
        steps.append((info, challenger, promote(NAME, tracking_uri=uri)))
    expected = {"v1": reference(v1_json, model, tok), "v3": reference(v3_json, model, tok),
                "v3_merged": reference(v3_json, model, tok, merged=True)}
    shutil.rmtree(work)
    return {"uri": uri, "steps": steps, "expected": expected, "root": root}


def test_log_sets_challenger_and_tags_the_metric(registry):
    client = MlflowClient(tracking_uri=registry["uri"], registry_uri=registry["uri"])
    (i1, ch1, _), (i2, ch2, _), (i3, ch3, _) = registry["steps"]
    assert [i1.version, i2.version, i3.version] == ["1", "2", "3"]
    assert [ch1, ch2, ch3] == ["1", "2", "3"]  # each new version is the challenger right after logging
    mv = client.get_model_version(NAME, "2")
    assert float(mv.tags["val_accuracy"]) == 0.5 and mv.run_id == i2.run_id
    assert client.get_run(i2.run_id).data.metrics["val_accuracy"] == 0.5
    # the artifact holds the JSON and the adapters' peft files, not the training checkpoints
    files = {Path(f.path).name for f in mlflow.artifacts.list_artifacts(
        artifact_uri=f"runs:/{i1.run_id}/model/artifacts/ensemble/adapters/00", tracking_uri=registry["uri"])}
    assert files == {"adapter_config.json", "adapter_model.safetensors"}


def test_versions_are_models_from_code_not_pickles(registry):
    info = registry["steps"][0][0]
    local = Path(mlflow.artifacts.download_artifacts(f"runs:/{info.run_id}/model", tracking_uri=registry["uri"],
                                                     dst_path=str(registry["root"] / "download")))
    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["model_code_path"].endswith("serving_model.py")
    assert (local / "serving_model.py").read_text() == MODEL_CODE.read_text()
    assert not list(local.rglob("*.pkl"))  # no cloudpickled python_model
    assert yaml.safe_load((local / "MLmodel").read_text())["signature"]["params"]


def test_promotion_follows_the_metric(registry):
    (_, _, p1), (_, _, p2), (_, _, p3) = registry["steps"]
    assert p1.promoted and p1.champion_version == "1" and p1.champion_value is None  # no champion before
    assert not p2.promoted and p2.champion_version == "1" and p2.challenger_version == "2"
    assert (p2.challenger_value, p2.champion_value) == (0.5, 0.6) and "does not beat" in p2.reason
    assert p3.promoted and p3.champion_version == "3" and (p3.challenger_value, p3.champion_value) == (0.7, 0.6)
    client = MlflowClient(tracking_uri=registry["uri"], registry_uri=registry["uri"])
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "3"
    again = promote(NAME, tracking_uri=registry["uri"])  # the challenger already is the champion
    assert not again.promoted and again.champion_version == "3"


def test_promote_ties_and_lower_is_better(registry, tmp_path):
    uri = registry["uri"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.set_registered_model_alias(NAME, "challenger", "1")  # v1 (0.6) vs champion v3 (0.7)
    try:
        assert not promote(NAME, tracking_uri=uri).promoted
        client.set_model_version_tag(NAME, "1", "val_accuracy", "0.7")  # a tie is not a win
        assert not promote(NAME, tracking_uri=uri).promoted
        r = promote(NAME, tracking_uri=uri, higher_is_better=False)  # 0.7 vs 0.7 still a tie
        assert not r.promoted
        client.set_model_version_tag(NAME, "1", "val_accuracy", "0.65")
        r = promote(NAME, tracking_uri=uri, higher_is_better=False)
        assert r.promoted and str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    finally:  # other tests expect v3 as champion
        client.set_model_version_tag(NAME, "1", "val_accuracy", "0.6")
        client.set_registered_model_alias(NAME, "champion", "3")
        client.set_registered_model_alias(NAME, "challenger", "3")
    r = promote(NAME, tracking_uri=uri, metric="val_f1")  # a metric nobody logged: refused, not promoted
    assert not r.promoted and "val_f1" in r.reason


@pytest.fixture(scope="module")
def champion(registry):
    return load_for_prediction(f"models:/{NAME}@champion", tracking_uri=registry["uri"])


def test_champion_predicts_like_the_ensemble(registry, champion):
    out = champion.predict(QUERY)
    exp = registry["expected"]["v3"]
    assert list(out.columns) == ["dataset", "label", "probability"]
    assert list(out["dataset"]) == list(QUERY["dataset"])
    assert set(out.loc[out.dataset == "sent", "label"]) <= {"pos", "neg"}
    assert set(out.loc[out.dataset == "spam", "label"]) <= {"spam", "ham"}
    assert out["probability"].between(0.5, 1.0).all()  # two classes: the argmax has at least half
    assert list(out["label"]) == list(exp["label"])
    np.testing.assert_allclose(out["probability"], exp["probability"], rtol=1e-5)
    # v1 has other weights: loading it by version gives v1's answers, not the champion's
    v1 = load_for_prediction(f"models:/{NAME}/1", tracking_uri=registry["uri"]).predict(QUERY)
    np.testing.assert_allclose(v1["probability"], registry["expected"]["v1"]["probability"], rtol=1e-5)
    assert not np.allclose(v1["probability"], out["probability"])


def test_merged_param_serves_the_merged_adapters(registry, champion):
    out = champion.predict(QUERY, params={"merged": True})
    exp, exact = registry["expected"]["v3_merged"], registry["expected"]["v3"]
    np.testing.assert_allclose(out["probability"], exp["probability"], rtol=1e-5)
    assert list(out["label"]) == list(exp["label"])
    # spam has one adapter with α > 0: merged is exact there; sent merges two adapters: an approximation
    spam = QUERY.dataset == "spam"
    np.testing.assert_allclose(out["probability"][spam], exact["probability"][spam], rtol=1e-5)
    assert not np.allclose(out["probability"][~spam], exact["probability"][~spam], rtol=1e-6, atol=0)


def test_concurrent_requests_get_the_sequential_answers(champion):
    """The server predicts in threads; the adapters on the shared base must not leak between requests."""
    from concurrent.futures import ThreadPoolExecutor

    frames = [QUERY, QUERY.iloc[[1, 3]], QUERY.iloc[[0, 2]]] * 2
    params = [{"merged": i % 2 == 1} for i in range(len(frames))]
    want = [champion.predict(f, params=p) for f, p in zip(frames, params)]
    with ThreadPoolExecutor(len(frames)) as pool:
        got = list(pool.map(lambda fp: champion.predict(fp[0], params=fp[1]), zip(frames, params)))
    for g, w in zip(got, want):
        assert list(g["label"]) == list(w["label"])
        np.testing.assert_allclose(g["probability"], w["probability"], rtol=1e-6)


def test_text_pair_column_is_optional_and_used(champion):
    frame = QUERY.assign(text_pair=[None, "extra words", None, None])
    out = champion.predict(frame)
    base = champion.predict(QUERY)
    assert len(out) == 4
    # the templates have no {text_pair}: the pair cannot change anything here
    np.testing.assert_allclose(out["probability"], base["probability"], rtol=1e-6)


def test_unknown_dataset_names_it_and_the_known_ones(champion):
    with pytest.raises(Exception, match=r"'nope'.*'sent', 'spam'"):
        champion.predict(pd.DataFrame({"dataset": ["sent", "nope"], "text": ["a", "b"]}))


def test_cli_predict_and_promote(registry):
    exp = registry["expected"]["v3"]
    sent = exp[exp.dataset == "sent"]
    runner = CliRunner()
    args = ["--tracking-uri", registry["uri"], "--model", f"models:/{NAME}@champion", "--dataset", "sent",
            "--text", QUERY.text[0], "--text", QUERY.text[2]]
    res = runner.invoke(predict_cmd, args)
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()  # stdout only: library warnings go to stderr
    assert [ln.split("\t")[0] for ln in lines] == list(sent["label"])
    assert [float(ln.split("\t")[1]) for ln in lines] == pytest.approx(list(sent["probability"]), abs=1e-4)

    res = runner.invoke(predict_cmd, args + ["--json"])
    rows = [json.loads(ln) for ln in res.stdout.strip().splitlines()]
    assert [r["label"] for r in rows] == list(sent["label"]) and rows[0]["text"] == QUERY.text[0]

    res = runner.invoke(predict_cmd, ["--tracking-uri", registry["uri"], "--model", f"models:/{NAME}@champion",
                                      "--dataset", "nope", "--text", "x"])
    assert res.exit_code != 0 and "nope" in res.output and "'sent', 'spam'" in res.output

    res = runner.invoke(promote_cmd, ["--name", NAME], env={"MLFLOW_TRACKING_URI": registry["uri"]})
    assert res.exit_code == 0, res.output
    assert "not promoted" in res.stdout and "champion: v3" in res.stdout


def test_predict_from_a_fresh_interpreter(registry, tmp_path):
    """Nothing in memory: a new python process, MLflow store via the environment, cwd elsewhere."""
    exp = registry["expected"]["v3"]
    spam = exp[exp.dataset == "spam"]
    code = ("import sys; from grouplora.registry_cli import predict; "
            "predict(sys.argv[1:], prog_name='grouplora predict')")
    env = {**os.environ, "MLFLOW_TRACKING_URI": registry["uri"], "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.run([sys.executable, "-c", code, "--dataset", "spam", "--text", QUERY.text[1],
                           "--text", QUERY.text[3], "--model", f"models:/{NAME}@champion"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    labels = [ln.split("\t")[0] for ln in proc.stdout.strip().splitlines()]
    assert labels == list(spam["label"])


# ------------------------------------------------------------------------------------------- serving


def http(url: str, body: dict | None = None, timeout: float = 60) -> tuple[int, dict | str]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            text = r.read().decode()
            status = r.status
    except urllib.error.HTTPError as e:
        text, status = e.read().decode(), e.code
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


@pytest.fixture(scope="module")
def server(registry):
    """`mlflow models serve -m models:/<name>@champion --env-manager local` on 127.0.0.1 and a free port.

    Its own process group: mlflow starts uvicorn as a child, and the whole group is stopped afterwards."""
    port, log = free_port(), registry["root"] / "server.log"
    bin_dir = str(Path(sys.executable).parent)  # mlflow runs `uvicorn` from PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": registry["uri"], "MLFLOW_DISABLE_TELEMETRY": "true",
           "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}@champion",
                                 "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
                                cwd=registry["root"], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_http(url + "/ping", 300, [proc])
        except (RuntimeError, TimeoutError) as e:
            pytest.fail(f"{e}:\n{log.read_text()[-3000:]}")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_served_champion_answers_like_grouplora_predict(registry, server):
    status, body = http(server + "/invocations", {"dataframe_split": QUERY.to_dict(orient="split", index=False)})
    assert status == 200, body
    served = pd.DataFrame(body["predictions"])
    assert list(served["dataset"]) == list(QUERY["dataset"])  # row order kept across the datasets
    # `grouplora predict` on the same texts, one call per dataset
    runner = CliRunner()
    cli = {}
    for d in ("sent", "spam"):
        texts = [t for ds, t in zip(QUERY.dataset, QUERY.text) if ds == d]
        res = runner.invoke(predict_cmd, ["--tracking-uri", registry["uri"], "--model", f"models:/{NAME}@champion",
                                          "--dataset", d, "--json", *[a for t in texts for a in ("--text", t)]])
        assert res.exit_code == 0, res.output
        cli.update({(d, r["text"]): r for r in map(json.loads, res.stdout.strip().splitlines())})
    want = [cli[(d, t)] for d, t in zip(QUERY.dataset, QUERY.text)]
    assert list(served["label"]) == [r["label"] for r in want]
    assert list(served["probability"]) == pytest.approx([r["probability"] for r in want], abs=1e-6)  # CLI: 6 d.p.
    np.testing.assert_allclose(served["probability"], registry["expected"]["v3"]["probability"], rtol=1e-5)

    # params travel too: the merged adapters
    status, body = http(server + "/invocations", {"dataframe_split": QUERY.to_dict(orient="split", index=False),
                                                  "params": {"merged": True}})
    assert status == 200, body
    np.testing.assert_allclose(pd.DataFrame(body["predictions"])["probability"],
                               registry["expected"]["v3_merged"]["probability"], rtol=1e-5)


def test_served_champion_rejects_an_unknown_dataset_by_name(server):
    status, body = http(server + "/invocations",
                        {"dataframe_split": {"columns": ["dataset", "text"], "data": [["nope", "hello"]]}})
    assert status >= 400 and "nope" in json.dumps(body)
