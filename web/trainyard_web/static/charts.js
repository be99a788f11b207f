// Draws the metric charts of a page with uPlot (served from this app; no CDN).
// An element with data-charts="<url>" gets one chart per entry of the JSON at that URL:
//   {"done": bool, "charts": [{"title": str, "x": [epochs], "series": [{"label": str, "values": [..]}]}]}
// While "done" is false the charts are fetched again every few seconds and grow in place.
(function () {
  "use strict";
  var WHOLE = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000];
  var COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563", "#ca8a04"];

  // Optional per chart: "xlabel" (default "epoch"), "log_x", "legend": false; per series "points_only"
  // (a scatter: points, no line).
  function options(chart, width) {
    var xlabel = chart.xlabel || "epoch";
    var none = function () { return null; };
    return {
      title: chart.title, width: width, height: 220,
      legend: { show: chart.legend !== false },
      scales: { x: chart.log_x ? { time: false, distr: 3, log: 10 } : { time: false } },
      // Epochs and trials are whole numbers: no tick at 1.5 (a parameter's axis keeps uPlot's own ticks).
      axes: [chart.xlabel && chart.xlabel !== "trial" ? { label: xlabel } : { label: xlabel, incrs: WHOLE }, {}],
      series: [{ label: xlabel }].concat(chart.series.map(function (s, i) {
        var line = { label: s.label, stroke: COLORS[i % COLORS.length], width: 2, points: { show: true, size: 5 } };
        if (s.points_only) { line.paths = none; line.points = { show: true, size: 7, fill: COLORS[i % COLORS.length] }; }
        return line;
      })),
    };
  }

  function draw(root, payload) {
    root.setAttribute("data-points", String(payload.charts.reduce(function (n, c) { return n + c.x.length; }, 0)));
    root.setAttribute("data-done", String(payload.done));
    root._plots = root._plots || {};
    payload.charts.forEach(function (chart) {
      var data = [chart.x].concat(chart.series.map(function (s) { return s.values; }));
      var key = chart.title + "|" + chart.series.map(function (s) { return s.label; }).join(",");
      var existing = root._plots[chart.title];
      if (existing && existing.key === key) {
        existing.plot.setData(data);
        return;
      }
      if (existing) { existing.plot.destroy(); existing.box.remove(); }
      var box = document.createElement("figure");
      box.className = "chart";
      box.setAttribute("aria-label", chart.title + (chart.xlabel ? "" : " by epoch"));
      root.appendChild(box);
      // Each chart fills its own grid cell, not the whole grid.
      var width = Math.max(240, Math.min(box.clientWidth || 600, 720));
      root._plots[chart.title] = { key: key, box: box, plot: new uPlot(options(chart, width), data, box) };
    });
    // A chart made while its cell was still alone in the grid took the whole row's width: once every cell is
    // in place, each chart takes its own cell's width.
    Object.keys(root._plots).forEach(function (title) {
      var entry = root._plots[title];
      var fit = Math.max(240, Math.min(entry.box.clientWidth || 600, 720));
      if (Math.abs(entry.plot.width - fit) > 1) { entry.plot.setSize({ width: fit, height: 220 }); }
    });
    var empty = root.querySelector(".charts-empty");
    if (empty) { empty.hidden = payload.charts.length > 0; }
  }

  function load(root) {
    fetch(root.getAttribute("data-charts"), { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (response) { return response.ok ? response.json() : Promise.reject(response.status); })
      .then(function (payload) {
        draw(root, payload);
        if (!payload.done) { setTimeout(function () { load(root); }, 2000); }
      })
      .catch(function () { setTimeout(function () { load(root); }, 5000); });
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-charts]").forEach(load);
  });
})();
