"""Serving registered models: safe loading, a per-version cache, alias resolution that follows promotions.

A model is rebuilt from its recorded recipe (architecture, options, input shape) and its weights are read
from safetensors: nothing in the registry is ever unpickled.
"""

from __future__ import annotations

import base64
import io
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from typing import Any, NamedTuple

import torch

from trainyard import model_registry
from trainyard.config import Settings
from trainyard.db import Database
from trainyard.errors import InvalidSpec
from trainyard.ml.batching import MicroBatcher
from trainyard.ml.datasets import UnreadableImage
from trainyard.ml.servable import LoadedModel, preprocess

MAX_IMAGES = 64
# An alias moved through Trainyard (promote, roll back, remove) leaves a row in model_alias_event. The process
# that moved it drops its cached resolution at once; every other serving process reads the model's newest
# event id (one indexed read) at most every ALIAS_CHECK_SECONDS, so it answers from the new version within
# that. An alias moved behind Trainyard's back, in MLflow itself, is seen within ALIAS_RECHECK_SECONDS.
ALIAS_CHECK_SECONDS = 0.1
ALIAS_RECHECK_SECONDS = 30.0
MAX_LOADED_MODELS = 4
MAX_SERVING_BATCH = 64  # images per forward when concurrent requests are batched together
MAX_BATCH_WAIT_SECONDS = 0.005  # how long a forward may wait for requests already decoding their images


class _Resolution(NamedTuple):
    version: int
    at: float  # time.monotonic() when MLflow was asked
    last_move: int | None  # the newest alias event of the model then


