"""Where the time goes: cProfile summaries the benchmarks print when a target is missed."""

from __future__ import annotations

import cProfile
import io
import pstats


def profile_summary(profile: cProfile.Profile, n: int, own: str) -> str:
    """A cProfile over `n` requests/jobs, told three ways: the functions of files matching `own` (the
    platform's) by cumulative time, every function by own time, and own time per package."""
    parts = []
    for title, key, restriction in ((f"platform functions ({own}), cumulative", "cumulative", (own, 18)),
                                    ("all functions, own time", "tottime", (18,))):
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats(key).print_stats(*restriction)
        lines = out.getvalue().splitlines()
        start = next((i for i, line in enumerate(lines) if line.strip().startswith("ncalls")), 0)
        parts.append(f"-- cProfile, {title} (seconds over {n}):")
        parts.extend(line for line in lines[start:] if line.strip())
    parts.append(by_package(pstats.Stats(profile), n))
    return "\n".join(parts)


def by_package(stats: pstats.Stats, n: int) -> str:
    """Own (tottime) time per request grouped by top-level package: where the CPU goes, not who calls whom."""
    groups: dict[str, float] = {}
    for (filename, _line, _func), (_cc, _nc, tottime, _ct, _callers) in stats.stats.items():
        groups[package(filename)] = groups.get(package(filename), 0.0) + tottime
    total = sum(groups.values())
    lines = ["-- cProfile, own time per request (or job) by package (profiled: inflated, read as shares):"]
    for name, seconds in sorted(groups.items(), key=lambda kv: -kv[1])[:14]:
        lines.append(f"   {name:28s} {1e6 * seconds / n:7.0f} µs  {100 * seconds / total:5.1f} %")
    return "\n".join(lines)


def package(filename: str) -> str:
    if filename.startswith("~") or filename.startswith("<"):
        return "builtins / C"
    parts = filename.replace("\\", "/").split("/")
    for marker in ("site-packages", "platform", "web", "workers"):
        if marker in parts:
            index = len(parts) - 1 - parts[::-1].index(marker)
            if index + 1 < len(parts):
                return parts[index + 1].removesuffix(".py")
    return "stdlib: " + parts[-1].removesuffix(".py")
