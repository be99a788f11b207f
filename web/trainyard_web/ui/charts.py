"""Turn MLflow metric histories into the chart payloads `static/charts.js` draws."""

from __future__ import annotations

Points = list[tuple[int, float]]
NOT_CHARTED = ("lr", "epoch_seconds")


def _series_chart(title: str, curves: dict[str, Points]) -> dict:
    xs = sorted({step for points in curves.values() for step, _ in points})
    series = []
    for label, points in curves.items():
        by_step = dict(points)
        series.append({"label": label, "values": [by_step.get(x) for x in xs]})
    return {"title": title, "x": xs, "series": series}


def _per_epoch(history: dict[str, Points]) -> dict[str, Points]:
    return {k: v for k, v in history.items() if not k.startswith("test_") and k not in NOT_CHARTED}


def job_charts(history: dict[str, Points]) -> list[dict]:
    """Loss curves in one chart, quality (accuracy, IoU, …) in another, both by epoch."""
    epochwise = _per_epoch(history)
    losses = {k: v for k, v in epochwise.items() if k.endswith("loss")}
    quality = {k: v for k, v in epochwise.items() if not k.endswith("loss")}
    return [_series_chart(title, curves) for title, curves in (("Loss", losses), ("Validation metrics", quality))
            if curves]


def compare_charts(histories: dict[str, dict[str, Points]]) -> list[dict]:
    """One chart per metric, one line per job."""
    keys = sorted({k for h in histories.values() for k in _per_epoch(h)})
    return [_series_chart(key, {label: h[key] for label, h in histories.items() if key in h}) for key in keys]


def sweep_charts(sweep) -> list[dict]:
    """A sweep's objective by trial with the best so far; every trial's learning curve (the stopped ones
    marked); and, per numeric parameter, the objective against its value (one point per trial)."""
    spec = sweep.spec
    metric = spec.get("objective", {}).get("metric", "objective")
    maximize = (spec.get("objective", {}).get("direction") or
                ("minimize" if metric.endswith("loss") else "maximize")) == "maximize"
    ended = [t for t in sweep.trials if t.value is not None]
    charts = []
    if ended:
        best, best_so_far = None, []
        for trial in sweep.trials:
            if trial.status == "SUCCEEDED" and trial.value is not None:
                best = trial.value if best is None else (max if maximize else min)(best, trial.value)
            best_so_far.append(best)
        charts.append({"title": f"{metric} by trial", "xlabel": "trial", "x": [t.number for t in sweep.trials],
                       "series": [{"label": metric, "values": [t.value for t in sweep.trials], "points_only": True},
                                  {"label": "best so far", "values": best_so_far}]})
    curves = {f"trial {t.number}" + (" (stopped)" if t.status == "PRUNED" else ""): t.reports
              for t in sweep.trials if t.reports}
    if curves:
        chart = _series_chart(f"{metric} by epoch, every trial", curves)
        charts.append(chart)
    for path in spec.get("space", {}):
        points = sorted((float(t.params[path]), t.number, t.value) for t in ended
                        if isinstance(t.params.get(path), int | float) and not isinstance(t.params.get(path), bool))
        if len({x for x, _, _ in points}) < 2:
            continue
        xs = sorted({x for x, _, _ in points})
        series = [{"label": f"trial {number}", "points_only": True,
                   "values": [value if x == px else None for x in xs]} for px, number, value in points]
        charts.append({"title": f"{metric} against {path}", "xlabel": path, "x": xs, "series": series,
                       "legend": False, "log_x": spec["space"][path].get("type") == "loguniform"})
    return charts
