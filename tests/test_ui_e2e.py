"""The web UI end to end, in a real headless Chromium against `trainyard up` (the embedded default):
log in, launch cnn on digits from the form, watch the job page reach SUCCEEDED without a reload while
its chart grows, promote the version, and try it on a digit image. Screenshots of every page go to
test-artifacts/screenshots/ (not committed)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import ROOT, free_port

CHROMIUM = "/usr/bin/chromium"
SHOTS = ROOT / "test-artifacts" / "screenshots"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (scripts/services.sh)"),
]


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """`trainyard up` in a fresh data directory: gunicorn web, a worker, the reconciler and MLflow."""
    tmp = tmp_path_factory.mktemp("ui")
    port, mlflow_port = free_port(), free_port()
    env = {**os.environ, "TRAINYARD_DATA_DIR": str(tmp / "data"), "TRAINYARD_PORT": str(port),
           "TRAINYARD_MLFLOW_PORT": str(mlflow_port), "TRAINYARD_WEB_WORKERS": "2",
           "TRAINYARD_TORCH_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("platform", "workers", "web"))}
    for key in ("TRAINYARD_DATABASE_URL", "TRAINYARD_BROKER_URL", "TRAINYARD_MLFLOW_TRACKING_URI", "TRAINYARD_TOKEN"):
        env.pop(key, None)
    log_path = tmp / "up.log"
    with open(log_path, "w") as log:
        up = subprocess.Popen([sys.executable, "-m", "trainyard", "up"], env=env, stdout=log,
                              stderr=subprocess.STDOUT, cwd=tmp)
    try:
        deadline = time.monotonic() + 240
        while "Trainyard is up" not in log_path.read_text():
            assert up.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.5)
        token = (tmp / "data" / "admin-token").read_text().strip()
        yield f"http://127.0.0.1:{port}", token, tmp
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(timeout=60)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield chromium
        chromium.close()


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def digit_png(tmp: Path) -> tuple[Path, str]:
    """A held-out digit exactly as the platform's own loader decodes it, saved as a PNG file."""
    from PIL import Image

    from trainyard.ml.datasets import FORMATS

    splits = FORMATS.get("digits").obj.load(None, None)
    images, labels = splits.test.tensors
    image, label = images[0], int(labels[0])
    path = tmp / f"digit-{splits.classes[label]}.png"
    buffer = io.BytesIO()
    Image.fromarray(image[0].numpy()).resize((64, 64), Image.NEAREST).save(buffer, "PNG")
    path.write_bytes(buffer.getvalue())
    return path, splits.classes[label]


def job_count(base: str, token: str) -> int:
    items = httpx.get(f"{base}/api/v1/jobs", headers={"Authorization": f"Bearer {token}"}).json()["items"]
    return len(items)


def test_launch_watch_promote_and_try_in_a_browser(embedded, browser):
    base, token, tmp = embedded
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(30_000)

    page.goto(f"{base}/launch")
    assert "/login" in page.url
    shot(page, "01-login")
    page.get_by_label("API token").fill(token)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(f"{base}/launch")

    # Dataset first: the architecture list follows the dataset's task (htmx swaps it in).
    page.get_by_label("Dataset *").select_option("shapes")
    page.wait_for_function("!document.querySelector('#field-architecture option[value=cnn]')")
    assert "unet" in page.locator("#field-architecture").inner_text()
    page.get_by_label("Dataset *").select_option("digits")
    page.wait_for_selector("#field-architecture option[value=cnn]", state="attached")
    page.locator("#field-architecture").select_option("cnn")

    # A bad value: the error appears beside its field and nothing is created.
    page.locator("#field-params-epochs").fill("0")
    page.get_by_role("button", name="Launch").click()
    error = page.locator("#field-params-epochs-error")
    error.wait_for()
    assert "greater than or equal to 1" in error.inner_text()
    assert page.locator("#field-params-epochs").get_attribute("aria-invalid") == "true"
    shot(page, "02-launch-error")
    assert job_count(base, token) == 0

    # Long enough (~10 s) for the chart, fetched every 2 s from metrics written at most once a second, to be
    # seen growing.
    page.locator("#field-params-epochs").fill("12")
    page.locator("#field-params-batch_size").fill("4")
    page.locator("#field-name").fill("digits from the browser")
    page.get_by_role("button", name="Launch").click()
    page.wait_for_url(f"{base}/jobs/1")
    assert job_count(base, token) == 1

    # Watch it without reloading: a marker set on this document must survive until SUCCEEDED.
    page.evaluate("window.__sameDocument = true")
    seen_points: list[int] = []
    deadline = time.monotonic() + 240
    while page.locator("#job-status").inner_text() != "SUCCEEDED":
        assert page.locator("#job-status").inner_text() in ("QUEUED", "RUNNING"), page.content()
        assert time.monotonic() < deadline, "job did not finish"
        points = int(page.locator("#charts").get_attribute("data-points") or 0)
        if points and (not seen_points or points != seen_points[-1]):
            seen_points.append(points)
        if len(seen_points) == 1:
            shot(page, "03-job-running")
        time.sleep(0.5)
    assert page.evaluate("window.__sameDocument") is True
    page.wait_for_function("document.querySelector('#charts').dataset.done === 'true'")
    final_points = int(page.locator("#charts").get_attribute("data-points"))
    seen_points.append(final_points)
    assert len(set(seen_points)) >= 2 and seen_points == sorted(seen_points), seen_points  # the chart grew
    assert page.locator("#charts figure.chart").count() == 2
    assert "train_loss" in page.locator("#charts").inner_text()
    assert page.locator("#timeline li").count() >= 3  # queued, started, succeeded
    shot(page, "04-job-succeeded")

    # Promote the new version from the Models page.
    page.get_by_role("link", name="Models").click()
    shot(page, "05-models")
    page.get_by_role("link", name="digits-cnn").click()
    page.locator("#alias-1").select_option("production")
    page.get_by_role("button", name="promote version 1").click()
    page.get_by_text("production now points at version 1").wait_for()
    assert page.locator("[data-alias=production]").inner_text() == "production → v1"
    shot(page, "06-model-promoted")

    # Try it: upload a held-out digit and see the right label on top.
    image, label = digit_png(tmp)
    page.locator("#try-images").set_input_files(str(image))
    page.locator("#try-target").select_option("alias:production")
    page.get_by_role("button", name="Predict").click()
    top = page.locator("#try-result .predictions li .label").first
    top.wait_for()
    assert top.inner_text() == label
    shot(page, "07-try-it")

    for name, path in (("08-jobs", "/"), ("09-datasets", "/datasets"), ("10-dataset-digits", "/datasets/digits"),
                       ("11-workers", "/workers")):
        page.goto(base + path)
        shot(page, name)
    assert page.locator("#worker-table").inner_text().count("alive") >= 1
    page.close()


