"""The model registry and the prediction endpoint, end to end: real worker, real MLflow registry, real PNGs."""

from __future__ import annotations

import base64
import io
import json
import os
import pickle
import socket
import subprocess
import sys
import threading
import time

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from trainyard.db import upgrade_schema
from trainyard.ml.datasets import FORMATS
from trainyard_web import create_app
from conftest import ROOT, WorkerProcess, claimed_redis_database, make_settings, wait_for_job, authed_client, make_token

MODEL = "digits-cnn"


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def platform(tmp_path_factory, redis_server):
    with claimed_redis_database(redis_server) as broker_url:
        yield from _platform(tmp_path_factory, broker_url)


def _platform(tmp_path_factory, broker_url):
    tmp = tmp_path_factory.mktemp("registry")
    # The load test below sends thousands of predictions a minute on purpose.
    settings = make_settings(tmp, broker_url=broker_url).model_copy(update={"predict_rate_limit": "100000/minute"})
    upgrade_schema(settings.database_url)
    app = create_app(settings)
    client = authed_client(app)
    worker = WorkerProcess(settings, tmp / "worker.log")
    worker.wait_ready()
    jobs = {}
    for label, epochs in (("weak", 1), ("strong", 6)):
        response = client.post("/api/v1/jobs", json={"kind": "train", "dataset": "digits", "architecture": "cnn",
                                                     "params": {"epochs": epochs, "lr": 0.003}})
        jobs[label] = response.get_json()["id"]
    unregistered = client.post("/api/v1/jobs", json={"kind": "train", "dataset": "digits", "architecture": "cnn",
                                                     "params": {"epochs": 1}, "register": False}).get_json()["id"]
    for label, job_id in {**jobs, "unregistered": unregistered}.items():
        job = wait_for_job(client, job_id, {"SUCCEEDED", "FAILED", "CANCELLED"}, timeout=300)
        assert job["status"] == "SUCCEEDED", f"{job['error']}\n{worker.log()[-3000:]}"
        jobs[label] = job
    yield settings, client, jobs
    worker.stop()


def digit_pngs(split: str = "test") -> tuple[list[bytes], np.ndarray]:
    data = getattr(FORMATS.get("digits").obj.load(None, None), split)
    files = []
    for image in data.tensors[0]:
        buffer = io.BytesIO()
        Image.fromarray(image[0].numpy(), "L").save(buffer, "PNG")
        files.append(buffer.getvalue())
    return files, data.tensors[1].numpy()


def predict_files(client, files: list[bytes], query: str = ""):
    payload = {"images": [(io.BytesIO(b), f"digit-{i}.png") for i, b in enumerate(files)]}
    return client.post(f"/api/v1/models/{MODEL}/predict{query}", data=payload, content_type="multipart/form-data")


def test_training_jobs_register_versions(platform):
    settings, client, jobs = platform
    weak, strong = jobs["weak"], jobs["strong"]
    assert (weak["model_name"], strong["model_name"]) == (MODEL, MODEL)
    assert {weak["model_version"], strong["model_version"]} == {1, 2}
    assert jobs["unregistered"]["model_version"] is None
    detail = client.get(f"/api/v1/models/{MODEL}").get_json()
    versions = {v["job_id"]: v for v in detail["versions"]}
    assert set(versions) == {weak["id"], strong["id"]}  # register: false added nothing
    v = versions[strong["id"]]
    assert v["primary_metric"] == "test_accuracy"
    assert v["primary_value"] == pytest.approx(strong["metrics"]["test_accuracy"])
    assert v["tags"]["trainyard.dataset_fingerprint"] and v["tags"]["trainyard.architecture"] == "cnn"
    assert v["links"]["mlflow_run"].endswith(strong["mlflow_run_id"])
    listed = client.get("/api/v1/models").get_json()["items"]
    assert [m["name"] for m in listed] == [MODEL] and listed[0]["latest_version"] == 2
    one = client.get(f"/api/v1/models/{MODEL}/versions/{v['version']}").get_json()
    assert one["job_id"] == strong["id"]
    assert client.get(f"/api/v1/models/{MODEL}/versions/99").status_code == 404
    assert client.get("/api/v1/models/nope").status_code == 404
    # The MLflow registry is the same registry.
    assert MlflowClient(settings.mlflow_tracking_uri).get_registered_model(MODEL).name == MODEL


def version_of(jobs, label: str, client) -> int:
    detail = client.get(f"/api/v1/models/{MODEL}").get_json()
    return next(v["version"] for v in detail["versions"] if v["job_id"] == jobs[label]["id"])


