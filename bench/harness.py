"""What every benchmark script shares: interleaved platform-vs-baseline repetitions, the printed table row,
and the day's JSON file under bench/results/.

A script runs as `python bench/bench_NN_name.py [--quick] [--repeats N]` (its folder is on sys.path, so it
imports this module as `harness`). It builds a platform callable and a baseline callable, each performing
one repetition and returning one value (images/s, seconds, requests/s, ...), and calls `compare`, which
runs them interleaved (A,B then B,A, ...) so background load on a shared machine hits both sides alike.
`compare_many` does the same for one platform side against several baselines (e.g. a hand-written one and a
bare one), running the platform once per repetition.

The ratio is always the median over repetitions of platform / baseline, the two values of a repetition
measured back to back (close to platform median / baseline median, but immune to the machine's drift
between repetitions), read against the target's phrasing in BENCHMARKS.md:

- ratio_kind "throughput" (higher_is_better=True): the platform should reach at least X of the baseline;
  target "≥ 0.97" is met when ratio >= 0.97.
- ratio_kind "latency" (higher_is_better=False): the platform should take at most k times the baseline;
  target "≤ 3×" is met when ratio <= 3.

`Result.platform_better` says which side won, whatever the kind. Nothing here asserts a wall-clock time.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import fcntl
import json
import os
import platform as _platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(os.environ.get("TRAINYARD_BENCH_RESULTS", ROOT / "bench" / "results"))
MIN_REPEATS = 3  # --quick may go this low, never lower
# One id per script run: run_all shows, per script, only the rows of its latest run.
RUN_ID = f"{_dt.datetime.now().strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
DEFAULT_REPEATS = 5


@dataclass
class Sample:
    """One repetition of one side."""

    side: str  # "platform" | "baseline"
    index: int  # repetition number, 0-based (warm-up runs are not recorded)
    value: float
    seconds: float  # wall time the repetition took
    started_at: float  # time.time() when it began


@dataclass
class Result:
    """Both sides of one measure/label, summarised."""

    measure: str  # e.g. "04 dispatch latency"
    label: str  # e.g. "p50 submit-to-start" or an architecture name
    unit: str
    higher_is_better: bool
    repeats: int
    samples: list[Sample]
    platform_median: float
    platform_min: float
    platform_max: float
    baseline_median: float
    baseline_min: float
    baseline_max: float
    # Scripts may add figures that are not ratios (e.g. p99_ms) for the report and the JSON.
    extra: dict = field(default_factory=dict)

    @property
    def ratio_kind(self) -> str:
        return "throughput" if self.higher_is_better else "latency"

    @property
    def ratio(self) -> float:
        """The median over repetitions of platform / baseline, each repetition's two values measured back to
        back (see the module docstring for how to read it). On a machine whose speed drifts by ±10 % within
        a minute, pairing cancels the drift that a ratio of the two sides' medians keeps."""
        pairs = [p / b if b else (float("inf") if p else 1.0)
                 for p, b in zip(self.values("platform"), self.values("baseline"))]
        if not pairs:  # a Result built by hand from medians alone
            if self.baseline_median == 0:
                return float("inf") if self.platform_median else 1.0
            return self.platform_median / self.baseline_median
        return statistics.median(pairs)

    @property
    def difference(self) -> float:
        """platform median - baseline median, in `unit` (for targets like "≤ bare + 3 ms")."""
        return self.platform_median - self.baseline_median

    @property
    def platform_better(self) -> bool:
        return self.ratio > 1 if self.higher_is_better else self.ratio < 1

    def values(self, side: str) -> list[float]:
        return [s.value for s in self.samples if s.side == side]

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(ratio=self.ratio, ratio_kind=self.ratio_kind, difference=self.difference,
                    platform_values=self.values("platform"), baseline_values=self.values("baseline"))
        return data


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; for per-request latencies inside a repetition."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def compare(measure: str, label: str, platform: Callable[[], float], baseline: Callable[[], float], *,
            repeats: int, unit: str, higher_is_better: bool = True, warmup: int = 1) -> Result:
    """Run `platform` and `baseline` `repeats` times each, interleaved A,B / B,A, after `warmup` unrecorded
    runs of each; print both summaries and the ratio last; return the Result."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    sides = {"platform": platform, "baseline": baseline}
    for _ in range(warmup):
        for side, fn in sides.items():
            t0 = time.perf_counter()
            value = fn()
            print(f"  [{measure} | {label}] warm-up  {side:8s} {value:12.4g} {unit} "
                  f"({time.perf_counter() - t0:.1f}s, not recorded)", flush=True)
    samples: list[Sample] = []
    for index in range(repeats):
        order = ("platform", "baseline") if index % 2 == 0 else ("baseline", "platform")
        for side in order:
            started_at = time.time()
            t0 = time.perf_counter()
            value = float(sides[side]())
            samples.append(Sample(side, index, value, time.perf_counter() - t0, started_at))
            print(f"  [{measure} | {label}] rep {index + 1}/{repeats} {side:8s} {value:12.4g} {unit}", flush=True)
    plat = [s.value for s in samples if s.side == "platform"]
    base = [s.value for s in samples if s.side == "baseline"]
    result = Result(measure=measure, label=label, unit=unit, higher_is_better=higher_is_better, repeats=repeats,
                    samples=samples,
                    platform_median=statistics.median(plat), platform_min=min(plat), platform_max=max(plat),
                    baseline_median=statistics.median(base), baseline_min=min(base), baseline_max=max(base))
    print(summary_lines(result), flush=True)
    return result


def compare_many(measure: str, platform: Callable[[], float], baselines: dict[str, Callable[[], float]], *,
                 repeats: int, unit: str, higher_is_better: bool = True, warmup: int = 1,
                 names: dict[str, str] | None = None) -> dict[str, Result]:
    """`compare` with one platform side against several baselines, keyed by the label of each one's Result.

    Every repetition runs the platform and each baseline once, in an order rotated (and reversed every other
    repetition) from one repetition to the next, so drift hits all sides alike; the Result of each label pairs
    the platform's repetition i with that baseline's repetition i. The platform runs once per repetition, not
    once per baseline (what makes a three-way dispatch benchmark affordable). `names` gives the progress
    lines a short name per label (default: the label)."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    sides: dict[str, Callable[[], float]] = {"platform": platform, **baselines}
    shown = {"platform": "platform", **{label: (names or {}).get(label, label) for label in baselines}}
    keys = list(sides)
    for _ in range(warmup):
        for name in keys:
            t0 = time.perf_counter()
            value = sides[name]()
            print(f"  [{measure}] warm-up  {value:12.4g} {unit} {shown[name]} "
                  f"({time.perf_counter() - t0:.1f}s, not recorded)", flush=True)
    taken: dict[str, list[Sample]] = {name: [] for name in keys}
    for index in range(repeats):
        shift = index % len(keys)
        order = keys[shift:] + keys[:shift]
        if index % 2:
            order.reverse()
        for name in order:
            started_at = time.time()
            t0 = time.perf_counter()
            value = float(sides[name]())
            side = "platform" if name == "platform" else "baseline"
            taken[name].append(Sample(side, index, value, time.perf_counter() - t0, started_at))
            print(f"  [{measure}] rep {index + 1}/{repeats} {value:12.4g} {unit} {shown[name]}", flush=True)
    plat = [s.value for s in taken["platform"]]
    results: dict[str, Result] = {}
    for label in baselines:
        base = [s.value for s in taken[label]]
        result = Result(measure=measure, label=label, unit=unit, higher_is_better=higher_is_better, repeats=repeats,
                        samples=sorted(taken["platform"] + taken[label], key=lambda s: s.started_at),
                        platform_median=statistics.median(plat), platform_min=min(plat), platform_max=max(plat),
                        baseline_median=statistics.median(base), baseline_min=min(base), baseline_max=max(base))
        print(summary_lines(result), flush=True)
        results[label] = result
    return results


