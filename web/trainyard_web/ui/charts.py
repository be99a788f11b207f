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
