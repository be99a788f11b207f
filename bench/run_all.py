"""Run every bench/bench_*.py in its own subprocess, then write BENCHMARKS.md at the repository root from
today's bench/results/<date>.json.

    python bench/run_all.py [--quick] [--repeats N] [--only 04,07] [--timeout SECONDS]
    python bench/run_all.py --report-only     # rewrite BENCHMARKS.md from today's JSON
"""

from __future__ import annotations

import argparse
import ast
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

import harness  # noqa: E402

# The targets of BENCHMARKS.md (the design document), by measure number, for measures that wrote nothing.
TARGETS = {
    "01": ("training-loop efficiency", "≥ 0.97 on CPU (≥ 0.95 on GPU)"),
    "02": ("compute utilisation", "≥ 0.6 (fp32), ≥ 0.5 (bf16)"),
    "03": ("recipe vs record (GPU only)", "≤ 1.5×"),
    "04": ("dispatch latency", "p50 ≤ 3× bare; p99 ≤ 50 ms"),
    "05": ("tracking overhead", "≥ 0.99"),
    "06": ("queue throughput", "≥ 0.5"),
    "07": ("API throughput", "≥ 0.7; p99 ≤ 20 ms"),
    "08": ("serving efficiency", "(a) ≤ bare + 3 ms; (b) ≥ 0.7 of bare and ≥ 2× mlflow models serve"),
    "09": ("promote-to-serve", "≤ 1.5×"),
    "10": ("scale of the control plane", "≤ 1.5×"),
    "11": ("sweep", "≥ 0.99 of the best objective in ≤ 0.4 of the epochs"),
    "12": ("claim contention", "≥ 0.7 of a hand-written SKIP LOCKED claim; every job claimed exactly once"),
}


def scripts(only: set[str]) -> list[Path]:
    found = sorted(BENCH.glob("bench_*.py"))
    return [p for p in found if not only or p.name.split("_")[1] in only]


