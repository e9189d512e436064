// The antorcha dashboard: polls the coordinator's JSON API and draws it. No framework, no build step.
//
// What it fetches is bounded whatever the run's length: /api/status (run and workers) every 2 s,
// /api/series (the round log downsampled to <= 600 points) and /api/timeline (the newest rounds) only
// when a round closes or its eval loss arrives, /api/events (the newest 100) every 5 s.
// data-* attributes (body[data-ready], #round[data-round], charts' data-points) let tests and the
// benchmark read what is shown; body[data-render-ms] is the time from navigation to the first full draw.
"use strict";

const STATUS_EVERY_MS = 2000;
const EVENTS_EVERY_MS = 5000;
const SERIES_POINTS = 600;
const TIMELINE_ROUNDS = 20;

const $ = (id) => document.getElementById(id);
const state = { charts: {}, seriesKey: "", timeline: { rounds: [], workers: [] }, tlIndex: -1, tlFollow: true, drawn: new Set() };

function fmt(x, digits = 4) {
  return x === null || x === undefined || Number.isNaN(x) ? "–" : Number(x).toFixed(digits);
}
// Decimal units (1 MB = 10^6 B), so that chart ticks at round numbers read as round numbers.
function human(n, unit = "B") {
  if (n === null || n === undefined) return "–";
  const units = unit === "B" ? ["B", "kB", "MB", "GB", "TB"] : ["", "k", "M", "G", "T"];
  let i = 0;
  while (Math.abs(n) >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return (i === 0 ? Math.round(n) : n.toFixed(1)) + (unit === "B" ? " " : "") + units[i];
}
function ago(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 60) return seconds.toFixed(1) + " s ago";
  if (seconds < 3600) return Math.round(seconds / 60) + " min ago";
  return (seconds / 3600).toFixed(1) + " h ago";
}
function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text;  // never innerHTML: worker names and reasons come from strangers
  if (cls) td.className = cls;
  return td;
}

async function getJSON(path) {
  const response = await fetch(path, { cache: "no-store" });
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

function markDrawn(part) {
  state.drawn.add(part);
  if (document.body.dataset.ready !== "1" && ["status", "series", "timeline", "events"].every((p) => state.drawn.has(p))) {
    document.body.dataset.renderMs = performance.now().toFixed(1);
    document.body.dataset.ready = "1";
  }
}

// ---- status and workers -------------------------------------------------------------------------

function drawStatus(s) {
  $("run-id").textContent = s.run_id;
  const phase = s.paused && s.phase !== "paused" ? `${s.phase} · pausing` : s.phase;
  $("phase").textContent = phase;
  $("phase").dataset.phase = s.phase;
  $("updated").textContent = "updated " + new Date().toLocaleTimeString();
  $("round").textContent = s.round;
  $("round").dataset.round = s.round;
  $("round-sub").textContent = (s.max_rounds ? `of ${s.max_rounds} · ` : "") + `${s.rounds_total} recorded`;
  $("active-workers").textContent = s.active_workers;
  $("workers-sub").textContent = `${s.workers.length} seen · epoch ${s.epoch} (${s.shards_trained}/${s.num_data_shards} shards)`;
  $("train-loss").textContent = fmt(s.train_loss);
  $("eval-loss").textContent = fmt(s.eval_loss);
  $("eval-sub").textContent = s.initial_eval_loss !== null ? `from ${fmt(s.initial_eval_loss)} at start` : "";
  $("tokens-per-second").textContent = human(s.tokens_per_second, "");
  $("tokens-sub").textContent = `${human(s.tokens, "")} tokens trained`;
  $("data-bytes").textContent = human(s.data_plane_bytes);
  $("bytes-sub").textContent = `data plane · control ${human(s.control_plane_bytes)} · state ${human(s.state_bytes)}`;
  $("consistent").textContent = s.replicas_consistent ? "consistent" : "DIFFER";
  $("consistent").style.color = s.replicas_consistent ? "var(--ok)" : "var(--bad)";
  $("events-sub").textContent =
    `${s.joins} joins · ${s.leaves} leaves · ${s.crashes} crashes · ${s.evictions} evicted · ` +
    `${s.resyncs} resyncs · ${s.rejected_requests} refused`;
  drawWorkers(s.workers);
}

function drawWorkers(workers) {
  const body = $("workers").tBodies[0];
  const rows = document.createDocumentFragment();
  const order = { training: 0, averaging: 0, waiting: 0, lost: 1, left: 2, evicted: 3 };
  const sorted = [...workers].sort((a, b) => (order[a.state] ?? 1) - (order[b.state] ?? 1) || a.name.localeCompare(b.name));
  for (const w of sorted) {
    const tr = document.createElement("tr");
    tr.dataset.workerId = w.worker_id;
    tr.dataset.name = w.name;
    const active = ["training", "averaging", "waiting"].includes(w.state);
    tr.append(
      cell(w.worker_id),
      cell(w.name),
      cell(`${w.device.kind}${w.device.name ? " · " + w.device.name : ""}`),
      cell(w.state + (w.detail ? ` (${w.detail})` : ""), "state-" + w.state),
      cell(active ? `${w.round} · ${w.inner_step}` : "–"),
      cell(active ? human(w.tokens_per_second, "") : "–", "num"),
      cell(fmt(w.loss, 3), "num"),
      cell(ago(w.seconds_since_heartbeat), "num"),
      cell(w.rounds_contributed, "num"),
      cell(human(w.tokens, ""), "num"),
    );
    rows.append(tr);
  }
  body.replaceChildren(rows);
  $("workers-count").textContent = `${workers.length}`;
}

// ---- charts (uPlot) -----------------------------------------------------------------------------

const ROUND_STEPS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000];