def summary_lines(result: Result) -> str:
    r = result
    return "\n".join([
        f"{r.measure} | {r.label}  ({r.repeats} repeats, interleaved)",
        f"  platform  median {r.platform_median:.4g}  min {r.platform_min:.4g}  max {r.platform_max:.4g} {r.unit}",
        f"  baseline  median {r.baseline_median:.4g}  min {r.baseline_min:.4g}  max {r.baseline_max:.4g} {r.unit}",
        f"  ratio platform/baseline = {r.ratio:.3f}, median of {r.repeats} paired repetitions ({r.ratio_kind}: "
        f"{'higher' if r.higher_is_better else 'lower'} is better)",
    ])


# ---- reporting ----------------------------------------------------------------------------------------


def machine_description() -> dict:
    """CPU model, cores, RAM, torch version/threads, GPU (or none), Python version, load at report time."""
    cpu = _platform.processor() or _platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gb = round(int(line.split()[1]) / 1024**2, 1)
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_gb": ram_gb,
        "python": _platform.python_version(),
        "os": f"{_platform.system()} {_platform.release()}",
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    except ImportError:
        info.update(torch=None, torch_threads=None, gpu="unknown (torch not importable)")
    return info


def results_path(day: _dt.date | None = None) -> Path:
    return RESULTS_DIR / f"{(day or _dt.date.today()).isoformat()}.json"


