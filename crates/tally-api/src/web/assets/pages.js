// tally's pages: keeps live numbers fresh. A page whose <body> has data-refresh="N" reloads
// its <main> every N seconds while it is visible and nobody is typing in it. No framework, no
// third-party code.
(function () {
  "use strict";
  var seconds = Number(document.body.getAttribute("data-refresh"));
  if (!seconds || seconds < 1) { return; }
  function busy(main) {
    var active = document.activeElement;
    return active && main.contains(active) && /^(INPUT|SELECT|TEXTAREA|BUTTON)$/.test(active.tagName);
  }
  function refresh() {
    var main = document.getElementById("main");
    if (document.visibilityState !== "visible" || !main || busy(main)) { return; }
    fetch(window.location.href, { credentials: "same-origin", headers: { "X-Tally-Refresh": "1" } })
      .then(function (response) { return response.ok ? response.text() : null; })
      .then(function (text) {
        if (!text) { return; }
        var fresh = new DOMParser().parseFromString(text, "text/html").getElementById("main");
        if (fresh && !busy(main)) {
          main.replaceChildren.apply(main, Array.prototype.slice.call(fresh.childNodes));
          main.setAttribute("data-refreshed-at", new Date().toISOString());
        }
      })
      .catch(function () { /* the next tick tries again */ });
  }
  window.setInterval(refresh, seconds * 1000);
})();
