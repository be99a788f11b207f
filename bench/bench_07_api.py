"""Measure 7, API throughput: `GET /api/v1/jobs/{id}` requests/s under gunicorn vs a bare Flask JSON route
under the same gunicorn settings.

Platform: the real web app (`trainyard_web:create_app()`) under gunicorn, 2 workers × 4 threads (what
`trainyard up` runs), on PostgreSQL, answering for a SUCCEEDED job (submitted, claimed and finished through
the jobs service, so it has its three events) with a real bearer token (authenticated per request).

Baseline: bench/bare_flask_app.py — one Flask route returning the same JSON body (captured from the
platform's answer), no database, no auth — under the same gunicorn command line.

Load: bench/load_client.py in a separate process, 8 threads with keep-alive connections (as many as the
server has threads), closed loop for a fixed time; one repetition = one such run; its value is requests/s.
The client shares the 2 cores with the server on both sides alike. p99 is the median of the per-run p99s.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import httpx

import harness
import stack

MEASURE = "07 API throughput"
THREADS = 8


def main() -> int:
    args = harness.parse_args(__doc__)
    seconds = 3 if args.quick else 8
    with stack.temp_dir() as tmp, stack.postgres_database() as db_url, stack.redis_database() as broker_url, \
            stack.Processes(tmp) as procs:
        settings = stack.platform_settings(tmp / "data", database_url=db_url, broker_url=broker_url, queue="cpu")
        stack.prepare_platform(settings)
        token = stack.make_token(settings)
        job_id = _finished_job(settings)
        env = stack.settings_env(settings)
        web = procs.gunicorn("web", "trainyard_web:create_app()", env)
        answer = httpx.get(f"{web}/api/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {token}"}, timeout=30)
        answer.raise_for_status()
        body_path = tmp / "job.json"
        body_path.write_text(answer.text)
        bare = procs.gunicorn("bare", "bare_flask_app:create_app()", {**env, "BENCH_JOB_JSON": str(body_path)})

        p99 = {"platform": [], "baseline": []}

        def load(base: str, side: str, token: str = ""):
            def run() -> float:
                out = subprocess.run([sys.executable, str(stack.BENCH_DIR / "load_client.py"), base,
                                      f"/api/v1/jobs/{job_id}", "--threads", str(THREADS), "--seconds", str(seconds),
                                      "--token", token], capture_output=True, text=True, check=True, timeout=300)
                stats = json.loads(out.stdout.strip().splitlines()[-1])
                if stats["errors"]:
                    raise RuntimeError(f"{side}: {stats['errors']} failed requests")
                p99[side].append(stats["p99_ms"])
                return stats["rps"]
            return run

        result = harness.compare(MEASURE, f"GET /api/v1/jobs/{{id}}, gunicorn 2w×4t, {THREADS} client threads",
                                 load(web, "platform", token), load(bare, "baseline"), repeats=args.repeats,
                                 unit="req/s", higher_is_better=True, warmup=1)
        platform_p99 = statistics.median(p99["platform"][1:])  # [0] is the warm-up run
        result.extra.update(platform_p99_ms=round(platform_p99, 2),
                            baseline_p99_ms=round(statistics.median(p99["baseline"][1:]), 2),
                            body_bytes=len(answer.content))
        ratio_met, p99_met = result.ratio >= 0.7, platform_p99 <= 20
        reasons = ([] if ratio_met else [f"throughput {result.ratio:.2f} of bare"]) + \
                  ([] if p99_met else [f"p99 {platform_p99:.1f} ms > 20 ms under {THREADS} concurrent clients"])
        harness.report(result, "≥ 0.7; p99 ≤ 20 ms", ratio_met and p99_met, "; ".join(reasons))
    return 0


def _finished_job(settings) -> int:
    """A SUCCEEDED job made through the jobs service (submit → claim → finish), as a worker leaves it."""
    from trainyard import jobs
    from trainyard.db import Database
    from trainyard.specs import JobSpec

    db = Database(settings.database_url)
    try:
        spec = JobSpec.model_validate({"kind": "train", "dataset": "digits", "architecture": "cnn",
                                       "params": {"epochs": 5}})
        job = jobs.submit_job(db, spec, lambda *_: None, settings=settings, owner="bench")
        claimed = jobs.claim_job(db, job.id, "bench:1", 60)
        jobs.finish_job(db, job.id, claimed.attempt,
                        {"val_accuracy": 0.97, "val_loss": 0.1, "train_loss": 0.08, "test_accuracy": 0.96},
                        {"epoch": 5, "epochs": 5, "batch": 45, "batches": 45})
        return job.id
    finally:
        db.dispose()


if __name__ == "__main__":
    sys.exit(main())