def run_scripts(args: argparse.Namespace) -> dict[str, dict]:
    """Each script in a subprocess; returns {script name: {"rc", "seconds", "tail"}}."""
    outcomes = {}
    extra = (["--quick"] if args.quick else []) + (["--repeats", str(args.repeats)] if args.repeats else [])
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for script in scripts(args.only):
        print(f"\n===== {script.name} {' '.join(extra)}", flush=True)
        t0 = time.monotonic()
        lines: list[str] = []
        proc = subprocess.Popen([sys.executable, str(script), *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        try:
            deadline = t0 + args.timeout
            for line in proc.stdout:  # echo as it goes; the timeout is checked between lines
                print(line, end="", flush=True)
                lines.append(line.rstrip())
                if time.monotonic() > deadline:
                    break
            if proc.poll() is None and time.monotonic() > deadline:
                proc.terminate()  # the script's handler stops its processes and drops its databases
                lines.append(f"timed out after {args.timeout}s")
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        outcomes[script.name] = {"rc": proc.returncode, "seconds": time.monotonic() - t0, "tail": lines[-15:]}
        print(f"===== {script.name}: exit {proc.returncode} in {time.monotonic() - t0:.0f}s", flush=True)
    return outcomes


def describe(script: Path) -> str:
    """The script's module docstring: what runs and what it is compared to."""
    try:
        return ast.get_docstring(ast.parse(script.read_text())) or ""
    except SyntaxError:
        return ""


def _num(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if abs(value) >= 1e6:
            return f"{value:.3g}"
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def write_markdown(data: dict, outcomes: dict[str, dict], day: dt.date, quick: bool) -> str:
    machine = data.get("machine") or harness.machine_description()
    results = data.get("results", [])
    # A re-run of a script supersedes all its earlier rows of the day (labels may change between runs).
    last_run = {e.get("script"): e.get("run_id") for e in results}
    latest: dict[tuple[str, str], dict] = {}
    for entry in results:
        if entry.get("run_id") == last_run.get(entry.get("script")) or entry.get("run_id") is None:
            latest[(entry["measure"], entry["label"])] = entry
    rows = sorted(latest.values(), key=lambda e: e["measure"])
    lines = [
        "# Trainyard benchmarks",
        "",
        f"Latest figures from `make bench{' ARGS=--quick' if quick else ''}` on {day.isoformat()}. Every figure is a ratio "
        "measured side by side in one process run, the platform and its bare baseline interleaved (A,B / B,A); see `/bench` and the design targets in the project's BENCHMARKS brief. Absolute numbers drift "
        "with background load on shared machines; the ratios are what count.",
        "",
        f"**Machine:** {machine.get('cpu')}, {machine.get('cores')} cores, {machine.get('ram_gb')} GB RAM, "
        f"GPU: {machine.get('gpu')}; Python {machine.get('python')}, torch {machine.get('torch')} "
        f"({machine.get('torch_threads')} threads); load average at start {_num(machine.get('load_avg_1m'))}."
        + (" Quick mode (fewer repetitions)." if quick else ""),
        "",
        "Ratio = the median over repetitions of platform / baseline, each repetition's pair measured back to back "
        "(the medians shown beside it drift with the machine; the pairs do not). For throughputs (higher is better) the target is a floor; "
        "for latencies (lower is better) a ceiling.",
        "",
        "| measure | label | platform median [min–max] | baseline median [min–max] | unit | ratio | target | result | notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    seen_measures = set()
    table: list[tuple[str, str]] = []  # (measure number, row), sorted at the end
    for e in rows:
        seen_measures.add(e["measure"][:2])
        if e.get("status") == "skipped" and "platform_median" not in e:
            table.append((e["measure"][:2], f"| {e['measure']} | {e['label']} | — | — | — | — | {e['target']} | skipped | {e.get('note', '')} |"))
            continue
        extra = ", ".join(f"{k} {_num(v)}" for k, v in (e.get("extra") or {}).items())
        notes = "; ".join(x for x in (extra, e.get("note", "")) if x).replace("|", "/")
        status = {"MET": "met", "NOT MET": "**not met**", "skipped": "skipped"}.get(e["status"], e["status"])
        table.append((e["measure"][:2],
            f"| {e['measure']} | {e['label']} | {_num(e['platform_median'])} [{_num(e['platform_min'])}–"
            f"{_num(e['platform_max'])}] | {_num(e['baseline_median'])} [{_num(e['baseline_min'])}–"
            f"{_num(e['baseline_max'])}] | {e['unit']} | {e['ratio']:.3f} | {e['target']} | {status} | {notes} |"))
    for number, (name, target) in TARGETS.items():
        if number in seen_measures:
            continue
        script = next(iter(BENCH.glob(f"bench_{number}_*.py")), None)
        if script is None:
            reason = "no benchmark script yet"
        else:
            outcome = outcomes.get(script.name)
            reason = (f"{script.name} exited {outcome['rc']} without a result: "
                      f"{(outcome['tail'] or [''])[-1][:200]}" if outcome else f"{script.name} not run")
        table.append((number, f"| {number} {name} | — | — | — | — | — | {target} | not measured | "
                              f"{reason.replace('|', '/')} |"))
    lines += [row for _, row in sorted(table, key=lambda item: item[0])]

    lines += ["", "## What each measure runs", ""]
    for script in scripts(set()):
        doc = describe(script)
        if doc:
            lines += [f"### `{script.name}`", "", doc, ""]
    findings = BENCH / "findings.md"  # hand-written analysis of unmet targets, kept next to the scripts
    if findings.exists():
        lines += [findings.read_text().strip(), ""]
    lines += ["## Running them", "",
              "```sh",
              "make bench                 # every bench/bench_*.py, 5+ repetitions each; rewrites this file",
              "make bench ARGS=--quick    # 3 repetitions, smaller runs: a few minutes on 2 cores",
              "make bench-quick           # the same",
              ".venv/bin/python bench/bench_07_api.py --repeats 7   # one measure",
              "```", "",
              "Raw samples (every repetition of both sides, the machine description) are in "
              "`bench/results/<date>.json` (not committed).", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--only", type=lambda s: {x.strip().zfill(2) for x in s.split(",") if x.strip()},
                        default=set(), help="measure numbers, e.g. 04,07")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per script (default 900, quick 420)")
    parser.add_argument("--report-only", action="store_true", help="only rewrite BENCHMARKS.md from today's JSON")
    args = parser.parse_args()
    args.timeout = args.timeout or (420 if args.quick else 1800)
    if not args.report_only:
        harness.record_machine()  # not whichever script first wrote today's file, maybe hours earlier
    outcomes = {} if args.report_only else run_scripts(args)
    day = dt.date.today()
    path = harness.results_path(day)
    data = json.loads(path.read_text()) if path.exists() else {"machine": harness.machine_description(), "results": []}
    quick = args.quick or any(e.get("quick") for e in data.get("results", []))
    (ROOT / "BENCHMARKS.md").write_text(write_markdown(data, outcomes, day, quick))
    print(f"\nwrote {ROOT / 'BENCHMARKS.md'} from {path}")
    failed = [name for name, o in outcomes.items() if o["rc"] != 0]
    if failed:
        print(f"scripts that failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
