// The reviewers' inbox: relative times, and live updates over /ws/inbox/.
//
// The socket only says that something changed; the list is then re-read from the server
// (?fragment=1), and it is re-read on every (re)connect too, so the page is always a
// projection of the database and a dropped message costs only latency.
(function () {
  "use strict";

  const root = document.querySelector("[data-inbox]");

  // --- relative times ("5 min", "in 2 h") -------------------------------------------------
  function span(seconds) {
    seconds = Math.max(0, Math.round(seconds));
    if (seconds < 45) return seconds < 10 ? "a few seconds" : seconds + " s";
    const minutes = Math.round(seconds / 60);
    if (minutes < 60) return minutes + " min";
    const hours = Math.floor(minutes / 60);
    if (hours < 24) return hours + " h" + (minutes % 60 && hours < 6 ? " " + (minutes % 60) + " min" : "");
    const days = Math.floor(hours / 24);
    return days + " d" + (hours % 24 && days < 3 ? " " + (hours % 24) + " h" : "");
  }

  function tick() {
    const now = Date.now();
    document.querySelectorAll("time[data-relative]").forEach(function (el) {
      const at = Date.parse(el.getAttribute("datetime"));
      if (Number.isNaN(at)) return;
      const seconds = el.dataset.relative === "until" ? (at - now) / 1000 : (now - at) / 1000;
      el.textContent = span(seconds);
      el.title = new Date(at).toLocaleString();
    });
  }
  tick();
  setInterval(tick, 15000);

  if (!root || !root.dataset.live) return;

  // --- live updates ---------------------------------------------------------------------
  const status = document.getElementById("live-status");
  let retries = 0;
  let pending = null;

  function setStatus(state, text) {
    if (!status) return;
    status.dataset.state = state;
    status.textContent = text;
  }

  function rowIds() {
    return Array.from(document.querySelectorAll("#requests [data-approval]"), (li) => li.dataset.approval);
  }
  const known = new Set(rowIds()); // the rows the reviewer has already seen

  async function resyncList() {
    const response = await fetch(root.dataset.live, {
      credentials: "same-origin",
      headers: { "X-Requested-With": "fetch" },
    });
    if (response.redirected || !response.ok) return; // signed out: the next reload shows why
    document.getElementById("inbox-live").innerHTML = await response.text();
    document.querySelectorAll("#requests [data-approval]").forEach(function (li) {
      if (!known.has(li.dataset.approval)) li.classList.add("fresh"); // a new arrival
      known.add(li.dataset.approval);
    });
    const live = document.querySelector(".inbox-live");
    const count = live ? Number(live.dataset.pending) : 0;
    document.title = (count ? "(" + count + ") " : "") + "Inbox · Switchyard";
    tick();
  }

  function scheduleResync() {
    // Several changes in a burst (a vote, then the decision) cost one read.
    if (pending) clearTimeout(pending);
    pending = setTimeout(function () {
      pending = null;
      resyncList().catch(function () {});
    }, 120);
  }

  function onDetailChange(change) {
    if (change.approval !== root.dataset.approval || change.status === "pending") return;
    const banner = document.getElementById("changed-banner");
    banner.hidden = false;
    banner.innerHTML = "";
    banner.append("This request is now " + change.status + ". ");
    const link = document.createElement("a");
    link.href = window.location.pathname;
    link.textContent = "Reload to see the decision";
    banner.append(link);
    document.querySelectorAll(".decide-form button").forEach((b) => (b.disabled = true));
  }

  function onChange(change) {
    if (root.dataset.inbox === "list") scheduleResync();
    else if (root.dataset.inbox === "detail") onDetailChange(change);
  }

  function connect() {
    const scheme = window.location.protocol === "https:" ? "wss" : "ws";
    const socket = new WebSocket(scheme + "://" + window.location.host + "/ws/inbox/");
    socket.onmessage = function (event) {
      let message;
      try {
        message = JSON.parse(event.data);
      } catch (e) {
        return;
      }
      if (message.type === "hello") {
        retries = 0;
        setStatus("live", "live");
        if (root.dataset.inbox === "list") scheduleResync(); // what changed while away
        return;
      }
      onChange(message);
    };
    socket.onclose = function (event) {
      if (event.code === 4401) {
        setStatus("down", "signed out");
        return;
      }
      setStatus("down", "reconnecting…");
      const delay = Math.min(10000, 500 * Math.pow(2, retries++));
      setTimeout(connect, delay);
    };
  }
  connect();
})();
