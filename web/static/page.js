// The debug page refreshes itself: every few seconds it fetches its own URL
// and swaps in the sections marked data-refresh, keeping the scroll position,
// the measure form and any open <details>. Without JavaScript the page is
// the same, only static.
(function () {
  "use strict";
  var body = document.body;
  var every = parseInt(body.getAttribute("data-refresh-ms") || "0", 10);
  if (!every) {
    return;
  }
  var stamp = document.getElementById("stamp");
  var busy = false;

  function openDetails(el) {
    var open = [];
    el.querySelectorAll("details").forEach(function (d, i) { if (d.open) { open.push(i); } });
    return open;
  }

  function refresh() {
    if (busy || document.hidden) {
      return;
    }
    busy = true;
    fetch(location.href, { headers: { "Accept": "text/html" }, credentials: "same-origin", cache: "no-store" })
      .then(function (r) {
        if (!r.ok) { throw new Error("HTTP " + r.status); }
        return r.text();
      })
      .then(function (text) {
        var doc = new DOMParser().parseFromString(text, "text/html");
        document.querySelectorAll("[data-refresh]").forEach(function (old) {
          var fresh = doc.getElementById(old.id);
          if (!fresh) { return; }
          var open = openDetails(old);
          var node = document.importNode(fresh, true);
          node.querySelectorAll("details").forEach(function (d, i) { d.open = open.indexOf(i) >= 0; });
          old.replaceWith(node);
        });
        var s = doc.getElementById("stamp");
        if (stamp && s) {
          stamp.textContent = s.textContent;
          stamp.classList.remove("stale");
          stamp.title = "refreshed every " + every / 1000 + " s";
        }
      })
      .catch(function (e) {
        if (stamp) {
          stamp.classList.add("stale");
          stamp.title = "refresh failed: " + e.message;
        }
      })
      .finally(function () { busy = false; });
  }

  setInterval(refresh, every);
  document.addEventListener("visibilitychange", refresh);

  // One measurement at a time: the button waits for the answer.
  document.querySelectorAll("form.measure").forEach(function (f) {
    f.addEventListener("submit", function () {
      var b = f.querySelector("button");
      if (b) { b.disabled = true; b.textContent = "Measuring…"; }
    });
  });
})();