def report(result: Result, target: str, met: bool | None, note: str = "", *, script: str | None = None,
           information: bool = False) -> dict:
    """Print the table row (ratio last) and append the result to bench/results/<today>.json.

    `met` is True/False against `target`, or None when the target does not apply (skipped). `information`
    (with met None) marks a row kept for context beside the one the target applies to, e.g. a bare baseline
    that a revised target replaced with a hand-written one: its status reads "information", not "skipped"."""
    status = ("information" if information else "skipped") if met is None else ("MET" if met else "NOT MET")
    extra = "  ".join(f"{k}={_fmt(v)}" for k, v in result.extra.items())
    print(f"| {result.measure} | {result.label} | platform {result.platform_median:.4g} "
          f"[{result.platform_min:.4g}–{result.platform_max:.4g}] | baseline {result.baseline_median:.4g} "
          f"[{result.baseline_min:.4g}–{result.baseline_max:.4g}] {result.unit} | target {target} | {status}"
          f"{' | ' + extra if extra else ''}{' | ' + note if note else ''} |")
    print(f"RATIO {result.measure} | {result.label}: {result.ratio:.3f}", flush=True)
    entry = {**result.to_dict(), "target": target, "met": met, "status": status, "note": note,
             "script": script or Path(sys.argv[0]).name, "recorded_at": _dt.datetime.now().isoformat(timespec="seconds"),
             "quick": bool(os.environ.get("TRAINYARD_BENCH_QUICK")), "run_id": RUN_ID}
    _append(entry)
    return entry


def report_skipped(measure: str, label: str, target: str, reason: str, *, script: str | None = None) -> dict:
    """Record a measure that could not run here (e.g. GPU-only) as skipped, with the reason."""
    print(f"| {measure} | {label} | skipped | target {target} | {reason} |")
    print(f"RATIO {measure} | {label}: skipped", flush=True)
    entry = {"measure": measure, "label": label, "target": target, "met": None, "status": "skipped",
             "note": reason, "script": script or Path(sys.argv[0]).name,
             "recorded_at": _dt.datetime.now().isoformat(timespec="seconds"), "run_id": RUN_ID}
    _append(entry)
    return entry


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _append(entry: dict) -> None:
    _update_results(lambda data: data["results"].append(entry))


def record_machine() -> dict:
    """Describe the machine now (run_all calls it before its first script: the load average at the start of
    a suite) as the machine of today's results; returns the description."""
    machine = machine_description()
    _update_results(lambda data: data.update(machine=machine))
    return machine


def _update_results(change: Callable[[dict], object]) -> None:
    path = results_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    # Several scripts may append at once (run_all runs them one by one, but people run them by hand too).
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        text = handle.read()
        data = json.loads(text) if text.strip() else {"machine": machine_description(), "results": []}
        change(data)
        handle.seek(0)
        handle.truncate()
        json.dump(data, handle, indent=2, default=str)
        handle.write("\n")


# ---- command line -------------------------------------------------------------------------------------


def parse_args(description: str = "", argv: list[str] | None = None, *,
               parser: argparse.ArgumentParser | None = None,
               default_repeats: int = DEFAULT_REPEATS, quick_repeats: int = MIN_REPEATS) -> argparse.Namespace:
    """`--quick` and `--repeats N` (at least 3). `args.repeats` is resolved: N if given, else
    `quick_repeats` under --quick, else `default_repeats`. Pass `parser` to add a script's own options."""
    parser = parser or argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and smaller runs (minutes, not hours)")
    parser.add_argument("--repeats", type=int, default=None, help=f"repetitions per side (minimum {MIN_REPEATS})")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = quick_repeats if args.quick else default_repeats
    if args.repeats < MIN_REPEATS:
        print(f"--repeats {args.repeats} raised to the minimum of {MIN_REPEATS}", file=sys.stderr)
        args.repeats = MIN_REPEATS
    if args.quick:
        os.environ["TRAINYARD_BENCH_QUICK"] = "1"
    _exit_cleanly_on_signals()
    return args


def _exit_cleanly_on_signals() -> None:
    """SIGTERM (run_all's timeout, a plain `kill`) and SIGINT raise instead of killing outright, so the
    scripts' context managers stop their processes and drop their databases on the way out."""
    import signal

    def _raise(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _raise)
    signal.signal(signal.SIGINT, _raise)  # a background job starts with SIGINT ignored
