"""The UI's pages and forms through Flask's test client (the browser test drives the same in Chromium)."""

from __future__ import annotations

import io
import re
import zipfile
from datetime import timedelta

import pytest
from PIL import Image
from sqlalchemy import update

from trainyard import job_logs, jobs, worker_registry
from trainyard.db import Database
from trainyard.models import JobStatus, Worker, utcnow

from conftest import authed_client, ui_login

GOOD = {"kind": "train", "dataset": "digits", "architecture": "cnn", "params": {"epochs": 2}}


@pytest.fixture
def browser(web_app):
    """An admin logged in to the UI (and holding a token for the API)."""
    client = authed_client(web_app)
    ui_login(client)
    return client


@pytest.fixture
def db(web_settings):
    database = Database(web_settings.database_url)
    yield database
    database.dispose()


def csrf(client, path: str = "/launch") -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', client.get(path).get_data(as_text=True)).group(1)


def launch_form(client, **overrides) -> dict:
    form = {"csrf_token": csrf(client), "dataset": "digits", "architecture": "cnn", "params.epochs": "3",
            "params.lr": "0.001", "params.batch_size": "32", "register": "on", "params.channels_last": "on"}
    form.update(overrides)
    return form


def test_launch_form_is_generated_from_the_spec(browser):
    page = browser.get("/launch").get_data(as_text=True)
    # every hyperparameter, with its bounds as input attributes and its default shown
    assert 'name="params.epochs" type="number"' in page and 'min="1"' in page and 'max="1000"' in page
    assert 'name="params.optimizer"' in page and ">sgd" in page and ">adamw" in page
    assert 'name="params.precision"' in page and 'value="bf16"' in page
    for field in re.findall(r'<input id="([^"]+)"', page):
        assert f'for="{field}"' in page or f'id="{field}" name' in page, field  # every input has a label
    # only architectures that fit the dataset's task
    seg = browser.get("/launch/architectures?dataset=shapes").get_data(as_text=True)
    assert 'value="unet"' in seg and 'value="cnn"' not in seg and 'value="resnet18"' not in seg


@pytest.mark.parametrize("field,value,message", [
    ("params.epochs", "0", "greater than or equal to 1"),
    ("params.lr", "nan", "finite"),
    ("params.batch_size", "ten", "valid integer"),
    ("architecture", "unet", "classification"),
    ("architecture_options", "{not json", "not valid JSON"),
    ("name", "../etc", "should match pattern"),
])
def test_a_bad_value_shows_beside_its_field_and_creates_nothing(browser, web_settings, db, field, value, message):
    response = browser.post("/launch", data=launch_form(browser, **{field: value}))
    assert response.status_code == 422
    page = response.get_data(as_text=True)
    field_id = "field-" + field.replace(".", "-")
    error = re.search(rf'id="{field_id}-error"[^>]*>([^<]+)<', page)
    assert error and message in error.group(1), page[page.find("error"):][:600]
    assert f'value="{value}"' in page or value in page  # what was typed is kept
    assert jobs.list_jobs(db).items == []


def test_launch_clone_cancel_retry_and_compare(browser, db):
    response = browser.post("/launch", data=launch_form(browser, name="first"))
    assert response.status_code == 302
    first = int(response.headers["Location"].rsplit("/", 1)[1])
    clone = browser.get(f"/launch?from={first}").get_data(as_text=True)
    assert 'value="first (clone)"' in clone and 'name="params.epochs" type="number"' in clone
    assert re.search(r'id="field-params-epochs"[^>]*value="3"', clone)
    second = int(browser.post("/launch", data=launch_form(browser, name="second", **{"params.lr": "0.01"}))
                 .headers["Location"].rsplit("/", 1)[1])
    token = csrf(browser, f"/jobs/{first}")
    browser.post(f"/jobs/{first}/cancel", data={"csrf_token": token})
    browser.post(f"/jobs/{second}/cancel", data={"csrf_token": token})
    assert jobs.get_job(db, first).status == JobStatus.CANCELLED
    assert browser.post(f"/jobs/{first}/cancel", data={}).status_code == 400  # CSRF applies to actions
    retried = browser.post(f"/jobs/{first}/retry", data={"csrf_token": token}, follow_redirects=True)
    assert f"Job {first} queued again." in retried.get_data(as_text=True)
    browser.post(f"/jobs/{first}/cancel", data={"csrf_token": token})

    compare = browser.get(f"/compare?id={first}&id={second}").get_data(as_text=True)
    assert "params.lr" in compare and "0.01" in compare and "background:#fffbeb" in compare
    assert browser.get(f"/compare/metrics.json?ids={first},{second}").get_json()["done"] is True
    assert browser.get(f"/compare?id={first}").status_code == 302  # one job is nothing to compare


