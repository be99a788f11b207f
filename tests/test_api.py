"""The REST API through Flask's test client, on a real database and a real Redis broker."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import func, select

from trainyard.db import Database, upgrade_schema
from trainyard.models import Job, JobEvent
from trainyard_web import create_app
from conftest import authed_client, make_settings, redis_queue_messages, ui_login

GOOD = {"kind": "train", "dataset": "digits", "architecture": "cnn", "params": {"epochs": 3}}


@pytest.fixture
def settings(web_settings):
    return web_settings


@pytest.fixture
def client(web_client):
    return web_client


def job_rows(settings) -> tuple[int, int]:
    db = Database(settings.database_url)
    with db.session_scope() as s:
        counts = s.scalar(select(func.count(Job.id))), s.scalar(select(func.count(JobEvent.id)))
    db.dispose()
    return counts


def queued_messages(settings) -> list[dict]:
    return [json.loads(m) for m in redis_queue_messages(settings.broker_url)]


def test_submit_stores_job_and_sends_its_id(client, settings):
    response = client.post("/api/v1/jobs", json=GOOD)
    assert response.status_code == 201, response.get_json()
    job = response.get_json()
    assert job["status"] == "QUEUED" and job["attempt"] == 0
    assert job["progress"] == {"epoch": 0, "epochs": 3}
    assert job["spec"]["params"]["epochs"] == 3 and job["spec"]["params"]["optimizer"] == "adam"
    assert response.headers["Location"] == f"/api/v1/jobs/{job['id']}"
    assert [e["to_status"] for e in job["events"]] == ["QUEUED"]
    messages = queued_messages(settings)
    assert len(messages) == 1
    assert messages[0]["headers"]["task"] == "training.run_job"
    assert messages[0]["headers"]["argsrepr"] == f"[{job['id']}]"  # the id alone travels
    assert job_rows(settings) == (1, 1)


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({**GOOD, "architecture": "transformer9000"}, 422, "architecture"),
        ({**GOOD, "params": {"epochs": 0}}, 422, "params.epochs"),
        ({**GOOD, "params": {"batch_size": 10**9}}, 422, "params.batch_size"),
        ({**GOOD, "params": {"lr": "NaN"}}, 422, "params.lr"),
        ({**GOOD, "params": {"lr": -1}}, 422, "params.lr"),
        ({**GOOD, "params": {"epoch": 3}}, 422, "params.epoch"),
        ({**GOOD, "params": {"optimizer": "lion"}}, 422, "params.optimizer"),
        ({**GOOD, "kind": "deploy"}, 422, "kind"),
        ({**GOOD, "dataset": "imagenet"}, 422, "dataset"),
        ({"dataset": "digits"}, 422, "architecture"),
        ([1, 2], 422, "(body)"),
    ],
)
def test_bad_spec_is_refused_and_stores_nothing(client, settings, body, status, field):
    response = client.post("/api/v1/jobs", json=body)
    assert response.status_code == status
    assert response.content_type == "application/problem+json"
    problem = response.get_json()
    assert problem["status"] == status and problem["detail"]
    assert field in [e["field"] for e in problem["errors"]], problem
    assert job_rows(settings) == (0, 0)
    assert queued_messages(settings) == []


def test_unknown_architecture_names_the_choices(client):
    problem = client.post("/api/v1/jobs", json={**GOOD, "architecture": "nope"}).get_json()
    assert "cnn" in problem["detail"]


@pytest.mark.parametrize("raw", ["{bad json", "", "null"])
def test_malformed_json_is_a_problem_not_a_500(client, settings, raw):
    response = client.post("/api/v1/jobs", data=raw, content_type="application/json")
    assert 400 <= response.status_code < 500
    assert response.content_type == "application/problem+json"
    assert response.get_json()["detail"]
    assert job_rows(settings) == (0, 0)


def test_wrong_content_type_is_a_problem(client, settings):
    response = client.post("/api/v1/jobs", data="epochs=3", content_type="application/x-www-form-urlencoded")
    assert 400 <= response.status_code < 500
    assert response.content_type == "application/problem+json"
    assert job_rows(settings) == (0, 0)


def test_get_unknown_job_is_404_problem(client):
    response = client.get("/api/v1/jobs/999999")
    assert response.status_code == 404
    assert response.content_type == "application/problem+json"
    assert "999999" in response.get_json()["detail"]


def test_unknown_route_and_method_are_problems(client):
    assert client.get("/api/v1/nothing").content_type == "application/problem+json"
    response = client.delete("/api/v1/jobs")
    assert response.status_code == 405 and response.content_type == "application/problem+json"


def test_list_filters_and_paginates_newest_first(client):
    ids = [client.post("/api/v1/jobs", json=GOOD).get_json()["id"] for _ in range(5)]
    client.post(f"/api/v1/jobs/{ids[1]}/cancel")
    first = client.get("/api/v1/jobs?limit=2").get_json()
    assert [j["id"] for j in first["items"]] == [ids[4], ids[3]]
    second = client.get(f"/api/v1/jobs?limit=2&before={first['next_before']}").get_json()
    assert [j["id"] for j in second["items"]] == [ids[2], ids[1]]
    last = client.get(f"/api/v1/jobs?limit=2&before={second['next_before']}").get_json()
    assert [j["id"] for j in last["items"]] == [ids[0]] and last["next_before"] is None
    cancelled = client.get("/api/v1/jobs?status=cancelled").get_json()
    assert [j["id"] for j in cancelled["items"]] == [ids[1]]
    queued = client.get("/api/v1/jobs?status=QUEUED,RUNNING").get_json()
    assert len(queued["items"]) == 4


@pytest.mark.parametrize("query", ["status=DONE", "limit=0", "limit=10000", "before=abc", "colour=red"])
def test_bad_list_query_is_a_problem(client, query):
    response = client.get(f"/api/v1/jobs?{query}")
    assert response.status_code == 422
    assert response.content_type == "application/problem+json"


def test_cancel_queued_job_at_once_and_refuse_twice(client):
    job = client.post("/api/v1/jobs", json=GOOD).get_json()
    response = client.post(f"/api/v1/jobs/{job['id']}/cancel")
    assert response.status_code == 202
    cancelled = response.get_json()
    assert cancelled["status"] == "CANCELLED" and cancelled["finished_at"]
    assert [e["to_status"] for e in cancelled["events"]] == ["QUEUED", "CANCELLED"]
    again = client.post(f"/api/v1/jobs/{job['id']}/cancel")
    assert again.status_code == 409 and "already CANCELLED" in again.get_json()["detail"]


def test_datasets_and_architectures(client):
    datasets = client.get("/api/v1/datasets").get_json()["items"]
    digits = next(d for d in datasets if d["name"] == "digits")
    assert digits["num_samples"] == 1797 and digits["num_classes"] == 10
    assert sum(digits["splits"].values()) == 1797 and digits["image_shape"] == [1, 8, 8]
    assert client.get("/api/v1/datasets/digits").get_json()["fingerprint"] == digits["fingerprint"]
    assert client.get("/api/v1/datasets/nope").status_code == 404
    archs = client.get("/api/v1/architectures").get_json()["items"]
    assert {"name": "cnn", "task": "classification"}.items() <= archs[0].items()


def test_health_reports_each_dependency(client):
    response = client.get("/api/v1/health")
    body = response.get_json()
    assert response.status_code == 200, body
    assert body["status"] == "ok"
    assert set(body["checks"]) == {"database", "broker", "mlflow"}


def test_health_degrades_when_the_broker_is_unreachable(tmp_path):
    settings = make_settings(tmp_path, broker_url="redis://127.0.0.1:1/0")
    upgrade_schema(settings.database_url)
    client = authed_client(create_app(settings))
    response = client.get("/api/v1/health")
    assert response.status_code == 503
    body = response.get_json()
    assert body["checks"]["broker"]["ok"] is False and body["checks"]["database"]["ok"] is True


def test_submit_with_broker_down_says_so_and_leaves_no_silent_job(tmp_path):
    settings = make_settings(tmp_path, broker_url="redis://127.0.0.1:1/0")
    upgrade_schema(settings.database_url)
    client = authed_client(create_app(settings))
    response = client.post("/api/v1/jobs", json=GOOD)
    assert response.status_code == 503
    assert response.content_type == "application/problem+json"
    jobs = client.get("/api/v1/jobs").get_json()["items"]
    assert [j["status"] for j in jobs] == ["FAILED"] and "could not enqueue" in jobs[0]["error"]


def test_openapi_document_is_generated_from_the_job_schema(client):
    doc = client.get("/api/v1/openapi.json").get_json()
    assert doc["openapi"].startswith("3.")
    assert {"/api/v1/jobs", "/api/v1/jobs/{job_id}", "/api/v1/jobs/{job_id}/cancel", "/api/v1/datasets",
            "/api/v1/architectures", "/api/v1/health"} <= set(doc["paths"])
    schemas = doc["components"]["schemas"]
    spec_ref = doc["paths"]["/api/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    spec = schemas[spec_ref.rsplit("/", 1)[1]]
    params = schemas[spec["properties"]["params"]["$ref"].rsplit("/", 1)[1]]
    assert params["properties"]["epochs"]["minimum"] == 1
    assert params["properties"]["batch_size"]["maximum"] == 4096


def test_jobs_page_lists_jobs(client):
    job = client.post("/api/v1/jobs", json=GOOD).get_json()
    assert client.get("/").status_code == 302  # the UI wants its own login, not the API token
    assert ui_login(client).status_code == 302
    page = client.get("/")
    assert page.status_code == 200
    assert f'href="/jobs/{job["id"]}"' in page.get_data(as_text=True)
    detail = client.get(f"/jobs/{job['id']}").get_data(as_text=True)
    assert "QUEUED" in detail and "submitted" in detail
    assert client.get("/jobs/424242").status_code == 404
