"""Measure 9 — promote-to-serve: `PUT /api/v1/models/{name}/aliases/production` → the first successful
prediction served from the new version, vs a bare safetensors load + build + first forward of the same model.

Platform side, one repetition: the alias points at version A, already loaded and serving (a few predictions
just before the move keep the web processes' alias caches fresh, as live traffic would); the clock starts,
the REST call moves `production` to a version B that no web process has loaded yet (every repetition promotes a
fresh version registered over the same logged files, so the per-process model cache never helps), then one
client posts batch-1 predictions to `?alias=production` back to back until one answers with version B; the
clock stops. That includes the alias move itself (MLflow registry + audit row), the time until a web process
sees the move (its alias cache), the download of the version's files from the MLflow artifact store, the
rebuild from the recipe and safetensors weights, and the first forward.

Baseline: in this process, `safetensors.torch.load_file` of the same weights file (already on local disk) +
`build_architecture` from the same recipe + `load_state_dict` + one batch-1 forward: what a bare service
would do on a model switch.

Same set-up as bench_08 (PostgreSQL `bench_<random>`, Redis db 11, MLflow store in a temp dir, `trainyard serve`
answering the predictions), plus the API app (gunicorn `--workers 2 --threads 4 'trainyard_web:create_app()'`)
taking the move, as in a deployment: the prediction processes learn of it from the alias events (checked at
most every 0.1 s), not from the process that made it. All torn down at the end.

    .venv/bin/python bench/bench_09_promote.py [--quick] [--repeats N] [--arch resnet18]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import harness
import torch
from bench_08_serving import MODEL, REDIS_DB, Endpoint, Platform, multipart, png_of
from harness import compare, report

MEASURE = "09 promote-to-serve"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18", help="architecture of the served model (digits dataset)")
    args = harness.parse_args(parser=parser)
    warmup = 1
    tmp = Path(tempfile.mkdtemp(prefix="bench09-"))
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, tmp, True)
        print(f"{MEASURE}: setting up PostgreSQL, Redis db {REDIS_DB + 1}, MLflow store, "
              f"{warmup + args.repeats + 1} versions of {args.arch} on digits ...", flush=True)
        plat = Platform(stack, tmp, args.arch, versions=warmup + args.repeats + 1, redis_db=REDIS_DB + 1)
        port = plat.serve()  # predictions: `trainyard serve`
        api_port = plat.api()  # the move: the API, another set of processes

        import mlflow.artifacts
        from safetensors.torch import load_file
        from trainyard.ml.architectures import InputShape, build_architecture
        from trainyard.ml.servable import METADATA_FILE, WEIGHTS_FILE, preprocess
        from trainyard.model_registry import download_uri, load_version

        loaded = load_version(plat.settings, MODEL, plat.versions[0])
        png = png_of(plat.data.splits.test.tensors[0][0])
        x1 = preprocess(loaded, [("x.png", png)])
        local = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=download_uri(plat.settings, MODEL, plat.versions[0]), dst_path=str(tmp / "bare"),
            tracking_uri=plat.settings.mlflow_tracking_uri))
        weights_path = next(local.rglob(WEIGHTS_FILE))
        recipe = json.loads(next(local.rglob(METADATA_FILE)).read_text())

        body, content_type = multipart(png)
        token = {"Authorization": f"Bearer {plat.token}"}
        predict = Endpoint(port, f"/api/v1/models/{MODEL}/predict?alias=production", body,
                           {**token, "Content-Type": content_type})
        assert json.loads(predict.post())["version"] == plat.versions[0]
        for _ in range(20):  # both gunicorn workers load the serving version before the first move
            predict.post()
        fresh = iter(plat.versions[1:])
        phases: list[dict[str, float]] = []

        def promote_to_serve() -> float:
            version = next(fresh)
            move = Endpoint(api_port, f"/api/v1/models/{MODEL}/aliases/production",
                            json.dumps({"version": version, "force": True}).encode(),
                            {**token, "Content-Type": "application/json"})
            for _ in range(4):  # traffic right before the move: the web processes' alias caches are fresh,
                predict.post()  # as on a live endpoint (an idle one would re-resolve on the first request)
            started = time.perf_counter()
            move.conn.request("PUT", move.path, move.body, move.headers)
            response = move.conn.getresponse()
            response.read()
            moved = time.perf_counter()
            if response.status != 200:
                raise RuntimeError(f"alias move → {response.status}")
            polls = 0
            while json.loads(predict.post())["version"] != version:
                polls += 1
            done = time.perf_counter()
            move.close()
            phases.append({"put_ms": (moved - started) * 1000, "after_put_ms": (done - moved) * 1000,
                           "old_version_answers": polls})
            return done - started

        def bare_switch() -> float:
            started = time.perf_counter()
            c, h, w = recipe["image_shape"]
            module = build_architecture(recipe["architecture"], InputShape(c, h, w, len(recipe["classes"])),
                                        recipe.get("architecture_options") or {})
            module.load_state_dict(load_file(str(weights_path), device="cpu"), strict=True)
            module.eval()
            with torch.inference_mode():
                module(x1)
            return time.perf_counter() - started

        result = compare(MEASURE, "alias move → first prediction", promote_to_serve, bare_switch,
                         repeats=args.repeats, unit="s", higher_is_better=False, warmup=warmup)
        predict.close()
        recorded = phases[warmup:]
        result.extra.update(
            put_ms_median=round(sorted(p["put_ms"] for p in recorded)[len(recorded) // 2], 1),
            after_put_ms_median=round(sorted(p["after_put_ms"] for p in recorded)[len(recorded) // 2], 1),
            old_version_answers=[p["old_version_answers"] for p in recorded], model=f"{args.arch} digits")
        report(result, "≤ 1.5×", result.ratio <= 1.5,
               "includes the PUT, the alias change check and the download from the MLflow "
               f"artifact store{'; --quick' if args.quick else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
