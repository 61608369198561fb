// tally's pages: keeps live numbers fresh. A page whose <body> has data-refresh="N" reloads
// its <main> every N seconds while it is visible and nobody is typing in it. A form's button
// is disabled once pressed (a double click sends one form). No framework, no third-party code.
(function () {
  "use strict";
  document.addEventListener("submit", function (event) {
    var button = event.submitter;
    if (button) { window.setTimeout(function () { button.disabled = true; }, 0); }
  });
  var seconds = Number(document.body.getAttribute("data-refresh"));
  if (!seconds || seconds < 1) { return; }
  function busy(main) {
    var active = document.activeElement;
    return active && main.contains(active) && /^(INPUT|SELECT|TEXTAREA|BUTTON)$/.test(active.tagName);
  }
  var inFlight = false;
  var ended = false;
  function sessionEnded(main) {
    ended = true;
    var note = document.createElement("p");
    note.className = "message error";
    note.setAttribute("role", "alert");
    note.textContent = "This session has ended: the figures below stopped updating. Open the page again to see them fresh.";
    main.insertBefore(note, main.firstChild);
  }
  function refresh() {
    var main = document.getElementById("main");
    if (inFlight || ended || document.visibilityState !== "visible" || !main || busy(main)) { return; }
    inFlight = true;
    // A refresh that hangs is given up after 10 s, so the next one can start.
    var abort = new AbortController();
    var timer = window.setTimeout(function () { abort.abort(); }, 10000);
    fetch(window.location.href, { credentials: "same-origin", redirect: "manual", signal: abort.signal, headers: { "X-Tally-Refresh": "1" } })
      .then(function (response) {
        if (response.status === 401 || response.type === "opaqueredirect") { sessionEnded(main); return null; }
        return response.ok ? response.text() : null;
      })
      .then(function (text) {
        if (!text) { return; }
        var fresh = new DOMParser().parseFromString(text, "text/html").getElementById("main");
        if (fresh && !busy(main)) {
          main.replaceChildren.apply(main, Array.prototype.slice.call(fresh.childNodes));
          main.setAttribute("data-refreshed-at", new Date().toISOString());
        }
      })
      .catch(function () { /* the next tick tries again */ })
      .then(function () { inFlight = false; window.clearTimeout(timer); });
  }
  window.setInterval(refresh, seconds * 1000);
})();