def test_jobs_table_filters_and_polls_only_while_jobs_are_live(browser, web_app, db):
    api = authed_client(web_app)
    job = api.post("/api/v1/jobs", json=GOOD).get_json()
    api.post("/api/v1/jobs", json={**GOOD, "dataset": "shapes", "architecture": "unet"})
    page = browser.get("/").get_data(as_text=True)
    assert 'hx-trigger="every 2s"' in page and page.count("data-job-id=") == 2
    assert browser.get("/?dataset=shapes").get_data(as_text=True).count("data-job-id=") == 1
    assert browser.get("/?architecture=cnn&status=queued").get_data(as_text=True).count("data-job-id=") == 1
    api.post(f"/api/v1/jobs/{job['id']}/cancel")
    api.post(f"/api/v1/jobs/{job['id'] + 1}/cancel")
    assert 'hx-trigger="every 2s"' not in browser.get("/jobs/rows").get_data(as_text=True)


def test_job_page_explains_the_wait_and_shows_the_log(browser, web_app, web_settings, db):
    api = authed_client(web_app)
    job = api.post("/api/v1/jobs", json={**GOOD, "resources": {"queue": "gpu.a100"}}).get_json()
    page = browser.get(f"/jobs/{job['id']}").get_data(as_text=True)
    assert "no worker serves queue gpu.a100" in page
    waiting = api.get(f"/api/v1/jobs/{job['id']}").get_json()["waiting"]
    assert (waiting["queue"], waiting["jobs_ahead"], waiting["served_by"]) == ("gpu.a100", 0, [])
    worker_registry.register_worker(db, name="gpu0@box", host="box", device="NVIDIA A100", queues=["gpu.a100"])
    assert "served by gpu0@box" in browser.get(f"/jobs/{job['id']}/live").get_data(as_text=True)
    assert api.get(f"/api/v1/jobs/{job['id']}").get_json()["waiting"]["served_by"] == ["gpu0@box"]
    job_logs.append(db, job["id"], 1, [(utcnow(), "epoch 1/2 train_loss=0.52"), (utcnow(), "epoch 2/2 done")])
    activity = browser.get(f"/jobs/{job['id']}/activity").get_data(as_text=True)
    assert "[attempt 1] epoch 1/2 train_loss=0.52" in activity
    lines = api.get(f"/api/v1/jobs/{job['id']}/logs").get_json()
    assert [item["line"] for item in lines["items"]] == ["epoch 1/2 train_loss=0.52", "epoch 2/2 done"]
    assert api.get(f"/api/v1/jobs/{job['id']}/logs?after={lines['next_after']}").get_json()["items"] == []
    assert api.get("/api/v1/jobs/999/logs").status_code == 404


def test_workers_page_and_api_show_lost_workers(browser, web_app, db):
    worker_registry.register_worker(db, name="cpu@a", host="a", device="CPU (2 threads)", queues=["training"])
    worker_registry.register_worker(db, name="gpu0@b", host="b", device="NVIDIA H100", queues=["gpu.h100", "gpu"])
    with db.session_scope() as s:
        s.execute(update(Worker).where(Worker.name == "gpu0@b").values(last_seen=utcnow() - timedelta(minutes=5)))
    pool = authed_client(web_app, role="viewer", user="v").get("/api/v1/workers").get_json()
    alive = {w["name"]: w["alive"] for w in pool["workers"]}
    assert alive == {"cpu@a": True, "gpu0@b": False}
    assert {q["name"]: q["workers"] for q in pool["queues"]} == {"training": ["cpu@a"]}
    page = browser.get("/workers").get_data(as_text=True)
    assert "NVIDIA H100" in page and ">lost<" in page and ">alive<" in page


