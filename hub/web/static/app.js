// Outpost dashboard: keep the page live without a reload and without inline
// script. Every few seconds, fetch this same URL and swap in its <main>;
// <details> blocks that were open stay open (matched by data-key).
(function () {
  "use strict";
  var main = document.querySelector("main[data-refresh]");
  var status = document.querySelector("[data-live-status]");
  var seconds = main ? Number(main.getAttribute("data-refresh")) : 0;
  if (!main || !(seconds > 0)) { return; }
  var busy = false;

  function say(text, failed) {
    if (!status) { return; }
    status.textContent = text;
    status.classList.toggle("live-failed", Boolean(failed));
  }

  function typing() {
    var el = document.activeElement;
    return el && /^(INPUT|TEXTAREA|SELECT)$/.test(el.tagName) && main.contains(el);
  }

  function refresh() {
    if (busy || document.hidden || typing()) { return; }
    busy = true;
    fetch(window.location.href, { headers: { "Accept": "text/html" }, cache: "no-store", credentials: "same-origin" })
      .then(function (res) {
        // The session ended: go to the login page (it comes back here after).
        if (res.redirected && new URL(res.url).pathname === "/login") { window.location.assign(res.url); return null; }
        if (!res.ok) { throw new Error("HTTP " + res.status); }
        return res.text();
      })
      .then(function (html) {
        if (html === null) { return; }
        var fresh = new DOMParser().parseFromString(html, "text/html").querySelector("main");
        if (!fresh) { throw new Error("no <main> in the page"); }
        var open = {};
        main.querySelectorAll("details[open][data-key]").forEach(function (d) { open[d.getAttribute("data-key")] = true; });
        fresh = document.importNode(fresh, true);
        fresh.querySelectorAll("details[data-key]").forEach(function (d) {
          if (open[d.getAttribute("data-key")]) { d.setAttribute("open", ""); }
        });
        main.replaceWith(fresh);
        main = fresh;
        say("Live · updated " + new Date().toLocaleTimeString(), false);
      })
      .catch(function () { say("Hub unreachable · retrying", true); })
      .finally(function () { busy = false; });
  }

  say("Live", false);
  window.setInterval(refresh, seconds * 1000);
}());