function makeChart(id, series, yFormat, fromZero) {
  const el = $(id);
  const grid = { stroke: "rgba(128,128,128,0.15)" };
  const opts = {
    width: Math.max(200, el.clientWidth),
    height: el.clientHeight - 30,
    legend: { show: true, live: false },
    cursor: { drag: { x: true, y: false } },
    scales: {
      x: { time: false },
      y: fromZero ? { range: (u, min, max) => [0, max > 0 ? max * 1.1 : 1] } : {},
    },
    axes: [
      { label: "round", stroke: "#888", grid, incrs: ROUND_STEPS },  // rounds are whole numbers
      { stroke: "#888", grid, size: 64, values: yFormat ? (u, vals) => vals.map(yFormat) : undefined },
    ],
    series: [{ label: "round" }, ...series.map((s) => ({ spanGaps: true, width: 2, points: { size: 4 }, ...s }))],
  };
  const chart = new uPlot(opts, [[], ...series.map(() => [])], el);
  new ResizeObserver(() => chart.setSize({ width: Math.max(200, el.clientWidth), height: el.clientHeight - 30 })).observe(el);
  return chart;
}

function drawSeries(d) {
  if (!state.charts.loss) {
    state.charts.loss = makeChart("loss-chart", [
      { label: "train", stroke: "#d9480f" },
      { label: "eval", stroke: "#2f6fde" },
    ]);
    state.charts.tps = makeChart("tps-chart", [{ label: "tokens/s", stroke: "#2b8a3e", fill: "rgba(43,138,62,0.08)" }], (v) => human(v, ""), true);
    state.charts.bytes = makeChart("bytes-chart", [{ label: "bytes", stroke: "#7048e8", fill: "rgba(112,72,232,0.08)" }], (v) => human(v), true);
  }
  state.charts.loss.setData([d.round, d.train_loss, d.eval_loss]);
  state.charts.tps.setData([d.round, d.tokens_per_second]);
  state.charts.bytes.setData([d.round, d.data_plane_bytes]);
  const points = d.round.length;
  $("loss-chart").dataset.points = points;
  $("loss-chart").dataset.evalPoints = d.eval_loss.filter((v) => v !== null).length;
  $("tps-chart").dataset.points = points;
  $("bytes-chart").dataset.points = points;
  $("loss-note").textContent = d.stride > 1 ? `(${d.rounds_total} rounds, each point the mean of ${d.stride})` : "";
}

// ---- round timeline -----------------------------------------------------------------------------

