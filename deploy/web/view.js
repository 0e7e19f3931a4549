// Live refresh of the forecast chart: re-fetch the server-drawn SVG of the chosen series every
// few seconds (same origin only; nothing is loaded from the internet).
(function () {
  "use strict";
  var box = document.getElementById("chart");
  var status = document.getElementById("status");
  if (!box) { return; }
  var series = box.getAttribute("data-series");
  var period = parseInt(box.getAttribute("data-refresh-ms"), 10) || 5000;
  if (!series) { return; }
  var url = "/view/chart.svg?series=" + encodeURIComponent(series);
  function refresh() {
    fetch(url, { cache: "no-store" })
      .then(function (r) {
        if (!r.ok) { throw new Error("HTTP " + r.status); }
        return r.text();
      })
      .then(function (svg) {
        box.innerHTML = svg;
        status.textContent = "updated " + new Date().toLocaleTimeString();
      })
      .catch(function (e) { status.textContent = "refresh failed: " + e.message; })
      .then(function () { setTimeout(refresh, period); });
  }
  setTimeout(refresh, period);
})();
