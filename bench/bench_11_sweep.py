"""Measure 11, sweeps: does early stopping find as good a model for less training, and what does the sweep
machinery itself cost per trial?

The stack: PostgreSQL and Redis (as deployments run), the web app under gunicorn, 2 workers, the sweep driver
(`python -m trainyard_workers sweeper`); everything through the REST API.

(a) vs (b), quality for the epochs: on digits (cnn, 9 epochs a trial), the 12-configuration space
`params.lr ∈ {1e-4, 1e-3, 3e-3, 1e-2} × params.batch_size ∈ {16, 32, 64}`, objective val_accuracy at the best
epoch, max_parallel 2, searched (a) exhaustively (a grid, no early stopping) and (b) as the same grid with
asynchronous successive halving (Optuna's SuccessiveHalvingPruner: min 1 epoch, reduction factor 4 — the ASHA
paper's η — so rungs at epochs 1 and 4; a trial that reaches its 9th epoch completes). With η = 3 (rungs at
1, 3, 9) it used 0.44 of the epochs on 2026-12-03: Optuna's asynchronous promotion lets the first trials of each
rung through unopposed, and the rung at 9 only "stopped" trials that had already trained to the end. One repetition runs both, the grid's order seeded by the repetition's number. Two rows: (b)'s best
objective over (a)'s (target ≥ 0.99) and (b)'s total training epochs over (a)'s (target ≤ 0.4; epochs are
counted from the trials' own per-epoch reports).

Overhead, printed: the same 6 trial specs (2 epochs each) run one at a time (i) as a sweep with max_parallel 1
and a median pruner that never stops anything (startup_trials 100, so every epoch still reports and asks) and
(ii) as plain jobs, each submitted by a client the moment the one before ends (polling every 20 ms); one
repetition's value is the wall time from the first submit to the last trial's end. The ratio (i)/(ii) is the
sweep machinery's overhead per trial (submit-to-start, report, decide) relative to the jobs alone. For
information, the time of one report-and-decide (rebuilding the study and asking the pruner) on the finished
sweep is printed too.
"""

from __future__ import annotations

import statistics
import sys
import time

import httpx

import harness
import stack

MEASURE = "11 sweep"
BASE = {"dataset": "digits", "architecture": "cnn", "register": False, "params": {"epochs": 9}}
SPACE = {"params.lr": {"type": "choice", "values": [1e-4, 1e-3, 3e-3, 1e-2]},
         "params.batch_size": {"type": "choice", "values": [16, 32, 64]}}
OVERHEAD_LRS = [1e-3, 2e-3, 3e-3, 4e-3, 5e-3, 6e-3]


def wait_sweep(client: httpx.Client, sweep_id: int, timeout: float = 1800, poll: float = 0.5) -> dict:
    deadline = time.monotonic() + timeout
    while (sweep := client.get(f"/api/v1/sweeps/{sweep_id}").raise_for_status().json())["status"] == "RUNNING":
        if time.monotonic() > deadline:
            raise RuntimeError(f"sweep {sweep_id} still running after {timeout}s")
        time.sleep(poll)
    if sweep["status"] != "SUCCEEDED":
        raise RuntimeError(f"sweep {sweep_id} {sweep['status']}: {sweep['status_reason']}")
    return sweep


def run_sweep(client: httpx.Client, name: str, **fields) -> dict:
    response = client.post("/api/v1/sweeps", json={"name": name, "base": BASE, "space": SPACE, "algorithm": "grid",
                                                    "max_trials": 12, "max_parallel": 2, "register": "none",
                                                    **fields})
    response.raise_for_status()
    return wait_sweep(client, response.json()["id"])


def quality(client: httpx.Client, repeats: int) -> list[harness.Result]:
    """Rows (a) vs (b): best objective and total epochs, one pair of sweeps per repetition."""
    samples = {"best": [], "epochs": []}
    for index in range(repeats):
        runs = {}
        order = ("exhaustive", "halving") if index % 2 == 0 else ("halving", "exhaustive")
        for side in order:
            started, t0 = time.time(), time.perf_counter()
            stopping = {"type": "asha", "min_epochs": 1, "reduction_factor": 4} if side == "halving" else {}
            sweep = run_sweep(client, f"bench-{side}-{index}", seed=index, early_stopping=stopping)
            runs[side] = sweep
            best, epochs = sweep["best_value"], sum(t["epochs"] for t in sweep["trials"])
            seconds = time.perf_counter() - t0
            print(f"  [{MEASURE}] rep {index + 1}/{repeats} {side:10s} best val_accuracy {best:.4f}, "
                  f"{epochs} epochs, {seconds:.0f} s, pruned {sweep['counts'].get('PRUNED', 0)}", flush=True)
            role = "platform" if side == "halving" else "baseline"
            samples["best"].append(harness.Sample(role, index, best, seconds, started))
            samples["epochs"].append(harness.Sample(role, index, float(epochs), seconds, started))
    return [_result(label, unit, samples[key], higher_is_better=key == "best", repeats=repeats)
            for key, label, unit in (("best", "objective, successive halving vs exhaustive grid", "val_accuracy"),
                                     ("epochs", "training epochs, successive halving vs exhaustive grid", "epochs"))]