def test_promotion_guard_audit_and_rollback(platform):
    settings, client, jobs = platform
    weak, strong = version_of(jobs, "weak", client), version_of(jobs, "strong", client)
    headers = {"Authorization": f"Bearer {make_token(settings, 'member', 'ada')}"}  # a member moves staging
    assert client.put(f"/api/v1/models/{MODEL}/aliases/staging", json={"version": weak}, headers=headers).status_code == 200
    # ... but only an admin moves production
    refused = client.put(f"/api/v1/models/{MODEL}/aliases/production", json={"version": weak}, headers=headers)
    assert refused.status_code == 403 and "admin" in refused.get_json()["detail"]
    assert client.put(f"/api/v1/models/{MODEL}/aliases/staging", json={"version": strong}).status_code == 200
    refused = client.put(f"/api/v1/models/{MODEL}/aliases/staging", json={"version": weak})
    assert refused.status_code == 409 and "worse" in refused.get_json()["detail"]
    forced = client.put(f"/api/v1/models/{MODEL}/aliases/staging", json={"version": weak, "force": True})
    assert forced.status_code == 200 and forced.get_json()["forced"] is True
    for bad, status in (("Bad_Alias", 422), ("staging", 404)):
        version = 99 if bad == "staging" else weak
        assert client.put(f"/api/v1/models/{MODEL}/aliases/{bad}", json={"version": version}).status_code == status
    assert client.put(f"/api/v1/models/{MODEL}/aliases/staging", json={"version": "x"}).status_code == 422
    history = client.get(f"/api/v1/models/{MODEL}/history").get_json()["items"]
    assert [(e["from_version"], e["to_version"], e["forced"]) for e in history] == [
        (strong, weak, True), (weak, strong, False), (None, weak, False)]
    assert history[-1]["actor"] == "ada"
    removed = client.delete(f"/api/v1/models/{MODEL}/aliases/staging")
    assert removed.status_code == 200 and removed.get_json()["to_version"] is None
    assert client.delete(f"/api/v1/models/{MODEL}/aliases/staging").status_code == 404


def test_endpoint_accuracy_matches_the_job_and_mlflow_pyfunc(platform):
    settings, client, jobs = platform
    strong = version_of(jobs, "strong", client)
    client.put(f"/api/v1/models/{MODEL}/aliases/production", json={"version": strong, "force": True})
    files, labels = digit_pngs()
    predicted = []
    for start in range(0, len(files), 64):
        response = predict_files(client, files[start:start + 64])
        assert response.status_code == 200, response.get_json()
        body = response.get_json()
        assert body["version"] == strong and body["alias"] == "production"
        predicted += [int(p["top"][0]["label"]) for p in body["predictions"]]
    accuracy = float(np.mean(np.array(predicted) == labels))
    assert abs(accuracy - jobs["strong"]["metrics"]["test_accuracy"]) <= 0.01

    # MLflow's own tooling loads the same version and predicts the same classes.
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    pyfunc = mlflow.pyfunc.load_model(f"models:/{MODEL}@production")
    recorded = mlflow.models.get_model_info(f"models:/{MODEL}@production").metadata["trainyard"]
    test = FORMATS.get("digits").obj.load(None, None).test.tensors[0][:64].numpy().astype(np.float32)
    x = (test / 255 - recorded["mean"][0]) / recorded["std"][0]
    assert list(np.asarray(pyfunc.predict(x)).argmax(axis=1)) == predicted[:64]


def test_json_base64_and_top_k(platform):
    _, client, jobs = platform
    files, _ = digit_pngs()
    body = {"images": [base64.b64encode(files[0]).decode(), {"name": "second.png", "data": base64.b64encode(files[1]).decode()}]}
    response = client.post(f"/api/v1/models/{MODEL}/predict?version=1&top_k=3", json=body)
    assert response.status_code == 200, response.get_json()
    result = response.get_json()
    assert result["version"] == 1 and result["alias"] is None
    assert [p["file"] for p in result["predictions"]] == ["images[0]", "second.png"]
    top = result["predictions"][0]["top"]
    assert len(top) == 3 and top[0]["probability"] >= top[1]["probability"] >= top[2]["probability"]


