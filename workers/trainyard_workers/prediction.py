"""A predict job: a registered model version over every image in a folder, written as a CSV artifact."""

from __future__ import annotations

import csv
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from trainyard import model_registry
from trainyard.jobs import JobView
from trainyard.ml.datasets import UnreadableImage, image_files
from trainyard.ml.servable import LoadedModel, preprocess
from trainyard.specs import JobSpec
from trainyard.tracking import JobRun
from trainyard_workers.loop import StopRequested

BATCH = 64
TOP_K = 5


def run_prediction(ctx, job: JobView, lease, run: JobRun) -> tuple[dict[str, Any], dict[str, Any]]:
    """Predict every image under spec.path with the spec's model version; returns (metrics, progress)."""
    spec = JobSpec.model_validate(job.spec)
    model = model_registry.load_version(ctx.settings, spec.model_name, spec.model_version)
    folder = Path(spec.path)
    files = image_files(folder)
    rows: list[dict[str, Any]] = []
    batches = max(1, -(-len(files) // BATCH))
    for index, start in enumerate(range(0, len(files), BATCH), start=1):
        if lease.should_stop():
            raise StopRequested
        rows.extend(predict_chunk(model, folder, files[start:start + BATCH]))
        lease.progress = {"epoch": 0, "epochs": 0, "batch": index, "batches": batches}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "predictions.csv"
        write_csv(path, rows, model)
        run.log_file(path, "predictions")
    unreadable = sum(1 for r in rows if r.get("error"))
    metrics = {"images": len(rows) - unreadable, "unreadable": unreadable}
    run.log_metrics(metrics, step=0, timestamp_ms=int(time.time() * 1000))
    return metrics, {"epoch": 0, "epochs": 0, "batch": batches, "batches": batches}


def predict_chunk(model: LoadedModel, folder: Path, files: list[Path]) -> list[dict[str, Any]]:
    rows, inputs = [], []
    for path in files:
        name = path.relative_to(folder).as_posix()
        try:
            inputs.append((name, preprocess(model, [(name, path.read_bytes())])))
        except (UnreadableImage, OSError) as exc:
            rows.append({"file": name, "error": str(exc)})  # named in the CSV, not silently skipped
    if inputs:
        with torch.inference_mode():
            logits = model.module(torch.cat([x for _, x in inputs])).float()
        for (name, _), scores in zip(inputs, logits):
            rows.append({"file": name, **describe(model, scores)})
    return sorted(rows, key=lambda r: r["file"])


def describe(model: LoadedModel, scores: torch.Tensor) -> dict[str, Any]:
    if model.task == "classification":
        probabilities = scores.softmax(dim=0)
        values, indices = probabilities.topk(min(TOP_K, len(model.classes)))
        top = [[model.classes[i], round(float(p), 6)] for p, i in zip(values.tolist(), indices.tolist())]
        return {"label": top[0][0], "probability": top[0][1], "top": json.dumps(top, ensure_ascii=False)}
    mask = scores.argmax(dim=0)
    counts = torch.bincount(mask.flatten(), minlength=len(model.classes)).tolist()
    fractions = {c: round(n / max(mask.numel(), 1), 6) for c, n in zip(model.classes, counts)}
    return {"label": max(fractions, key=fractions.get), "probability": max(fractions.values()),
            "top": json.dumps(fractions, ensure_ascii=False)}


def write_csv(path: Path, rows: list[dict[str, Any]], model: LoadedModel) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "label", "probability", "top", "error"])
        writer.writeheader()
        for row in rows:
            writer.writerow({key: row.get(key, "") for key in writer.fieldnames})
