// edgefleet dashboard: live updates without reloads, and actions sent with the CSRF token.
// Every few seconds the page asks the server for its <main> again (X-Dashboard-Fragment)
// and swaps it in when it changed, keeping focus and the text being typed.
(function () {
  "use strict";
  var PERIOD_MS = 3000;
  var main = document.getElementById("main");
  var status = document.getElementById("live-status");
  var csrfMeta = document.querySelector('meta[name="csrf-token"]');
  var csrf = csrfMeta ? csrfMeta.getAttribute("content") : "";
  var busy = false;

  function say(text) {
    if (status) status.textContent = text;
  }

  function refresh() {
    if (busy || document.hidden) return Promise.resolve();
    var active = document.activeElement;
    if (active && main.contains(active) && active.tagName === "INPUT") return Promise.resolve();
    busy = true;
    return fetch(location.href, {
      headers: { "X-Dashboard-Fragment": "1" },
      credentials: "same-origin",
      cache: "no-store",
    })
      .then(function (r) {
        if (r.redirected || r.status === 401) {
          location.assign("/dashboard/login");
          return null;
        }
        return r.ok ? r.text() : null;
      })
      .then(function (html) {
        if (html !== null && html !== main.innerHTML) {
          main.innerHTML = html;
          bind();
          main.setAttribute("data-updated", new Date().toISOString());
        }
      })
      .catch(function () {
        say("live updates paused: the server does not answer");
      })
      .then(function () {
        busy = false;
      });
  }

  function bind() {
    var forms = main.querySelectorAll("form[data-async]");
    Array.prototype.forEach.call(forms, function (form) {
      form.addEventListener("submit", function (event) {
        event.preventDefault();
        var button = event.submitter;
        var action = button ? button.getAttribute("formaction") : form.action;
        var result = form.parentNode.querySelector(".action-result");
        fetch(action, {
          method: "POST",
          credentials: "same-origin",
          headers: { "X-CSRF-Token": csrf },
          body: new FormData(form),
        })
          .then(function (r) {
            return r.json().then(function (body) {
              return { ok: r.ok, body: body };
            });
          })
          .then(function (answer) {
            var text = answer.ok
              ? (button ? button.textContent : "done") + ": rollout is " + answer.body.phase
              : answer.body.error;
            say(text);
            if (result) result.textContent = text;
            return refresh();
          });
      });
    });
  }

  if (main && document.body.hasAttribute("data-live")) {
    bind();
    setInterval(refresh, PERIOD_MS);
  }
})();
