// edgefleet dashboard: live updates without reloads, and actions sent with the CSRF token.
// Every few seconds (the body's data-live, in ms) the page asks the server for its <main>
// again (X-Dashboard-Fragment) and swaps it in when its digest changed, keeping the focus
// and leaving alone a page whose input is being typed in.
(function () {
  "use strict";
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
    var typing = document.activeElement;
    if (typing && main.contains(typing) && typing.tagName === "INPUT") return Promise.resolve();
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
        var digest = r.headers.get("X-Dashboard-Digest");
        if (!r.ok || !digest || digest === main.getAttribute("data-digest")) return null;
        return r.text().then(function (html) {
          return { html: html, digest: digest };
        });
      })
      .then(function (fresh) {
        if (fresh === null) return;
        // Keep the keyboard where it was: refocus the control of the same id or action.
        var active = document.activeElement;
        var key = active && main.contains(active)
          ? (active.id ? "#" + active.id
            : active.getAttribute("data-action")
              ? '[data-action="' + active.getAttribute("data-action") + '"]' : null)
          : null;
        main.innerHTML = fresh.html;
        main.setAttribute("data-digest", fresh.digest);
        main.setAttribute("data-updated", new Date().toISOString());
        bind();
        var again = key ? main.querySelector(key) : null;
        if (again) again.focus();
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
        var result = main.querySelector(".action-result");
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
            return refresh().then(function () {
              var shown = main.querySelector(".action-result");
              if (shown) shown.textContent = text;
            });
          })
          .catch(function () {
            say("the action was not sent: the server does not answer");
          });
      });
    });
  }

  var period = parseInt(document.body.getAttribute("data-live") || "0", 10);
  if (main) bind();
  if (main && period > 0) setInterval(refresh, Math.max(period, 1000));
})();
