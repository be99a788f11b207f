"""Measure 7, API throughput: `GET /api/v1/jobs/{id}` requests/s under gunicorn vs a plain Flask view doing the
same work by hand (the revised target), and vs a bare Flask JSON route (kept as information).

Platform: the real web app (`trainyard_web:create_app()`) under gunicorn, 2 workers × 4 threads (what
`trainyard up` runs), on PostgreSQL, answering for a SUCCEEDED job (submitted, claimed and finished through
the jobs service, so it has its three events) with a real bearer token (authenticated per request).

Hand-written (the target's baseline): bench/handwritten_flask_app.py — a plain Flask view with the same token
check (sha256 of the bearer secret looked up in `api_token`, revoked/expired/role checked) and the same reads
(the job row, then its `job_event` rows) on the same database, serialised to the same JSON (checked equal to the
platform's answer before measuring), raw psycopg with a connection pool, under the same gunicorn command line.

Bare (information): bench/bare_flask_app.py — one Flask route returning the platform's JSON body, no database,
no auth.

Load: bench/load_client.py in a separate process, 8 threads with keep-alive connections (as many as the
server has threads), closed loop for a fixed time; one repetition = one such run; its value is requests/s.
The three servers run side by side and each repetition loads each of them once, in rotating order. The client
shares the 2 cores with the servers on every side alike. p99 is the median of the per-run p99s.

When a target is missed, the script says where the time goes: both apps' requests run in this process
(Flask's test client, no HTTP, no gunicorn) for their CPU time per request, and a cProfile of the platform's
names the functions that take it.
"""

from __future__ import annotations

import cProfile
import json
import os
import statistics
import subprocess
import sys
import time

import httpx

import harness
import profiling
import stack

MEASURE = "07 API throughput"
THREADS = 8
HANDWRITTEN = f"GET /api/v1/jobs/{{id}} vs hand-written Flask view, same token check + reads, gunicorn 2w×4t, " \
              f"{THREADS} clients"
BARE = f"GET /api/v1/jobs/{{id}} vs bare Flask JSON route (information), gunicorn 2w×4t, {THREADS} clients"


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
        headers = {"Authorization": f"Bearer {token}"}
        web = procs.gunicorn("web", "trainyard_web:create_app()", env)
        answer = httpx.get(f"{web}/api/v1/jobs/{job_id}", headers=headers, timeout=30)
        answer.raise_for_status()
        body_path = tmp / "job.json"
        body_path.write_text(answer.text)
        bare = procs.gunicorn("bare", "bare_flask_app:create_app()", {**env, "BENCH_JOB_JSON": str(body_path)})
        hand = procs.gunicorn("handwritten", "handwritten_flask_app:create_app()",
                              {**env, "BENCH_HW_DATABASE_URL": db_url})
        hand_answer = httpx.get(f"{hand}/api/v1/jobs/{job_id}", headers=headers, timeout=30)
        hand_answer.raise_for_status()
        if hand_answer.json() != answer.json():
            raise RuntimeError(f"the hand-written view answers differently:\n{hand_answer.text}\nvs\n{answer.text}")
        if httpx.get(f"{hand}/api/v1/jobs/{job_id}", headers={"Authorization": "Bearer ty_nope"}).status_code != 401:
            raise RuntimeError("the hand-written view accepts an unknown token")

        stats: dict[str, list[dict]] = {"platform": [], HANDWRITTEN: [], BARE: []}

        def load(base: str, side: str, token: str = ""):
            def run() -> float:
                out = subprocess.run([sys.executable, str(stack.BENCH_DIR / "load_client.py"), base,
                                      f"/api/v1/jobs/{job_id}", "--threads", str(THREADS), "--seconds", str(seconds),
                                      "--token", token], capture_output=True, text=True, check=True, timeout=300)
                result = json.loads(out.stdout.strip().splitlines()[-1])
                if result["errors"]:
                    raise RuntimeError(f"{side}: {result['errors']} failed requests")
                stats[side].append(result)
                return result["rps"]
            return run

        results = harness.compare_many(MEASURE, load(web, "platform", token),
                                       {HANDWRITTEN: load(hand, HANDWRITTEN, token), BARE: load(bare, BARE)},
                                       repeats=args.repeats, unit="req/s", higher_is_better=True, warmup=1,
                                       names={HANDWRITTEN: "hand-written Flask view", BARE: "bare Flask route"})

        def p(side: str, key: str) -> float:
            return statistics.median(r[key] for r in stats[side][1:])  # [0] is the warm-up run

        platform_p99 = p("platform", "p99_ms")
        hand_result, bare_result = results[HANDWRITTEN], results[BARE]
        for result, side in ((hand_result, HANDWRITTEN), (bare_result, BARE)):
            result.extra.update(platform_p50_ms=round(p("platform", "p50_ms"), 2), platform_p99_ms=round(platform_p99, 2),
                                baseline_p50_ms=round(p(side, "p50_ms"), 2), baseline_p99_ms=round(p(side, "p99_ms"), 2),
                                body_bytes=len(answer.content))
        ratio_met, p99_met = hand_result.ratio >= 0.7, platform_p99 <= 20
        reasons = ([] if ratio_met else [f"throughput {hand_result.ratio:.2f} of hand-written"]) + \
                  ([] if p99_met else [f"p99 {platform_p99:.1f} ms > 20 ms under {THREADS} concurrent clients"])
        if reasons:
            split = where_time_goes(settings, db_url, job_id, headers, n=200 if args.quick else 500)
            hand_result.extra.update(split)
            reasons.append(f"in-process CPU per request: platform {split['inproc_platform_us']:.0f} µs, "
                           f"hand-written {split['inproc_handwritten_us']:.0f} µs")
        harness.report(hand_result, "≥ 0.7 of hand-written; p99 ≤ 20 ms at 8 clients", ratio_met and p99_met,
                       "; ".join(reasons))
        harness.report(bare_result, "information (was ≥ 0.7 of bare)", None,
                       f"bare route: no database, no auth; {bare_result.ratio:.3f} of it", information=True)
    return 0