def test_bad_inputs_are_refused_with_the_file_named(platform):
    _, client, _ = platform
    files, _ = digit_pngs()
    truncated = files[0][: len(files[0]) // 2]
    cases = [
        ([b"hello, not an image"], 422, "digit-0.png"),
        ([files[0], truncated], 422, "digit-1.png"),
        ([files[0]] * 65, 422, "at most 64"),
    ]
    for payload, status, fragment in cases:
        response = predict_files(client, payload, "?version=1")
        assert response.status_code == status, response.get_json()
        assert response.content_type == "application/problem+json"
        assert fragment in response.get_json()["detail"]
    huge = Image.new("L", (5000, 5000))
    buffer = io.BytesIO()
    huge.save(buffer, "PNG")
    # Cut short: decoding it would fail as truncated, so "pixels" shows it was refused from its header.
    too_many_pixels = predict_files(client, [buffer.getvalue()[: len(buffer.getvalue()) // 2]], "?version=1")
    assert too_many_pixels.status_code == 422 and "5000×5000 pixels is more than" in too_many_pixels.get_json()["detail"]
    too_big = client.post(f"/api/v1/models/{MODEL}/predict?version=1", data=b"x" * (65 * 1024 * 1024),
                          content_type="application/octet-stream")
    assert too_big.status_code == 413 and too_big.content_type == "application/problem+json"
    assert client.post(f"/api/v1/models/{MODEL}/predict?version=1", json={"images": ["%%%"]}).status_code == 422
    assert client.post(f"/api/v1/models/{MODEL}/predict?version=1", json={"pictures": []}).status_code == 422
    assert client.post(f"/api/v1/models/{MODEL}/predict?alias=nowhere", json={"images": []}).status_code == 422
    no_alias = predict_files(client, files[:1], "?alias=nowhere")
    assert no_alias.status_code == 404 and "no alias" in no_alias.get_json()["detail"]
    assert predict_files(client, files[:1], "?alias=production&version=1").status_code == 422


class Payload:
    """Unpickling this runs code: it writes the marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_planted_pickle_is_refused_and_never_runs(platform, tmp_path):
    settings, client, _ = platform
    marker = tmp_path / "pwned"
    tracking = MlflowClient(settings.mlflow_tracking_uri)
    experiment = tracking.get_experiment_by_name(settings.mlflow_experiment).experiment_id
    run = tracking.create_run(experiment)
    model_dir = tmp_path / "model"
    (model_dir / "extra_files").mkdir(parents=True)
    (model_dir / "data").mkdir()
    evil = pickle.dumps(Payload(str(marker)))
    (model_dir / "extra_files" / "weights.safetensors").write_bytes(evil)
    (model_dir / "data" / "model.pth").write_bytes(evil)
    (model_dir / "extra_files" / "trainyard.json").write_text(json.dumps({
        "task": "classification", "classes": [str(i) for i in range(10)], "image_shape": [1, 8, 8],
        "mean": [0.3], "std": [0.4], "architecture": "cnn", "architecture_options": {}}))
    (model_dir / "MLmodel").write_text("flavors:\n  pytorch:\n    pytorch_version: 2.14.1\n")
    tracking.log_artifacts(run.info.run_id, str(model_dir), "model")
    tracking.create_registered_model("evil")
    tracking.create_model_version("evil", f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    files, _ = digit_pngs()
    response = client.post("/api/v1/models/evil/predict?version=1", data={"images": (io.BytesIO(files[0]), "x.png")},
                           content_type="multipart/form-data")
    assert response.status_code == 409, response.get_json()
    assert "cannot be loaded safely" in response.get_json()["detail"]
    assert not marker.exists()
    pickle.loads(evil)  # the same bytes do run code when unpickled: the refusal above is what stopped it
    assert marker.exists()


def test_alias_move_under_load_switches_without_a_failed_request(platform):
    _, client, jobs = platform
    weak, strong = version_of(jobs, "weak", client), version_of(jobs, "strong", client)
    client.put(f"/api/v1/models/{MODEL}/aliases/live", json={"version": weak, "force": True})
    files, _ = digit_pngs()
    answers: list[tuple[float, int, int]] = []  # (when the request was sent, status, version that answered)
    stop = threading.Event()

    def hammer() -> None:
        local = client.application.test_client()
        local.environ_base.update(client.environ_base)  # the same token
        while not stop.is_set():
            sent = time.monotonic()
            response = predict_files(local, files[:4], "?alias=live")
            answers.append((sent, response.status_code, response.get_json().get("version", -1)))

    thread = threading.Thread(target=hammer)
    thread.start()
    time.sleep(1.0)
    assert client.put(f"/api/v1/models/{MODEL}/aliases/live", json={"version": strong}).status_code == 200
    moved_at = time.monotonic()
    deadline = moved_at + 10
    while time.monotonic() < deadline and sum(t > moved_at for t, _, _ in answers) < 3:
        time.sleep(0.05)
    stop.set()
    thread.join()
    assert answers and all(status == 200 for _, status, _ in answers)
    assert any(v == weak for t, _, v in answers if t < moved_at)
    # Every request sent once the move was made answers from the new version: no cache lag.
    after = [v for t, _, v in answers if t > moved_at]
    assert len(after) >= 3 and set(after) == {strong}, after


def test_another_serving_process_sees_a_move_through_the_alias_events(platform):
    from trainyard import model_registry
    from trainyard.db import Database
    from trainyard_web import serving

    settings, client, jobs = platform
    weak, strong = version_of(jobs, "weak", client), version_of(jobs, "strong", client)
    client.put(f"/api/v1/models/{MODEL}/aliases/elsewhere", json={"version": weak, "force": True})
    db = Database(settings.database_url)
    try:
        other = serving.ModelServer(settings, db)  # as in another process: not told of moves made here
        model_registry._ALIAS_WATCHERS.discard(other)
        assert other.resolve(MODEL, "elsewhere", None) == weak
        assert client.put(f"/api/v1/models/{MODEL}/aliases/elsewhere", json={"version": strong}).status_code == 200
        time.sleep(serving.ALIAS_CHECK_SECONDS)
        assert other.resolve(MODEL, "elsewhere", None) == strong
    finally:
        db.dispose()


def test_a_lone_prediction_never_waits_to_be_batched(platform, monkeypatch):
    from trainyard.db import Database
    from trainyard_web import serving

    settings, _, _ = platform
    monkeypatch.setattr(serving, "MAX_BATCH_WAIT_SECONDS", 30.0)  # a wait would be plain to see
    files, _ = digit_pngs()
    db = Database(settings.database_url)
    try:
        server = serving.ModelServer(settings, db)
        started = time.monotonic()
        for image in files[:20]:
            assert server.predict(MODEL, [("digit.png", image)], version=1)["predictions"][0]["top"]
        # A forward that counted the request it serves as still on its way would wait 30 s for it.
        assert time.monotonic() - started < 25
    finally:
        db.dispose()


def test_an_alias_moved_in_mlflow_directly_is_picked_up(platform, monkeypatch):
    from trainyard_web import serving

    settings, client, jobs = platform
    weak, strong = version_of(jobs, "weak", client), version_of(jobs, "strong", client)
    client.put(f"/api/v1/models/{MODEL}/aliases/outside", json={"version": weak, "force": True})
    files, _ = digit_pngs()
    assert predict_files(client, files[:1], "?alias=outside").get_json()["version"] == weak
    # Behind Trainyard's back: no alias event, so only the periodic re-check can see it.
    MlflowClient(settings.mlflow_tracking_uri).set_registered_model_alias(MODEL, "outside", str(strong))
    assert predict_files(client, files[:1], "?alias=outside").get_json()["version"] == weak  # still cached
    monkeypatch.setattr(serving, "ALIAS_RECHECK_SECONDS", 0.0)  # as if the re-check period had passed
    assert predict_files(client, files[:1], "?alias=outside").get_json()["version"] == strong


def test_the_prediction_server_remembers_a_token_briefly_the_api_not_at_all(platform):
    from trainyard import auth
    from trainyard.db import Database
    from trainyard_web import create_serving_app

    settings, client, _ = platform
    serving = create_serving_app(settings.model_copy(update={"serving_token_cache_seconds": 1.0})).test_client()
    token = make_token(settings, "member", "tess")
    headers = {"Authorization": f"Bearer {token}"}

    def predict_status() -> int:  # an unknown model: 404 once authenticated, 401 if not
        return serving.post("/api/v1/models/no-such-model/predict", headers=headers, content_type="multipart/form-data",
                            data={"images": (io.BytesIO(b"x"), "x.png")}).status_code

    assert predict_status() == 404
    db = Database(settings.database_url)
    try:
        auth.revoke_token(db, auth.authenticate(db, token).token_id, auth.authenticate(db, token))
    finally:
        db.dispose()
    assert client.get("/api/v1/jobs", headers=headers).status_code == 401  # the API: at once
    assert predict_status() == 404  # the prediction server: still remembered...
    time.sleep(1.1)
    assert predict_status() == 401  # ...for at most serving_token_cache_seconds


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_trainyard_serve_runs_the_endpoint_on_its_own(platform, tmp_path):
    settings, client, jobs = platform
    client.put(f"/api/v1/models/{MODEL}/aliases/production", json={"version": version_of(jobs, "strong", client),
                                                                     "force": True})
    port = free_port()
    member = {"Authorization": f"Bearer {make_token(settings, 'member', 'ada')}"}
    env = {**os.environ, "TRAINYARD_DATA_DIR": str(settings.data_dir), "TRAINYARD_DATABASE_URL": settings.database_url,
           "TRAINYARD_BROKER_URL": settings.broker_url, "TRAINYARD_MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri,
           "TRAINYARD_SERVE_PORT": str(port),
           "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("platform", "workers", "web"))}
    server = subprocess.Popen([sys.executable, "-m", "trainyard", "serve", "--workers", "1"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import httpx

        files, labels = digit_pngs()
        deadline = time.monotonic() + 60
        while True:
            try:
                response = httpx.post(f"http://127.0.0.1:{port}/api/v1/models/{MODEL}/predict",
                                      files=[("images", ("a.png", files[0], "image/png"))], headers=member,
                                      timeout=30)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and server.poll() is None
                time.sleep(0.5)
        assert response.status_code == 200, response.text
        assert int(response.json()["predictions"][0]["top"][0]["label"]) == labels[0]
        assert httpx.post(f"http://127.0.0.1:{port}/api/v1/models/{MODEL}/predict", timeout=10,
                          files=[("images", ("a.png", files[0], "image/png"))]).status_code == 401  # tokens here too
        assert httpx.get(f"http://127.0.0.1:{port}/api/v1/jobs", headers=member, timeout=10).status_code == 404
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_evaluate_a_registered_version(platform):
    _, client, jobs = platform
    strong = version_of(jobs, "strong", client)
    response = client.post("/api/v1/jobs", json={"kind": "evaluate", "dataset": "digits", "model_name": MODEL,
                                                 "model_version": strong})
    assert response.status_code == 201, response.get_json()
    job = wait_for_job(client, response.get_json()["id"], {"SUCCEEDED", "FAILED", "CANCELLED"}, timeout=180)
    assert job["status"] == "SUCCEEDED", job["error"]
    assert job["metrics"]["test_accuracy"] == pytest.approx(jobs["strong"]["metrics"]["test_accuracy"], abs=1e-6)
    both = client.post("/api/v1/jobs", json={"kind": "evaluate", "dataset": "digits", "model_name": MODEL,
                                             "model_version": strong, "source_job": jobs["strong"]["id"]})
    assert both.status_code == 422
    wrong_task = client.post("/api/v1/jobs", json={"kind": "evaluate", "dataset": "shapes", "model_name": MODEL,
                                                   "model_version": strong})
    assert wrong_task.status_code == 422 and "classes" in wrong_task.get_json()["detail"]


def test_predict_job_writes_a_csv_of_predictions(platform):
    settings, client, jobs = platform
    strong = version_of(jobs, "strong", client)
    client.put(f"/api/v1/models/{MODEL}/aliases/batch", json={"version": strong, "force": True})
    folder = settings.dataset_roots[0] / "inbox"
    (folder / "nested").mkdir(parents=True)
    files, labels = digit_pngs()
    for i in range(20):
        (folder / ("nested" if i % 2 else ".") / f"{i:02d}.png").write_bytes(files[i])
    (folder / "broken.png").write_bytes(files[0][:40])
    (folder / "notes.txt").write_text("not an image")
    response = client.post("/api/v1/jobs", json={"kind": "predict", "model_name": MODEL, "alias": "batch",
                                                 "path": str(folder)})
    assert response.status_code == 201, response.get_json()
    submitted = response.get_json()
    assert submitted["spec"]["model_version"] == strong and submitted["spec"]["alias"] is None  # pinned
    job = wait_for_job(client, submitted["id"], {"SUCCEEDED", "FAILED", "CANCELLED"}, timeout=180)
    assert job["status"] == "SUCCEEDED", job["error"]
    assert job["metrics"] == {"images": 20, "unreadable": 1}
    tracking = MlflowClient(settings.mlflow_tracking_uri)
    local = tracking.download_artifacts(job["mlflow_run_id"], "predictions/predictions.csv")
    import csv

    rows = list(csv.DictReader(open(local, encoding="utf-8")))
    assert len(rows) == 21
    broken = next(r for r in rows if r["file"] == "broken.png")
    assert broken["error"] and not broken["label"]
    truth = {(f"nested/{i:02d}.png" if i % 2 else f"{i:02d}.png"): str(labels[i]) for i in range(20)}
    correct = sum(r["label"] == truth[r["file"]] for r in rows if r["file"] in truth)
    assert correct >= 18
    outside = client.post("/api/v1/jobs", json={"kind": "predict", "model_name": MODEL, "alias": "batch",
                                                "path": "/etc"})
    assert outside.status_code == 422
    no_model = client.post("/api/v1/jobs", json={"kind": "predict", "model_name": "nope", "path": str(folder)})
    assert no_model.status_code == 422 and "nope" in no_model.get_json()["detail"]
