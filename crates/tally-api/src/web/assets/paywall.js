// tally's paywall. Include once in your web app:
//   <script src="https://tally.example.com/assets/paywall.js"
//           data-upgrade-url="/billing/plans" data-credits-url="/billing/credits" defer></script>
// When a fetch() to your API answers tally's 429 LIMIT_EXCEEDED or 402 INSUFFICIENT_CREDITS
// body (the quota middleware and tally's API send the same one), a dialog names the meter, the
// use and the limit (or the balance and what is needed), with the upgrade or buy-credits link.
// Only answers from the page's own origin count, and those of data-api-origins="https://api.
// example.com …". Other code can open it too: window.tallyPaywall.show(body). Keyboard and screen-reader
// usable: a modal <dialog> with a title and description, focus on the action, Escape closes,
// focus returns where it was. Text only through textContent: nothing from a response is HTML.
(function () {
  "use strict";
  var script = document.currentScript;
  var origin = script ? new URL(script.src, window.location.href).origin : "";
  // Only http(s) links (relative ones resolve to the page's own): never javascript: or data:.
  function link(value) {
    if (!value) { return ""; }
    try {
      var url = new URL(value, window.location.href);
      return url.protocol === "https:" || url.protocol === "http:" ? url.href : "";
    } catch (e) { return ""; }
  }
  var upgradeUrl = link(script && script.getAttribute("data-upgrade-url"));
  var creditsUrl = link(script && script.getAttribute("data-credits-url")) || upgradeUrl;
  // Answers from these origins open the dialog (the page's own, and data-api-origins, space
  // separated): a third party's 429 is not the team's paywall.
  var apiOrigins = [window.location.origin].concat(
    ((script && script.getAttribute("data-api-origins")) || "").split(/\s+/).filter(Boolean)
      .map(function (o) { try { return new URL(o).origin; } catch (e) { return ""; } }));
  var styled = false;
  var open = null;

  function style() {
    if (styled) { return; }
    styled = true;
    var link = document.createElement("link");
    link.rel = "stylesheet";
    link.href = origin + "/assets/paywall.css";
    document.head.appendChild(link);
  }

  function text(value) { return value === null || value === undefined ? "" : String(value); }

  function element(tag, attributes, content) {
    var node = document.createElement(tag);
    Object.keys(attributes || {}).forEach(function (key) { node.setAttribute(key, attributes[key]); });
    if (content !== undefined) { node.textContent = content; }
    return node;
  }

  function show(body) {
    if (!body || (body.code !== "LIMIT_EXCEEDED" && body.code !== "INSUFFICIENT_CREDITS") || open) { return false; }
    style();
    var credits = body.code === "INSUFFICIENT_CREDITS";
    var meter = text(body.metric);
    var dialog = element("dialog", { "class": "tally-paywall", "aria-labelledby": "tally-paywall-title", "aria-describedby": "tally-paywall-detail" });
    dialog.setAttribute("data-code", body.code);
    dialog.appendChild(element("h2", { id: "tally-paywall-title" },
      credits ? "Not enough credits for " + meter : "You have reached your " + meter + " limit"));
    var detail = element("p", { id: "tally-paywall-detail" });
    if (credits) {
      detail.textContent = "Your balance is " + text(body.balance) + " credits; this needs " + text(body.required) + ".";
    } else {
      detail.textContent = "You have used " + text(body.current) + " of " + text(body.limit) + " " + meter + ".";
    }
    dialog.appendChild(detail);
    if (!credits && body.resets_at) {
      dialog.appendChild(element("p", { "class": "tally-paywall-reset" }, "It resets at " + new Date(body.resets_at).toLocaleString() + "."));
    }
    var actions = element("div", { "class": "tally-paywall-actions" });
    var close = element("button", { type: "button" }, "Not now");
    actions.appendChild(close);
    var target = credits ? creditsUrl : upgradeUrl;
    var action = null;
    if (target) {
      action = element("a", { href: target, "class": "tally-paywall-action" }, credits ? "Buy credits" : "Upgrade plan");
      actions.appendChild(action);
    }
    dialog.appendChild(actions);
    var before = document.activeElement;
    close.addEventListener("click", function () { dialog.close(); });
    dialog.addEventListener("close", function () {
      dialog.remove();
      open = null;
      if (before && before.focus) { before.focus(); }
    });
    document.body.appendChild(dialog);
    open = dialog;
    dialog.showModal();
    (action || close).focus();
    return true;
  }

  var original = window.fetch;
  if (original) {
    window.fetch = function () {
      return original.apply(this, arguments).then(function (response) {
        var length = Number(response.headers.get("content-length") || 0);
        var origin = "";
        try { origin = new URL(response.url).origin; } catch (e) { origin = ""; }
        if ((response.status === 429 || response.status === 402) && length <= 16384
            && apiOrigins.indexOf(origin) !== -1) {
          // Only small bodies are parsed (tally's are): a declared length above 16 KiB is not
          // even read.
          response.clone().text().then(function (text) {
            if (text.length <= 16384) { show(JSON.parse(text)); }
          }).catch(function () { /* not tally's body */ });
        }
        return response;
      });
    };
  }
  window.tallyPaywall = { show: show };
})();