def where_time_goes(settings, db_url: str, job_id: int, headers: dict, *, n: int) -> dict:
    """Both apps in this process (Flask's test client: no HTTP, no gunicorn, one thread): CPU µs per request,
    and the platform's top functions under cProfile. Printed; the two figures are returned for the JSON."""
    os.environ["BENCH_HW_DATABASE_URL"] = db_url
    import handwritten_flask_app
    from trainyard_web import create_app

    apps = {"platform": create_app(settings).test_client(), "handwritten": handwritten_flask_app.create_app().test_client()}
    path = f"/api/v1/jobs/{job_id}"
    per_request = {}
    for name, client in apps.items():
        for _ in range(20):  # warm: connections, caches
            assert client.get(path, headers=headers).status_code == 200
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            client.get(path, headers=headers)
        per_request[name] = (1e6 * (time.perf_counter() - t0) / n, 1e6 * (time.process_time() - c0) / n)
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(n):
        apps["platform"].get(path, headers=headers)
    profile.disable()
    print(f"\n-- where the time goes: GET {path} in this process, {n} requests each (wall / CPU µs per request)")
    for name, (wall, cpu) in per_request.items():
        print(f"   {name:12s} {wall:8.0f} µs wall  {cpu:8.0f} µs CPU")
    print(profiling.profile_summary(profile, n, "trainyard"))
    return {"inproc_platform_us": round(per_request["platform"][1], 1),
            "inproc_handwritten_us": round(per_request["handwritten"][1], 1)}


def _finished_job(settings) -> int:
    """A SUCCEEDED job made through the jobs service (submit → claim → finish), as a worker leaves it."""
    from trainyard import attempts, jobs, leases
    from trainyard.db import Database
    from trainyard.specs import JobSpec

    db = Database(settings.database_url)
    try:
        spec = JobSpec.model_validate({"kind": "train", "dataset": "digits", "architecture": "cnn",
                                       "params": {"epochs": 5}})
        job = jobs.submit_job(db, spec, lambda *_: None, settings=settings, owner="bench")
        claimed = leases.claim_job(db, job.id, "bench:1", 60)
        attempts.finish_job(db, job.id, claimed.attempt,
                        {"val_accuracy": 0.97, "val_loss": 0.1, "train_loss": 0.08, "test_accuracy": 0.96},
                        {"epoch": 5, "epochs": 5, "batch": 45, "batches": 45})
        return job.id
    finally:
        db.dispose()


if __name__ == "__main__":
    sys.exit(main())