class ModelServer:
    """Resolves name@alias to a version (again as soon as an alias of the model moves) and keeps recent
    versions loaded."""

    def __init__(self, settings: Settings, db: Database) -> None:
        self.settings = settings
        self.db = db
        self._models: OrderedDict[tuple[str, int], LoadedModel] = OrderedDict()
        self._aliases: dict[tuple[str, str], _Resolution] = {}
        self._last_moves: dict[str, tuple[int | None, float]] = {}  # model → (newest alias event id, read at)
        model_registry.watch_alias_moves(self)
        self._lock = threading.Lock()
        self._checking = threading.Lock()  # one alias-event read at a time
        self._loading: dict[tuple[str, int], threading.Lock] = {}
        self._batchers: dict[tuple[str, int], MicroBatcher] = {}
        self._arriving = 0  # predictions accepted and not yet queued for a forward (decoding their images)
        self._arriving_lock = threading.Lock()

    def resolve(self, name: str, alias: str | None, version: int | None) -> int:
        if version is not None:
            return version
        alias = alias or "production"
        last_move = self._last_move(name)
        cached = self._aliases.get((name, alias))
        if cached is not None and cached.last_move == last_move \
                and time.monotonic() - cached.at < ALIAS_RECHECK_SECONDS:
            return cached.version
        resolved = model_registry.resolve(self.settings, name, alias=alias).version
        self._aliases[(name, alias)] = _Resolution(resolved, time.monotonic(), last_move)
        return resolved

    def _last_move(self, name: str) -> int | None:
        seen = self._last_moves.get(name)
        if seen is not None and time.monotonic() - seen[1] < ALIAS_CHECK_SECONDS:
            return seen[0]
        # One thread reads; under load the others answer from the value it is replacing rather than all
        # queueing on the database at the same moment (and opening overflow connections to do it).
        if seen is not None and not self._checking.acquire(blocking=False):
            return seen[0]
        if seen is None:
            self._checking.acquire()
        try:
            seen = self._last_moves.get(name)
            if seen is None or time.monotonic() - seen[1] >= ALIAS_CHECK_SECONDS:
                seen = (model_registry.last_alias_move(self.db, name), time.monotonic())
                self._last_moves[name] = seen
            return seen[0]
        finally:
            self._checking.release()

    def alias_moved(self, name: str) -> None:
        """An alias of model `name` moved in this process: resolve it afresh on the next request."""
        self._last_moves.pop(name, None)
        for key in [key for key in list(self._aliases) if key[0] == name]:
            self._aliases.pop(key, None)

    def model(self, name: str, version: int) -> LoadedModel:
        key = (name, version)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:  # one download per version, however many requests ask for it at once
            with self._lock:
                if key in self._models:
                    return self._models[key]
            try:
                loaded = model_registry.load_version(self.settings, name, version)
            finally:
                with self._lock:  # no lock kept per version asked for, or unknown versions would pile up
                    self._loading.pop(key, None)
            with self._lock:
                self._models[key] = loaded
                self._batchers[key] = MicroBatcher(loaded.module, max_batch=MAX_SERVING_BATCH,
                                                   name=f"serve-{name}-v{version}", arriving=self._arrivals,
                                                   max_wait=MAX_BATCH_WAIT_SECONDS)
                while len(self._models) > MAX_LOADED_MODELS:
                    evicted, _ = self._models.popitem(last=False)
                    self._batchers.pop(evicted).close()
            return loaded

    def _arrivals(self) -> int:
        return self._arriving

    def _arrived(self, count: int) -> None:
        with self._arriving_lock:
            self._arriving += count

    def _queue_forward(self, model: LoadedModel, batch: torch.Tensor) -> Future:
        """Queue `batch` for its model's next forward, together with other requests' images waiting meanwhile."""
        with self._lock:
            batcher = self._batchers.get((model.name, model.version))
        if batcher is not None:
            return batcher.enqueue(batch)
        alone: Future = Future()  # evicted between load and use: run alone
        with model.lock, torch.inference_mode():
            alone.set_result(model.module(batch))
        return alone

    def predict(self, name: str, files: list[tuple[str, bytes]], *, alias: str | None = None,
                version: int | None = None, top_k: int = 5) -> dict[str, Any]:
        if not files:
            raise InvalidSpec("Send at least one image (multipart files, or JSON {\"images\": [base64, ...]}).")
        if len(files) > MAX_IMAGES:
            raise InvalidSpec(f"{len(files)} images in one request; at most {MAX_IMAGES}.")
        self._arrived(1)
        try:
            resolved = self.resolve(name, alias, version)
            model = self.model(name, resolved)
            try:
                batch = preprocess(model, files)
            except UnreadableImage as exc:
                raise InvalidSpec(f"{exc}.", errors=[{"field": getattr(exc, "file", "images"),
                                                      "message": str(exc)}]) from None
        finally:
            # Counted out just before it is queued, never after: a forward that saw this request's own
            # count would wait for it in vain.
            self._arrived(-1)
        logits = self._queue_forward(model, batch).result().float()
        if model.task == "classification":
            predictions = classification_output(logits, model.classes, top_k)
        else:
            predictions = segmentation_output(logits, model.classes)
        for (filename, _), prediction in zip(files, predictions):
            prediction["file"] = filename
        return {"model": name, "version": resolved, "alias": None if version is not None else (alias or "production"),
                "task": model.task, "predictions": predictions}


def classification_output(logits: torch.Tensor, classes: list[str], top_k: int) -> list[dict[str, Any]]:
    probabilities = logits.softmax(dim=1)
    values, indices = probabilities.topk(min(top_k, len(classes)), dim=1)
    return [
        {"top": [{"label": classes[i], "probability": round(float(p), 6)} for p, i in zip(vs.tolist(), ix.tolist())]}
        for vs, ix in zip(values, indices)
    ]


def segmentation_output(logits: torch.Tensor, classes: list[str]) -> list[dict[str, Any]]:
    from PIL import Image

    out = []
    for mask in logits.argmax(dim=1).to(torch.uint8):
        counts = torch.bincount(mask.flatten().long(), minlength=len(classes)).tolist()
        buffer = io.BytesIO()
        Image.fromarray(mask.numpy(), "L").save(buffer, "PNG")
        total = max(sum(counts), 1)
        out.append({"mask_png": base64.b64encode(buffer.getvalue()).decode(),
                    "class_fractions": {c: round(n / total, 6) for c, n in zip(classes, counts)}})
    return out
