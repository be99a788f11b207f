"""Registering datasets through the REST API: scan reports, path rules and refusals that store nothing."""

from __future__ import annotations

import pytest
from PIL import Image



@pytest.fixture
def settings(web_settings):
    return web_settings


@pytest.fixture
def client(web_client):
    return web_client


def write_imagefolder(root, per_class: int = 6):
    colours = {"red square": (220, 30, 30), "blå sky": (30, 30, 220)}
    for name, colour in colours.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            size = (20 + i, 16 + i)  # mixed sizes
            Image.new("RGB", size, colour).save(root / name / f"{i}.png")
    (root / "blå sky" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return root


def test_register_imagefolder_reports_and_lists(client, settings):
    folder = write_imagefolder(settings.dataset_roots[0] / "colours")
    response = client.post("/api/v1/datasets", json={"name": "colours", "format": "imagefolder", "path": str(folder)})
    assert response.status_code == 201, response.get_json()
    dataset = response.get_json()
    assert dataset["task"] == "classification" and dataset["num_samples"] == 12
    assert dataset["classes"] == sorted(["red square", "blå sky"])
    assert [u["file"] for u in dataset["report"]["unreadable"]] == ["blå sky/broken.png"]
    assert len(dataset["fingerprint"]) == 64
    assert response.headers["Location"] == "/api/v1/datasets/colours"
    assert client.get("/api/v1/datasets/colours").get_json()["fingerprint"] == dataset["fingerprint"]
    names = [d["name"] for d in client.get("/api/v1/datasets").get_json()["items"]]
    assert "colours" in names and "digits" in names


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"name": "x", "format": "imagefolder", "path": "/etc"}, 422, "outside the allowed folders"),
        ({"name": "x", "format": "imagefolder", "path": "relative/path"}, 422, "absolute path"),
        ({"name": "x", "format": "parquet", "path": "/tmp"}, 422, "Unknown dataset format"),
        ({"name": "x", "format": "digits", "path": "/tmp"}, 422, "built-in"),
        ({"name": "Bad Name!", "format": "imagefolder", "path": "/tmp"}, 422, "must be"),
        ({"name": "x", "format": "imagefolder"}, 422, "path"),
    ],
)
def test_bad_registrations_are_refused_and_store_nothing(client, body, status, fragment):
    before = client.get("/api/v1/datasets").get_json()["items"]
    response = client.post("/api/v1/datasets", json=body)
    assert response.status_code == status
    assert response.content_type == "application/problem+json"
    assert fragment in response.get_json()["detail"]
    assert client.get("/api/v1/datasets").get_json()["items"] == before


def test_missing_folder_symlink_escape_and_duplicate(client, settings, tmp_path):
    root = settings.dataset_roots[0]
    root.mkdir(parents=True, exist_ok=True)
    missing = client.post("/api/v1/datasets", json={"name": "m", "format": "imagefolder", "path": str(root / "nope")})
    assert missing.status_code == 422 and "not an existing folder" in missing.get_json()["detail"]
    outside = write_imagefolder(tmp_path / "outside")
    (root / "sneaky").symlink_to(outside)
    escape = client.post("/api/v1/datasets", json={"name": "s", "format": "imagefolder", "path": str(root / "sneaky")})
    assert escape.status_code == 422 and "outside the allowed folders" in escape.get_json()["detail"]
    folder = write_imagefolder(root / "colours")
    assert client.post("/api/v1/datasets", json={"name": "c", "format": "imagefolder", "path": str(folder)}).status_code == 201
    again = client.post("/api/v1/datasets", json={"name": "c", "format": "imagefolder", "path": str(folder)})
    assert again.status_code == 409 and "already registered" in again.get_json()["detail"]


def test_job_must_fit_the_dataset_task(client):
    response = client.post("/api/v1/jobs", json={"kind": "train", "dataset": "shapes", "architecture": "resnet18"})
    assert response.status_code == 422
    problem = response.get_json()
    assert "segmentation" in problem["detail"] and "unet" in problem["detail"]
    assert problem["errors"][0]["field"] == "architecture"
    unet_on_digits = client.post("/api/v1/jobs", json={"kind": "train", "dataset": "digits", "architecture": "unet"})
    assert unet_on_digits.status_code == 422 and "resnet18" in unet_on_digits.get_json()["detail"]


def test_architecture_options_and_sizes_are_checked_at_submission(client):
    bad_option = client.post("/api/v1/jobs", json={"kind": "train", "dataset": "shapes", "architecture": "unet",
                                                   "architecture_options": {"depth": 9}})
    assert bad_option.status_code == 422 and "architecture_options.depth" in bad_option.get_json()["detail"]
    bad_size = client.post("/api/v1/jobs", json={"kind": "train", "dataset": "shapes", "architecture": "unet",
                                                 "params": {"image_size": 40}})
    assert bad_size.status_code == 422 and "divisible by 16" in bad_size.get_json()["detail"]
    cnn_options = client.post("/api/v1/jobs", json={"kind": "train", "dataset": "digits", "architecture": "cnn",
                                                    "architecture_options": {"depth": 2}})
    assert cnn_options.status_code == 422 and "takes no options" in cnn_options.get_json()["detail"]
    ok = client.post("/api/v1/jobs", json={"kind": "train", "dataset": "shapes", "architecture": "unet",
                                           "architecture_options": {"depth": 3, "base_width": 8}})
    assert ok.status_code == 201, ok.get_json()
    assert ok.get_json()["spec"]["architecture_options"] == {"depth": 3, "base_width": 8}


def test_weights_path_must_be_a_file_under_the_roots(client, settings):
    outside = client.post("/api/v1/jobs", json={"kind": "train", "dataset": "digits", "architecture": "cnn",
                                                "weights_path": "/etc/passwd"})
    assert outside.status_code == 422 and "outside the allowed folders" in outside.get_json()["detail"]


def test_evaluate_needs_a_finished_training_job(client):
    missing = client.post("/api/v1/jobs", json={"kind": "evaluate", "dataset": "digits"})
    assert missing.status_code == 422 and "source_job" in missing.get_json()["detail"]
    queued = client.post("/api/v1/jobs", json={"kind": "train", "dataset": "digits", "architecture": "cnn"}).get_json()
    response = client.post("/api/v1/jobs", json={"kind": "evaluate", "dataset": "digits", "source_job": queued["id"]})
    assert response.status_code == 422 and "SUCCEEDED training job" in response.get_json()["detail"]
