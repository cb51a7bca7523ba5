// idlegrid dashboard: live fragments over Server-Sent Events, charts with the vendored uPlot.
// The server renders every fragment; this file only swaps them in and redraws the charts.
(function () {
  "use strict";
  var page = document.body.dataset.page;
  var charts = {};
  var palette = ["#2f6fde", "#1f8a4c", "#b3261e", "#a15c00", "#7b3fc4", "#008b8b", "#c2185b", "#546e7a"];

  function draw(id, spec) {
    var el = document.getElementById(id);
    if (!el || typeof uPlot === "undefined") return;
    var data = [spec.x].concat(spec.series.map(function (s) { return s.values; }));
    var shape = spec.series.map(function (s) { return s.label; }).join("|");
    var c = charts[id];
    if (c && c.shape === shape) { c.plot.setData(data); return; }
    if (c) c.plot.destroy();
    el.textContent = "";
    if (!spec.series.length) { el.textContent = "No data yet."; charts[id] = null; return; }
    var opts = {
      width: el.clientWidth || 560, height: (el.clientHeight || 230) - 40,
      scales: { x: { time: true } },
      series: [{}].concat(spec.series.map(function (s, i) {
        return { label: s.label, stroke: palette[i % palette.length], width: 1.5, spanGaps: false,
                 points: { show: true, size: 4 } };
      })),
      axes: [{}, { size: 50 }],
    };
    charts[id] = { shape: shape, plot: new uPlot(opts, data, el) };
  }

  function apply(snap) {
    var sections = snap.sections || {};
    Object.keys(sections).forEach(function (id) {
      var el = document.getElementById(id);
      if (!el) return;
      var before = {};
      el.querySelectorAll("tr[data-request]").forEach(function (tr) { before[tr.dataset.request] = 1; });
      el.innerHTML = sections[id];
      el.querySelectorAll("tr[data-request]").forEach(function (tr) {
        if (!before[tr.dataset.request]) tr.classList.add("fresh");
      });
    });
    var cs = snap.charts || {};
    Object.keys(cs).forEach(function (id) { draw(id, cs[id]); });
    window.idlegridLastUpdate = Date.now();
  }

  function connect() {
    var live = document.getElementById("live");
    // v: the build this page was rendered from, so unchanged fragments are not sent again.
    var es = new EventSource("/dashboard/events?page=" + encodeURIComponent(page) +
                             "&v=" + encodeURIComponent(document.body.dataset.version || ""));
    es.addEventListener("open", function () { live.className = "live on"; live.textContent = "live"; });
    es.addEventListener("snapshot", function (e) { apply(JSON.parse(e.data)); });
    es.addEventListener("error", function () { live.className = "live off"; live.textContent = "reconnecting…"; });
  }

  function init() {
    var initial = JSON.parse(document.getElementById("charts-data").textContent || "{}");
    Object.keys(initial).forEach(function (id) { draw(id, initial[id]); });
    connect();
  }
  // Marks this document: a test can tell that updates arrived without a reload.
  window.idlegridLoadedAt = Date.now();
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