def _result(label: str, unit: str, samples: list[harness.Sample], *, higher_is_better: bool,
            repeats: int) -> harness.Result:
    plat = [s.value for s in samples if s.side == "platform"]
    base = [s.value for s in samples if s.side == "baseline"]
    result = harness.Result(
        measure=MEASURE, label=label, unit=unit, higher_is_better=higher_is_better,
        repeats=repeats, samples=samples, platform_median=statistics.median(plat), platform_min=min(plat),
        platform_max=max(plat), baseline_median=statistics.median(base), baseline_min=min(base),
        baseline_max=max(base))
    print(harness.summary_lines(result), flush=True)
    return result


def overhead_sweep(client: httpx.Client) -> float:
    t0 = time.perf_counter()
    response = client.post("/api/v1/sweeps", json={
        "name": "bench-overhead", "base": {**BASE, "params": {"epochs": 2}}, "algorithm": "grid",
        "space": {"params.lr": {"type": "choice", "values": OVERHEAD_LRS}}, "max_trials": 6, "max_parallel": 1,
        "register": "none", "early_stopping": {"type": "median", "min_epochs": 1, "startup_trials": 100}})
    response.raise_for_status()
    sweep = wait_sweep(client, response.json()["id"], poll=0.02)  # as often as the plain jobs' client polls
    jobs = client.get(f"/api/v1/jobs?sweep={sweep['id']}").json()["items"]
    assert len(jobs) == 6 and all(j["status"] == "SUCCEEDED" for j in jobs), jobs
    return time.perf_counter() - t0  # the driver ends the sweep after the last trial: that is its cost too


def overhead_jobs(client: httpx.Client) -> float:
    t0 = time.perf_counter()
    for lr in OVERHEAD_LRS:
        spec = {**BASE, "params": {"epochs": 2, "lr": lr}}
        job_id = client.post("/api/v1/jobs", json=spec).raise_for_status().json()["id"]
        while client.get(f"/api/v1/jobs/{job_id}").json()["status"] not in ("SUCCEEDED", "FAILED", "CANCELLED"):
            time.sleep(0.02)
    return time.perf_counter() - t0


def decide_ms(settings, sweep_id: int, calls: int = 50) -> float:
    """One report-and-decide on a finished sweep's trials: rebuild the study, ask the pruner (milliseconds)."""
    from trainyard import sweeps
    from trainyard.db import Database
    from trainyard.sweep_specs import SweepSpec
    from trainyard.sweep_study import should_prune

    db = Database(settings.database_url)
    try:
        with db.read_scope() as s:
            trials = sweeps.study_trials(s, sweep_id)
        spec = SweepSpec.model_validate(sweeps.get_sweep(db, sweep_id).spec)
        running = [t.__class__(**{**t.__dict__, "state": "RUNNING"}) if t.number == len(trials) else t
                   for t in trials]
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            should_prune(spec, running, len(trials))
            times.append((time.perf_counter() - t0) * 1000)
        return statistics.median(times)
    finally:
        db.dispose()


def main() -> int:
    args = harness.parse_args(__doc__, default_repeats=3, quick_repeats=3)
    with stack.temp_dir() as tmp, stack.postgres_database() as db_url, stack.redis_database() as broker_url, \
            stack.Processes(tmp) as procs:
        settings = stack.platform_settings(tmp / "data", database_url=db_url, broker_url=broker_url)
        stack.prepare_platform(settings)
        env = stack.settings_env(settings)
        url = procs.gunicorn("web", "trainyard_web:create_app()", env)
        for _ in range(2):
            procs.platform_worker(settings)
        procs.start("sweeper", [sys.executable, "-m", "trainyard_workers", "sweeper"], env).wait_for_log(
            "driving sweeps")
        headers = {"Authorization": f"Bearer {stack.make_token(settings)}"}
        with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
            best, epochs = quality(client, args.repeats)
            best_met = best.ratio >= 0.99
            harness.report(best, "≥ 0.99 of the exhaustive grid's best", best_met)
            harness.report(epochs, "≤ 0.4 of its epochs", epochs.ratio <= 0.4)
            overhead = harness.compare(MEASURE, "6 trials one at a time: sweep vs the same plain jobs",
                                       lambda: overhead_sweep(client), lambda: overhead_jobs(client),
                                       repeats=args.repeats, unit="s", higher_is_better=False, warmup=0)
            last = client.get("/api/v1/sweeps?limit=1").json()["items"][0]["id"]
            overhead.extra["report_and_decide_ms"] = decide_ms(settings, last)
            per_trial = (overhead.platform_median - overhead.baseline_median) / len(OVERHEAD_LRS)
            overhead.extra["overhead_per_trial_ms"] = per_trial * 1000
            harness.report(overhead, "printed (no target)", None, information=True,
                           note=f"sweep machinery {per_trial * 1000:.0f} ms a trial beyond the jobs themselves")
    return 0


if __name__ == "__main__":
    sys.exit(main())