function drawTimeline() {
  const { rounds, workers } = state.timeline;
  const el = $("timeline");
  if (!rounds.length) {
    el.textContent = "no round closed yet";
    $("tl-round").textContent = "–";
    el.dataset.workers = 0;
    return;
  }
  if (state.tlFollow || state.tlIndex < 0 || state.tlIndex >= rounds.length) state.tlIndex = rounds.length - 1;
  const r = rounds[state.tlIndex];
  $("tl-round").textContent = `round ${r.round} · ${fmt(r.seconds, 1)} s`;
  const members = workers.map((w, i) => ({ ...w, compute: r.compute[i], avg: r.averaging[i] })).filter((w) => w.compute !== null);
  el.dataset.round = r.round;
  el.dataset.workers = members.length;
  const total = Math.max(r.seconds || 0, ...members.map((w) => (w.compute || 0) + (w.avg || 0)), 1e-9);
  const rows = document.createDocumentFragment();
  for (const w of members) {
    const row = document.createElement("div");
    row.className = "tl-row";
    const name = document.createElement("div");
    name.className = "tl-name";
    name.textContent = w.name;
    name.title = w.worker_id;
    const bar = document.createElement("div");
    bar.className = "tl-bar";
    for (const [cls, secs] of [["compute", w.compute], ["avg", w.avg]]) {
      const part = document.createElement("div");
      part.className = cls;
      part.style.width = `${(100 * (secs || 0)) / total}%`;
      bar.append(part);
    }
    const secs = document.createElement("div");
    secs.className = "tl-secs";
    secs.textContent = `${fmt(w.compute, 1)} s + ${fmt(w.avg, 1)} s`;
    row.append(name, bar, secs);
    rows.append(row);
  }
  el.replaceChildren(rows);
}

$("tl-prev").onclick = () => { state.tlFollow = false; state.tlIndex = Math.max(0, state.tlIndex - 1); drawTimeline(); };
$("tl-next").onclick = () => {
  const last = state.timeline.rounds.length - 1;
  state.tlIndex = Math.min(last, state.tlIndex + 1);
  state.tlFollow = state.tlIndex === last;
  drawTimeline();
};

// ---- events -------------------------------------------------------------------------------------

function drawEvents(d) {
  const rows = document.createDocumentFragment();
  for (const e of d.events) {
    const tr = document.createElement("tr");
    tr.dataset.kind = e.kind;
    tr.append(
      cell(new Date(e.at * 1000).toLocaleTimeString()),
      cell(e.kind + (e.count > 1 ? ` ×${e.count}` : "")),
      cell(e.worker_id),
      cell(e.round ?? "", "num"),
      cell(e.detail, "detail"),
    );
    rows.append(tr);
  }
  $("events").tBodies[0].replaceChildren(rows);
}

// ---- polling ------------------------------------------------------------------------------------

function showError(err) {
  const el = $("error");
  if (err) { el.textContent = `cannot reach the coordinator: ${err.message}`; el.hidden = false; }
  else el.hidden = true;
}

async function pollStatus() {
  try {
    const s = await getJSON("api/status");
    showError(null);
    drawStatus(s);
    markDrawn("status");
    // Charts and timeline change only when a round closes or its eval loss arrives.
    const key = `${s.rounds_total}:${s.eval_loss}:${s.round}`;
    if (key !== state.seriesKey) {
      const [series, timeline] = await Promise.all([
        getJSON(`api/series?points=${SERIES_POINTS}`),
        getJSON(`api/timeline?rounds=${TIMELINE_ROUNDS}`),
      ]);
      state.seriesKey = key;
      drawSeries(series);
      markDrawn("series");
      state.timeline = timeline;
      drawTimeline();
      markDrawn("timeline");
    }
  } catch (err) {
    showError(err);
  }
  setTimeout(pollStatus, STATUS_EVERY_MS);
}

async function pollEvents() {
  try {
    drawEvents(await getJSON("api/events?limit=100"));
    markDrawn("events");
  } catch (err) {
    showError(err);
  }
  setTimeout(pollEvents, EVENTS_EVERY_MS);
}

pollStatus();
pollEvents();