def test_datasets_page_registers_by_upload_and_shows_samples(browser, web_settings):
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        for cls in ("circle", "square"):
            for i in range(5):
                image = io.BytesIO()
                Image.new("RGB", (10, 10), (40 * i, 200 if cls == "circle" else 0, 0)).save(image, "PNG")
                zf.writestr(f"{cls}/{i}.png", image.getvalue())
    form = {"csrf_token": csrf(browser, "/datasets"), "name": "toy", "format": "imagefolder",
            "archive": (io.BytesIO(archive.getvalue()), "toy.zip")}
    response = browser.post("/datasets", data=form, content_type="multipart/form-data")
    assert response.status_code == 302 and response.headers["Location"] == "/datasets/toy"
    page = browser.get("/datasets/toy").get_data(as_text=True)
    assert page.count('src="data:image/png;base64,') >= 6 and "circle" in page and "square" in page
    bad = browser.post("/datasets", data={"csrf_token": csrf(browser, "/datasets"), "name": "Bad Name",
                                          "format": "imagefolder", "path": "/etc"})
    assert bad.status_code == 422 and "invalid name" in bad.get_data(as_text=True)
    outside = browser.post("/datasets", data={"csrf_token": csrf(browser, "/datasets"), "name": "etc",
                                              "format": "imagefolder", "path": "/etc"})
    assert outside.status_code == 422 and "outside the allowed folders" in outside.get_data(as_text=True)


def test_viewers_see_pages_but_cannot_launch(web_app, web_settings):
    viewer = authed_client(web_app, role="viewer", user="vera")
    ui_login(viewer)
    assert viewer.get("/").status_code == 200
    refused = viewer.get("/launch")
    assert refused.status_code == 403 and "needs the member role" in refused.get_data(as_text=True)
    assert refused.mimetype == "text/html"
    assert viewer.get("/jobs/12345").status_code == 404
    token = csrf(viewer, "/datasets")
    response = viewer.post("/datasets", data={"csrf_token": token, "name": "x", "format": "imagefolder", "path": "/x"})
    assert response.status_code == 403


def test_sweep_form_opens_from_a_job_refuses_bad_input_in_place_and_starts_a_sweep(browser, web_app, db):
    job = browser.post("/api/v1/jobs", json={**GOOD, "name": "base-job", "params": {"epochs": 4, "lr": 0.002}}).get_json()
    detail = browser.get(f"/jobs/{job['id']}").get_data(as_text=True)
    assert f'href="/sweeps/new?from={job["id"]}"' in detail  # "Sweep" beside "Clone"

    form = browser.get(f"/sweeps/new?from={job['id']}").get_data(as_text=True)
    assert "base-job sweep" in form and "lr: 0.002" in form  # the job's spec is the base
    assert "params.lr:" in form and "val_accuracy" in form
    fields = {"csrf_token": csrf(browser, "/sweeps/new"), "name": "from the form", "algorithm": "random",
              "objective.metric": "val_accuracy", "objective.direction": "", "objective.at": "best",
              "early_stopping.type": "median", "early_stopping.min_epochs": "1", "max_trials": "4",
              "max_parallel": "2", "seed": "0", "model_name": "",
              "base": "dataset: digits\narchitecture: cnn\nparams: {epochs: 4}\n",
              "space": "params.lrr: {type: choice, values: [0.1]}\n"}
    refused = browser.post("/sweeps/new", data=fields)
    page = refused.get_data(as_text=True)
    assert refused.status_code == 422 and 'id="error-summary"' in page
    assert "space.params.lrr" in page and 'id="sweep-space" name="space" rows="6" spellcheck="false" aria-invalid="true"' in page
    assert "params.lrr: {type: choice, values: [0.1]}" in page  # what was typed comes back as typed
    assert browser.get("/api/v1/sweeps").get_json()["items"] == []

    broken = browser.post("/sweeps/new", data={**fields, "base": "dataset: [unclosed"})
    assert broken.status_code == 422 and "not valid YAML" in broken.get_data(as_text=True)

    fields["space"] = "params.lr: {type: loguniform, low: 0.0001, high: 0.01}\n"
    started = browser.post("/sweeps/new", data=fields)
    assert started.status_code == 302
    sweep_id = int(started.headers["Location"].rsplit("/", 1)[1])
    sweep_page = browser.get(f"/sweeps/{sweep_id}").get_data(as_text=True)
    assert "from the form" in sweep_page and "0 of 4 trials done" in sweep_page
    assert 'hx-trigger="every 2s"' in sweep_page  # live while it runs
    assert browser.get(f"/sweeps/{sweep_id}/charts.json").get_json() == {"done": False, "charts": []}
    assert "from the form" in browser.get("/sweeps").get_data(as_text=True)

    cancelled = browser.post(f"/sweeps/{sweep_id}/cancel", data={"csrf_token": csrf(browser, f"/sweeps/{sweep_id}")})
    assert cancelled.status_code == 302
    ended = browser.get(f"/sweeps/{sweep_id}").get_data(as_text=True)
    assert "CANCELLED" in ended and 'hx-trigger="every 2s"' not in ended