def test_sweep_from_a_job_page_in_a_browser(embedded, browser):
    """Open a finished job, choose Sweep, fix a refused space in place, start it, and watch the sweep page reach
    SUCCEEDED without a reload: counts, best trial, charts of the objective by trial and the learning curves."""
    base, token, _ = embedded
    headers = {"Authorization": f"Bearer {token}"}
    job = httpx.post(f"{base}/api/v1/jobs", headers=headers, json={
        "kind": "train", "dataset": "digits", "architecture": "cnn", "name": "sweep base", "register": False,
        "params": {"epochs": 2, "batch_size": 64}}).json()
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(30_000)
    page.goto(f"{base}/login")
    page.get_by_label("API token").fill(token)
    page.get_by_role("button", name="Log in").click()
    page.goto(f"{base}/jobs/{job['id']}")
    page.get_by_role("link", name="Sweep", exact=True).click()
    page.wait_for_url(f"{base}/sweeps/new?from={job['id']}")
    assert "sweep base sweep" == page.locator("#sweep-name").input_value()
    assert "batch_size: 64" in page.locator("#sweep-base").input_value()
    shot(page, "13-sweep-form")

    page.locator("#sweep-space").fill("params.lrr: {type: choice, values: [0.01]}")
    page.get_by_role("button", name="Start sweep").click()
    page.locator("#error-summary").wait_for()
    assert "space.params.lrr" in page.locator("#sweep-space-error").inner_text()
    assert page.locator("#sweep-space").get_attribute("aria-invalid") == "true"
    shot(page, "14-sweep-form-error")

    page.locator("#sweep-space").fill("params.lr: {type: choice, values: [0.003, 0.01, 0.0003]}")
    page.locator("#sweep-algorithm").select_option("grid")
    page.locator("#sweep-early_stopping-type").select_option("none")
    page.locator("#sweep-max_trials").fill("3")
    page.locator("#sweep-max_parallel").fill("1")
    page.get_by_role("button", name="Start sweep").click()
    page.wait_for_url(f"{base}/sweeps/*")
    page.evaluate("window.__sameDocument = true")
    deadline = time.monotonic() + 300
    shot_running = False
    while page.locator("#sweep-status").inner_text() != "SUCCEEDED":
        assert page.locator("#sweep-status").inner_text() == "RUNNING", page.content()
        assert time.monotonic() < deadline, "sweep did not finish"
        if not shot_running and page.locator("#trials tbody tr[data-trial]").count():
            shot(page, "15-sweep-running")
            shot_running = True
        time.sleep(0.5)
    assert page.evaluate("window.__sameDocument") is True
    page.wait_for_function("document.querySelector('#charts').dataset.done === 'true'")
    assert page.locator("#trials tbody tr[data-trial]").count() == 3
    assert "3 of 3 trials done" in page.locator("#sweep-live").inner_text()
    assert "Trial" in page.locator("#best-trial").inner_text()
    titles = page.locator("#charts").inner_text()
    assert "val_accuracy by trial" in titles and "every trial" in titles and "against params.lr" in titles
    shot(page, "16-sweep-done")
    page.goto(f"{base}/sweeps")
    shot(page, "17-sweeps")
    page.close()


def test_pages_fit_a_phone(embedded, browser):
    base, token, _ = embedded
    page = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
    page.goto(f"{base}/login")
    page.get_by_label("API token").fill(token)
    page.get_by_role("button", name="Log in").click()
    for path in ("/", "/launch", "/datasets", "/models", "/sweeps", "/sweeps/new"):
        page.goto(base + path)
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 1, (path, overflow)
    shot(page, "12-phone-launch")
    page.close()
