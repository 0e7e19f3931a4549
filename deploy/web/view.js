// Live refresh of the forecast chart and its rolling accuracy: re-fetch the server-drawn SVG of
// the chosen series and its accuracy texts (formatted by the server) every few seconds (same
// origin only; nothing is loaded from the internet).
(function () {
  "use strict";
  var box = document.getElementById("chart");
  var status = document.getElementById("status");
  if (!box) { return; }
  var series = box.getAttribute("data-series");
  var period = parseInt(box.getAttribute("data-refresh-ms"), 10) || 5000;
  var points = parseInt(box.getAttribute("data-points"), 10) || 50;
  if (!series) { return; }
  var q = "?series=" + encodeURIComponent(series);
  var url = "/view/chart.svg" + q;
  var statsUrl = "/view/stats.json" + q + "&points=" + points;
  function get(u, as) {
    return fetch(u, { cache: "no-store" }).then(function (r) {
      if (!r.ok) { throw new Error("HTTP " + r.status); }
      return as === "json" ? r.json() : r.text();
    });
  }
  function showStats(stats) {
    var labels = (stats && stats.labels) || {};
    var cells = document.querySelectorAll("#accuracy [data-stat]");
    for (var i = 0; i < cells.length; i++) {
      var text = labels[cells[i].getAttribute("data-stat")];
      cells[i].textContent = typeof text === "string" ? text : "-";
    }
  }
  function refresh() {
    Promise.all([get(url, "text"), get(statsUrl, "json")])
      .then(function (got) {
        box.innerHTML = got[0];
        showStats(got[1]);
        status.textContent = "updated " + new Date().toLocaleTimeString();
      })
      .catch(function (e) { status.textContent = "refresh failed: " + e.message; })
      .then(function () { setTimeout(refresh, period); });
  }
  setTimeout(refresh, period);
})();
