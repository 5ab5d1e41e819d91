/* The operators' dashboard: live fragments over /ws/dashboard/, the overview's charts (uPlot),
   a run page's live event log, relative times, and CSRF + confirmation for action forms.
   Pages are complete without it; this only keeps them current. */
(function () {
  "use strict";

  const wsBase = (location.protocol === "https:" ? "wss://" : "ws://") + location.host;
  const statusEl = () => document.getElementById("live-status");

  function setLive(state, text) {
    const el = statusEl();
    if (!el) return;
    el.hidden = false;
    el.dataset.state = state;
    el.textContent = text;
  }

  /* --- relative times: <time datetime=… data-rel> ----------------------------------------- */
  function relative(date) {
    let s = (Date.now() - date.getTime()) / 1000;
    const future = s < 0;
    s = Math.abs(s);
    let text;
    if (s < 1) return "just now";
    if (s < 60) text = Math.round(s) + " s";
    else if (s < 3600) text = Math.round(s / 60) + " min";
    else if (s < 86400) text = Math.round(s / 3600) + " h";
    else text = Math.round(s / 86400) + " d";
    return future ? "in " + text : text + " ago";
  }
  // A time since a start, as the event log's server-side rows show it (`since_start`).
  function offset(seconds) {
    const sign = seconds < 0 ? "-" : "+";
    let s = Math.abs(seconds);
    if (s < 60) return sign + s.toFixed(3) + "s";
    const pad = (n, width) => String(n).padStart(width, "0");
    let m = Math.floor(s / 60);
    s -= m * 60;
    if (m < 60) return sign + m + "m" + pad(s.toFixed(3), 6) + "s";
    const h = Math.floor(m / 60);
    m -= h * 60;
    return sign + h + "h" + pad(m, 2) + "m" + pad(Math.round(s), 2) + "s";
  }
  function exactUtc(date) {
    return date.toISOString().replace("T", " ").replace("Z", " UTC");
  }
  function refreshTimes(root) {
    (root || document).querySelectorAll("time[data-rel]").forEach((el) => {
      el.textContent = relative(new Date(el.getAttribute("datetime")));
    });
  }
  setInterval(refreshTimes, 5000);

  /* --- forms: CSRF token (fragments pushed over the socket have none) and confirmations --- */
  document.addEventListener("submit", (event) => {
    const form = event.target;
    if (form.method.toLowerCase() !== "post") return;
    if (form.dataset.confirm && !window.confirm(form.dataset.confirm)) {
      event.preventDefault();
      return;
    }
    const meta = document.querySelector('meta[name="csrf-token"]');
    let input = form.querySelector('input[name="csrfmiddlewaretoken"]');
    if (!input && meta) {
      input = document.createElement("input");
      input.type = "hidden";
      input.name = "csrfmiddlewaretoken";
      form.appendChild(input);
    }
    if (input && meta && !input.value) input.value = meta.content;
  }, true);

  /* --- charts -------------------------------------------------------------------------------- */
  const WINDOW_S = 3600;
  const store = { t: [], series: {} };
  const charts = {};

  function cssVar(name) {
    return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  }
  const PALETTE = ["--accent", "--ok", "--warn", "--violet", "--bad", "--idle"];
  const LANE_COLOR = { interactive: "--violet", standard: "--accent", batch: "--idle" };

  // What a chart says when the samples of its window have nothing for it.
  const EMPTY_IN_WINDOW = {
    queue_depth: "No messages waited in the broker in this window.",
    backlog: "No steps waited for admission in this window.",
    backlog_tenant: "No tenant had steps waiting for admission in this window.",
    throughput: "No step finished in this window.",
    wait: "No step started in this window.",
  };

  // Which stored series each chart draws: [name, label, colour variable, dashed].
  function chartSeries(chart) {
    const names = Object.keys(store.series).sort();
    const pick = (prefix) => names.filter((n) => n.startsWith(prefix + ":"));
    if (chart === "queue_depth") {
      return pick("queue_depth").map((n, i) => [n, n.split(":")[1], PALETTE[i % PALETTE.length]]);
    }
    if (chart === "backlog_tenant") {
      return pick("backlog_tenant").map((n, i) => [n, n.split(":")[1], PALETTE[i % PALETTE.length]]);
    }
    if (chart === "backlog") {
      return pick("backlog").map((n) => [n, n.split(":")[1], LANE_COLOR[n.split(":")[1]] || "--idle"]);
    }
    if (chart === "throughput") {
      return [
        ["completed_per_min:", "completed", "--ok"],
        ["retries_per_min:", "retries", "--warn"],
        ["failures_per_min:", "failures", "--bad"],
      ].filter((s) => s[0] in store.series);
    }
    if (chart === "wait") {
      const out = [];
      pick("wait_p50").forEach((n) => {
        const lane = n.split(":")[1];
        out.push([n, lane + " p50", LANE_COLOR[lane] || "--idle"]);
        if ("wait_p95:" + lane in store.series) {
          out.push(["wait_p95:" + lane, lane + " p95", LANE_COLOR[lane] || "--idle", true]);
        }
      });
      return out;
    }
    return [];
  }

  // Y-axis labels that fit the axis: compact counts (1.5K, 12K) and, for the queue-wait chart
  // (ms), durations (250ms, 1.5s, 12s, 2m). The axis is as wide as its widest label.
  const COMPACT = new Intl.NumberFormat("en", { notation: "compact", maximumFractionDigits: 1 });
  function compactCount(value) {
    return COMPACT.format(value);
  }
  function compactMs(value) {
    const abs = Math.abs(value);
    if (abs < 1000) return COMPACT.format(value) + "ms";
    if (abs < 60000) return COMPACT.format(value / 1000) + "s";
    if (abs < 3600000) return COMPACT.format(value / 60000) + "m";
    return COMPACT.format(value / 3600000) + "h";
  }
  const measure = document.createElement("canvas").getContext("2d");
  function yAxis(axis, el, format) {
    return {
      ...axis,
      values: (u, splits) => splits.map(format),
      size: (u, values) => {
        measure.font = axis.font;
        const widest = Math.max(0, ...(values || []).map((v) => measure.measureText(v).width));
        // uPlot draws a label after the tick (10 px) and a gap (5 px); 4 px to spare.
        const size = Math.max(30, Math.ceil(widest) + 19);
        if (values) {
          el.dataset.yLabels = values.join("|");
          el.dataset.yAxisSize = String(size);
        }
        return size;
      },
    };
  }

  function merge(samples) {
    if (!samples || !samples.t) return;
    const last = store.t.length ? store.t[store.t.length - 1] : -Infinity;
    const fresh = [];
    samples.t.forEach((t, i) => { if (t > last) fresh.push(i); });
    if (!fresh.length) return;
    const before = store.t.length;
    fresh.forEach((i) => store.t.push(samples.t[i]));
    Object.keys(samples.series).forEach((name) => {
      if (!(name in store.series)) store.series[name] = new Array(before).fill(null);
    });
    Object.keys(store.series).forEach((name) => {
      const incoming = samples.series[name];
      fresh.forEach((i) => store.series[name].push(incoming ? incoming[i] : null));
    });
    const cutoff = Date.now() / 1000 - WINDOW_S;
    let drop = 0;
    while (drop < store.t.length && store.t[drop] < cutoff) drop += 1;
    if (drop) {
      store.t.splice(0, drop);
      Object.values(store.series).forEach((values) => values.splice(0, drop));
    }
  }

  function drawCharts() {
    if (typeof uPlot === "undefined") return;
    document.querySelectorAll("[data-chart]").forEach((el) => {
      const name = el.dataset.chart;
      const series = chartSeries(name);
      const key = series.map((s) => s[0]).join("|");
      // A tenant absent from a sample had no backlog then: zero, not a gap.
      const fill = name === "backlog_tenant" ? (v) => (v === null ? 0 : v) : (v) => v;
      const data = [store.t.slice(), ...series.map((s) => store.series[s[0]].map(fill))];
      el.dataset.points = String(store.t.length);
      if (!store.t.length || !series.length) {
        if (charts[name]) { charts[name].plot.destroy(); delete charts[name]; }
        // Samples without a series of this chart: nothing of it happened in the window (on an
        // idle system steps are admitted as they become ready, so no tenant has a backlog).
        el.innerHTML = store.t.length
          ? '<p class="empty" data-empty="window">' + (EMPTY_IN_WINDOW[name] || "Nothing in this window.") + "</p>"
          : '<p class="empty" data-empty="no-samples">No samples yet: the scheduler samples every few seconds.</p>';
        return;
      }
      if (charts[name] && charts[name].key === key) {
        charts[name].plot.setData(data);
        return;
      }
      if (charts[name]) charts[name].plot.destroy();
      el.innerHTML = "";
      const text = cssVar("--muted");
      const grid = cssVar("--line");
      const axis = { stroke: text, grid: { stroke: grid, width: 1 }, ticks: { stroke: grid },
                     font: "11px system-ui, sans-serif" };
      const clock = (u, splits) => {
        const short = splits.length > 1 && splits[splits.length - 1] - splits[0] < 300;
        const format = short ? { hour: "2-digit", minute: "2-digit", second: "2-digit" }
          : { hour: "2-digit", minute: "2-digit" };
        return splits.map((s) => new Date(s * 1000).toLocaleTimeString([], format));
      };
      const plot = new uPlot({
        width: Math.max(el.clientWidth, 200),
        height: 150,
        scales: { x: { time: true } },
        axes: [{ ...axis, values: clock }, yAxis(axis, el, name === "wait" ? compactMs : compactCount)],
        legend: { live: false },
        cursor: { drag: { x: false, y: false } },
        series: [{}, ...series.map((s) => ({
          label: s[1],
          stroke: cssVar(s[2]),
          width: 1.6,
          dash: s[3] ? [5, 4] : undefined,
          spanGaps: true,
          points: { show: false },
        }))],
      }, data, el);
      charts[name] = { plot, key };
    });
  }

  window.addEventListener("resize", () => {
    Object.entries(charts).forEach(([name, chart]) => {
      const el = document.querySelector(`[data-chart="${name}"]`);
      if (el) chart.plot.setSize({ width: Math.max(el.clientWidth, 200), height: 150 });
    });
  });

  // Colours come from the theme: draw again when the system switches light / dark.
  window.matchMedia("(prefers-color-scheme: dark)").addEventListener("change", () => {
    Object.keys(charts).forEach((name) => { charts[name].plot.destroy(); delete charts[name]; });
    drawCharts();
  });

  /* --- live views: /ws/dashboard/?view=… -------------------------------------------------- */
  function applyParts(html) {
    const template = document.createElement("template");
    template.innerHTML = html;
    template.content.querySelectorAll("[data-part]").forEach((part) => {
      const target = document.getElementById("live-" + part.dataset.part);
      if (target) target.innerHTML = part.innerHTML;
    });
  }

  function connectView(view) {
    let delay = 1000;
    let refreshes = 0;
    function open() {
      const since = store.t.length ? store.t[store.t.length - 1] : 0;
      // The page's own query (the Tenants page's search, sort and page) goes along.
      const params = new URLSearchParams(location.search);
      params.set("view", view);
      params.set("since", String(since));
      const ws = new WebSocket(`${wsBase}/ws/dashboard/?${params}`);
      ws.onopen = () => { delay = 1000; setLive("live", "live"); };
      ws.onmessage = (event) => {
        const frame = JSON.parse(event.data);
        if (frame.type !== "refresh") return;
        refreshes += 1;
        document.body.dataset.liveRefreshes = String(refreshes);
        applyParts(frame.html);
        refreshTimes();
        if (frame.samples) { merge(frame.samples); drawCharts(); }
        setLive("live", "live · " + new Date().toLocaleTimeString());
      };
      ws.onclose = (event) => {
        if (event.code === 4401 || event.code === 4403) { setLive("down", "signed out"); return; }
        setLive("down", "reconnecting…");
        setTimeout(open, delay);
        delay = Math.min(delay * 2, 15000);
      };
    }
    open();
  }

  /* --- a run page: live event log, and the graph / timeline / steps re-read on change ------ */
  function connectRun(page) {
    const runId = page.dataset.runPage;
    const table = document.getElementById("events");
    const body = table.querySelector("tbody");
    let lastSeq = parseInt(table.dataset.lastSeq || "0", 10);
    const started = new Date(table.dataset.started);
    let timer = null;
    let delay = 1000;

    function refreshFragment() {
      clearTimeout(timer);
      timer = setTimeout(async () => {
        const open = new Set([...document.querySelectorAll("details.step[open]")].map((d) => d.dataset.step));
        const chosen = document.getElementById("rerun-step")?.value;
        const response = await fetch(page.dataset.fragmentUrl, { credentials: "same-origin" });
        if (!response.ok) return;
        const live = document.getElementById("run-live");
        live.innerHTML = await response.text();
        live.querySelectorAll("details.step").forEach((d) => { if (open.has(d.dataset.step)) d.open = true; });
        const select = document.getElementById("rerun-step");
        if (select && chosen) select.value = chosen;
        refreshTimes(live);
      }, 250);
    }

    function addEvent(e) {
      if (e.seq <= lastSeq) return;
      lastSeq = e.seq;
      table.dataset.lastSeq = String(lastSeq);
      body.querySelector(".empty-row")?.remove();
      const row = document.createElement("tr");
      row.dataset.seq = e.seq;
      row.className = "fresh";
      const step = e.step ? e.step + (e.map_index !== undefined ? `[${e.map_index}]` : "") : "";
      const data = e.data && Object.keys(e.data).length
        ? JSON.stringify(e.data, null, 1).replace(/\n\s*/g, " ").replace(/^\{ /, "{").replace(/ \}$/, "}")
        : "";
      const cells = [
        [String(e.seq), "num"],
        [null, ""],
        [e.type, ""],
        [step, ""],
        [data.length > 240 ? data.slice(0, 239) + "…" : data, "mono small"],
      ];
      cells.forEach(([text, cls], i) => {
        const td = document.createElement("td");
        if (cls) td.className = cls;
        if (i === 1) {
          const at = new Date(e.at);
          const time = document.createElement("time");
          time.setAttribute("datetime", e.at);
          time.title = exactUtc(at);
          time.textContent = offset((at.getTime() - started.getTime()) / 1000);
          td.className = "num";
          td.appendChild(time);
        } else if (i === 2) {
          const span = document.createElement("span");
          span.className = "ev ev-" + e.type.replace(/[._]/g, "-");
          span.textContent = text;
          td.appendChild(span);
        } else {
          td.textContent = text;
        }
        row.appendChild(td);
      });
      body.appendChild(row);
      document.getElementById("event-count").textContent = body.querySelectorAll("tr[data-seq]").length + " shown";
    }

    function open() {
      const ws = new WebSocket(`${wsBase}/ws/dashboard/runs/${runId}/?after=${lastSeq}`);
      ws.onopen = () => { delay = 1000; setLive("live", "live"); };
      ws.onmessage = (event) => {
        const e = JSON.parse(event.data);
        if (typeof e.seq !== "number") return;
        addEvent(e);
        refreshFragment();
      };
      ws.onclose = (event) => {
        if (event.code === 1000) { setLive("off", "finished"); refreshFragment(); return; }
        if (event.code >= 4400) { setLive("down", event.code === 4404 ? "no such run" : "signed out"); return; }
        setLive("down", "reconnecting…");
        setTimeout(open, delay);
        delay = Math.min(delay * 2, 15000);
      };
    }
    open();
  }

  document.addEventListener("DOMContentLoaded", () => {
    const chartData = document.getElementById("chart-data");
    if (chartData) {
      merge(JSON.parse(chartData.textContent));
      drawCharts();
    }
    const view = document.querySelector("[data-live-view]");
    if (view) connectView(view.dataset.liveView);
    const run = document.querySelector("[data-run-page]");
    if (run) connectRun(run);
    refreshTimes();
  });
})();
