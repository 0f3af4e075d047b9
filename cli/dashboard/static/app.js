// The realm dashboard: one page, three hash routes (#/, #/job/<id>, #/campaign/<hero>/<name>),
// live from the server-sent /api/events stream (polling /api/status every 2 s when that fails).
// Vanilla JS, nothing fetched from elsewhere. Every string from the API reaches the page as a
// text node or an attribute value, never as markup: job names and errors can hold hostile HTML.
"use strict";

const params = new URLSearchParams(location.search);
let token = params.get("token");
// ?poll: no event stream, poll instead (a proxy that buffers streams; a headless screenshot,
// whose virtual clock stands still while any request, such as a stream, is open).
const POLL_ONLY = params.has("poll");
const state = { status: null, queue: null, campaigns: null, job: null, campaign: null, rendered: "" };
const SVG_NS = "http://www.w3.org/2000/svg";

// --- DOM and formatting helpers -------------------------------------------------------------

function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  setAttrs(el, attrs);
  for (const kid of kids.flat(Infinity)) {
    if (kid != null && kid !== false) el.append(kid instanceof Node ? kid : String(kid));
  }
  return el;
}

function svg(tag, attrs, ...kids) {
  const el = document.createElementNS(SVG_NS, tag);
  setAttrs(el, attrs);
  for (const kid of kids) el.append(kid instanceof Node ? kid : String(kid));
  return el;
}

function setAttrs(el, attrs) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value == null || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value);
  }
}

const dash = "–";
const isNum = (v) => typeof v === "number" && Number.isFinite(v);
const num = (v, digits = 0) => isNum(v) ? v.toLocaleString("en-US",
  { minimumFractionDigits: digits, maximumFractionDigits: digits }) : dash;
const loss = (v) => isNum(v) ? v.toFixed(4) : (v == null ? dash : String(v));
const sci = (v) => isNum(v) ? v.toExponential(2) : dash;

function duration(seconds) {
  if (!isNum(seconds)) return dash;
  const s = Math.round(seconds);
  if (s >= 3600) return `${Math.floor(s / 3600)}h ${String(Math.floor(s % 3600 / 60)).padStart(2, "0")}m`;
  if (s >= 60) return `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, "0")}s`;
  return `${s}s`;
}

function ago(stamp) {
  if (!stamp) return dash;
  const seconds = (Date.now() - Date.parse(stamp)) / 1000;
  return Number.isNaN(seconds) ? String(stamp) : duration(Math.max(0, seconds)) + " ago";
}

const when = (stamp) => h("span", { title: stamp || "" }, ago(stamp));
const tag = (text, kind) => h("span", { class: `tag tag-${kind || text}` }, text);
const jobLink = (id) => id ? h("a", { class: "mono", href: `#/job/${encodeURIComponent(id)}` }, id)
  : h("span", { class: "dim" }, "not adopted");
const campaignLink = (ref) => ref ? h("a", { href: `#/campaign/${ref.split("/").map(encodeURIComponent).join("/")}` }, ref) : dash;
const dataset = (name) => h("span", { class: "dataset", title: name }, name);
const steps = (a, b) => a == null && b == null ? dash : h("span", { class: "mono" }, `${a ?? "?"} → ${b ?? "?"}`);
const card = (title, ...body) => h("section", { class: "card" }, h("h2", null, title), ...body);
const empty = (text) => h("p", { class: "dim empty" }, text);

// A table from [header, cell(row), class] columns; cells return strings or nodes.
function table(columns, rows, emptyText) {
  if (!rows || !rows.length) return empty(emptyText || "none");
  return h("table", null,
    h("thead", null, h("tr", null, columns.map(([head, , cls]) => h("th", { class: cls }, head)))),
    h("tbody", null, rows.map((row) => h("tr", { class: row._class },
      columns.map(([, cell, cls]) => h("td", { class: cls }, cell(row)))))));
}

// Facts as a compact two-column grid: [[label, value], ...]; null values are left out.
const facts = (pairs) => h("dl", { class: "facts" },
  pairs.filter(([, v]) => v != null && v !== "").map(([k, v]) => h("div", null, h("dt", null, k), h("dd", null, v))));

// --- server access --------------------------------------------------------------------------

async function call(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (token) headers.Authorization = `Bearer ${token}`;
  const res = await fetch(path, { ...options, headers, cache: "no-store" });
  const text = await res.text();
  let body;
  try { body = JSON.parse(text); } catch (err) { body = { error: text.slice(0, 300) || res.statusText }; }
  return { status: res.status, ok: res.ok, body };
}

async function getJSON(path) {
  const { ok, status, body } = await call(path);
  if (!ok) throw new Error(body.error || `HTTP ${status} for ${path}`);
  return body;
}

function flash(text, good) {
  const el = document.getElementById("flash");
  el.textContent = text;
  el.className = `flash ${good ? "good" : "bad"}`;
  el.hidden = false;
  clearTimeout(flash.timer);
  el.onclick = () => { el.hidden = true; };
  flash.timer = setTimeout(() => { el.hidden = true; }, 12000);
}

// Cancel or retry: ask for a reason (cancelling the dialog aborts), then the token if none.
async function act(verb, id) {
  const reason = prompt(`${verb} job ${id}?\nReason (optional):`, "");
  if (reason === null) return;
  if (!token) token = prompt("The dashboard's token (realm serve --token-file, or $REALM_SERVE_TOKEN):");
  if (!token) return;
  const path = `api/jobs/${encodeURIComponent(id)}/${verb}`;
  try {
    const { status, body } = await call(path, { method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(reason ? { reason } : {}) });
    if (status === 401) token = null;  // wrong token: ask again next time
    flash(body.ok ? (body.message || `${verb}: done`) : `${verb} refused (${status}): ${body.error || "?"}`, body.ok);
  } catch (err) {
    flash(`${verb} failed: ${err.message}`, false);
  }
  refresh(true);
}

const button = (verb, id) => h("button", { class: `btn btn-${verb}`, onclick: () => act(verb, id) }, verb);
const actionFor = (job) => !job.id ? null
  : ["queued", "processing"].includes(job.status) ? button("cancel", job.id)
  : ["failed", "cancelled", "skipped"].includes(job.status) ? button("retry", job.id) : null;

// --- live updates ---------------------------------------------------------------------------

function setConn(mode, detail) {
  const el = document.getElementById("conn");
  el.textContent = mode;
  el.className = `conn conn-${mode}`;
  el.title = detail || "";
}

function connect() {
  const es = new EventSource("api/events" + (token ? `?token=${encodeURIComponent(token)}` : ""));
  es.addEventListener("status", (event) => { setConn("live"); onStatus(JSON.parse(event.data)); });
  es.onerror = () => { es.close(); poll(); };
}

let polling = false;
async function poll() {
  if (polling) return;
  polling = true;
  await pollOnce();
  polling = false;
  setTimeout(poll, 2000);
}

async function pollOnce() {
  try {
    onStatus(await getJSON("api/status"));
    setConn("polling", POLL_ONLY ? "?poll: polling /api/status every 2 s"
      : "server-sent events failed; polling /api/status every 2 s");
  } catch (err) {
    setConn("offline", err.message);
  }
}

let fetching = false;
async function onStatus(status) {
  const finished = state.status && (state.status.counts.completed !== status.counts.completed);
  state.status = status;
  if (fetching) return;  // the previous refresh is still out: skip this beat, not queue up
  fetching = true;
  try { await refresh(finished); } catch (err) { flash(err.message, false); }
  fetching = false;
}

// Fetch what the current route shows beyond /api/status, then render. The queue comes with
// every status beat; the rest again only when forced (a job finished, an action) or still moving.
async function refresh(force) {
  const route = parseRoute();
  if (route.name === "overview") {
    if (!state.status) state.status = await getJSON("api/status");
    const wanted = [getJSON("api/queue?state=queued")];
    if (force || !state.campaigns) wanted.push(getJSON("api/campaigns"));
    const [queue, campaigns] = await Promise.all(wanted);
    state.queue = queue;
    if (campaigns) state.campaigns = campaigns;
  } else if (route.name === "job") {
    const job = state.job && state.job.job;
    if (force || !job || job.id !== route.id || job.status === "processing") {
      state.job = await getJSON(`api/jobs/${encodeURIComponent(route.id)}`);
    }
  } else if (force || !state.campaign || state.campaign.campaign.ref !== route.ref) {
    state.campaign = await getJSON(`api/campaigns/${route.ref.split("/").map(encodeURIComponent).join("/")}`);
  }
  render(route);
}

function parseRoute() {
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  if (parts[0] === "job" && parts[1]) return { name: "job", id: parts[1] };
  if (parts[0] === "campaign" && parts[2]) return { name: "campaign", ref: `${parts[1]}/${parts[2]}` };
  return { name: "overview" };
}

// Render only when the data changed: a rebuild every second would drop text selections.
function render(route) {
  const key = JSON.stringify([route, state.status, state.queue, state.campaigns, state.job, state.campaign]);
  if (key === state.rendered) return;
  state.rendered = key;
  if (state.status) document.getElementById("realm-path").textContent = state.status.realm;
  const view = route.name === "job" ? jobView(state.job)
    : route.name === "campaign" ? campaignView(state.campaign) : overview();
  document.getElementById("view").replaceChildren(...view.filter(Boolean));
  for (const log of document.querySelectorAll(".log")) log.scrollTop = log.scrollHeight;
}

async function navigate() {
  const route = parseRoute();
  state.job = state.campaign = null;
  window.scrollTo(0, 0);
  try {
    await refresh(true);
  } catch (err) {
    state.rendered = "";
    document.getElementById("view").replaceChildren(back(), h("div", { class: "alert" }, err.message));
  }
}

// --- the loss chart -------------------------------------------------------------------------

// points: [[step, loss], ...]; boundaries: steps drawn as dashed lines; rollbacks: {step, ...}.
// width: about the pixels it gets, so that its text keeps the page's size.
function lossChart(points, { boundaries = [], rollbacks = [], width = 820, height = 190,
  none = "no loss curve yet" } = {}) {
  const finite = points.filter(([, y]) => isNum(y));
  if (finite.length < 2) return empty(none);
  const W = width, H = height, m = { l: 46, r: 10, t: 8, b: 20 };
  const xs = finite.map(([x]) => x), ys = finite.map(([, y]) => y);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  const pad = (y1 - y0) * 0.06 || 0.5;
  [y0, y1] = [y0 - pad, y1 + pad];
  const X = (x) => m.l + (x - x0) / ((x1 - x0) || 1) * (W - m.l - m.r);
  const Y = (y) => m.t + (1 - (y - y0) / (y1 - y0)) * (H - m.t - m.b);
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img" });
  for (const t of ticks(y0, y1, 4)) {
    root.append(svg("line", { x1: m.l, x2: W - m.r, y1: Y(t), y2: Y(t), class: "grid" }),
      svg("text", { x: m.l - 5, y: Y(t) + 3, class: "axis", "text-anchor": "end" }, +t.toFixed(3)));
  }
  for (const t of ticks(x0, x1, 6).filter((t) => Number.isInteger(t))) {
    root.append(svg("text", { x: X(t), y: H - 5, class: "axis", "text-anchor": "middle" }, t));
  }
  for (const b of boundaries.filter((b) => b > x0 && b < x1)) {
    root.append(svg("line", { x1: X(b), x2: X(b), y1: m.t, y2: H - m.b, class: "boundary" }));
  }
  const d = finite.map(([x, y], i) => `${i ? "L" : "M"}${X(x).toFixed(1)},${Y(y).toFixed(1)}`).join("");
  root.append(svg("path", { d, class: "curve" }));
  for (const r of rollbacks.filter((r) => r.step >= x0 && r.step <= x1)) {
    root.append(rollbackMark(r, finite, X, Y, [m.t, H - m.b, y1]));
  }
  return root;
}

// A red line and dot at a rollback's step: at its loss when that is on the chart (a NaN or a
// spike is not), else on the curve at the nearest step.
function rollbackMark(r, points, X, Y, [top, bottom, yMax]) {
  const near = points.reduce((a, p) => Math.abs(p[0] - r.step) < Math.abs(a[0] - r.step) ? p : a);
  const y = isNum(r.loss) && r.loss <= yMax ? r.loss : near[1];
  return svg("g", { class: "rollback" },
    svg("line", { x1: X(r.step), x2: X(r.step), y1: top, y2: bottom }),
    svg("circle", { cx: X(r.step), cy: Y(y), r: 4 }),
    svg("title", null, `rollback at step ${r.step}: ${r.reason}, lr → ${sci(r.new_lr)}`));
}

function ticks(lo, hi, count) {
  const raw = (hi - lo) / count || 1;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((f) => f * mag).find((s) => s >= raw);
  const out = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + 1e-9; t += step) out.push(+t.toFixed(10));
  return out;
}

const rollbackList = (events) => !events || !events.length ? null : h("ol", { class: "rollbacks" },
  events.map((e) => h("li", null, tag(e.reason, "bad"), ` at step `, h("b", { class: "mono" }, e.step),
    isNum(e.loss) ? ` (loss ${loss(e.loss)}${isNum(e.threshold) ? ` > ${loss(e.threshold)}` : ""})` : "",
    `: back to step ${e.snapshot_step ?? "?"}`,
    e.batches_skipped ? `, ${e.batches_skipped} batches skipped` : "",
    `, lr → ${sci(e.new_lr)}`)));

// --- overview -------------------------------------------------------------------------------

function overview() {
  const s = state.status;
  if (!s) return [empty("waiting for the first status…")];
  return [
    s.paused ? h("div", { class: "alert" }, "Paused: no job is claimed until `realm daemon resume`. ",
      h("span", { class: "mono" }, JSON.stringify(s.paused))) : null,
    problemsBox(s.problems),
    countsStrip(s),
    h("div", { class: "columns" },
      h("div", { class: "main-col" }, card("Running", s.in_progress.length ? s.in_progress.map(runningJob)
        : empty("no job is training"))),
      h("div", { class: "side-col" }, daemonsCard(s.daemons), queueCard(), campaignsCard())),
    recentCard("Recently completed", s.recent_completed, false),
    recentCard("Recently failed", s.recent_failed, true),
  ].filter(Boolean);
}

const problemsBox = (problems) => problems && problems.length ? h("div", { class: "alert warn" },
  h("b", null, `${problems.length} problem${problems.length > 1 ? "s" : ""} in the queue`),
  h("ul", null, problems.map((p) => h("li", null, h("span", { class: "mono" }, p.path), " ",
    p.problem.startsWith(p.path) ? p.problem.slice(p.path.length).replace(/^[:\s]+/, "") : p.problem)))) : null;

function countsStrip(s) {
  const q = s.queued_by_priority, c = s.counts;
  const extra = [s.waiting_for_adoption && `${s.waiting_for_adoption} settling`, s.held && `${s.held} held`];
  const tile = (name, value, sub) => h("div", { class: `count count-${name}` },
    h("div", { class: "count-n" }, num(value)), h("div", { class: "count-label" }, name),
    sub ? h("div", { class: "count-sub" }, sub) : null);
  return h("div", { class: "counts" },
    tile("queued", c.queued, [`high ${q.high} · normal ${q.normal} · low ${q.low}`, ...extra].filter(Boolean).join(" · ")),
    ["processing", "completed", "failed", "skipped", "cancelled"].map((k) => tile(k, c[k])));
}

function runningJob(job) {
  const p = job.progress;
  return h("div", { class: "running" },
    h("div", { class: "running-head" }, jobLink(job.id), dataset(job.dataset),
      tag(job.priority), job.worker ? h("span", { class: "dim mono" }, `${job.worker.host}:${job.worker.pid}`) : null,
      h("span", { class: "spacer" }), actionFor(job)),
    p ? progressBlock(p) : empty(`starting: no progress reported yet (heartbeat ${ago(job.heartbeat_at)})`));
}

function progressBlock(p) {
  const m = p.metrics || {};
  const pct = p.total_steps ? Math.min(100, 100 * p.job_step / p.total_steps) : 0;
  return [
    facts([["step", h("span", { class: "mono" }, `${num(p.job_step)} / ${num(p.total_steps)}`,
      h("span", { class: "dim" }, ` (global ${num(p.step)})`))],
      ["loss", h("span", { class: "mono big" }, loss(m.loss))], ["loss ewma", loss(m.loss_ewma)],
      ["eval loss", p.eval ? `${loss(p.eval.eval_loss)} @ ${p.eval.step}` : null],
      ["tokens/s", num(m.tokens_per_sec)], ["ETA", duration(p.eta_seconds)],
      ["lr", sci(m.lr)], ["grad norm", num(m.grad_norm, 3)],
      ["step time", isNum(m.step_latency_ms) ? `${num(m.step_latency_ms)} ms` : null],
      ["processes", p.world_size > 1 ? `${p.parallelism} x${p.world_size}` +
        (p.nodes > 1 ? ` on ${p.nodes} nodes` : "") : null],
      ["state", p.state !== "training" ? p.state : null], ["updated", when(p.updated_at)]]),
    h("div", { class: "bar", title: `${pct.toFixed(1)}%` }, h("div", { style: `width:${pct.toFixed(1)}%` })),
    lossChart(p.curve || [], { rollbacks: p.rollbacks || [] }),
    rollbackList(p.rollbacks),
  ];
}

const daemonsCard = (daemons) => card("Daemons", table([
  ["daemon", (d) => h("span", { class: "mono" }, `${d.host}:${d.pid}`)],
  ["devices", (d) => d.devices, "mono"],
  ["role", (d) => d.role === "member" ? (d.node != null ? `member, node ${d.node + 1}` : "member")
    : d.nodes > 1 ? `claims for ${d.nodes} nodes` : ""],
  ["state", (d) => tag(d.state, d.state === "gone" ? "bad" : d.state)],
  ["doing", (d) => d.reason || (d.job_id ? jobLink(d.job_id) : "")],
  ["updated", (d) => when(d.updated_at)],
], daemons, "no daemon has run in this realm"));

function queueCard() {
  const jobs = state.queue ? state.queue.jobs : [];
  jobs.forEach((j) => { j._class = j.held ? "held" : ""; });
  return card("Queue (claim order)", table([
    ["#", (j) => j.position, "num"],
    ["job", (j) => [jobLink(j.id), h("div", null, dataset(j.dataset))]],
    ["prio", (j) => tag(j.priority)],
    ["status", (j) => j.held ? h("span", { title: j.held.reason || "" }, tag("held", "warn")) : j.status],
    ["", (j) => actionFor(j), "act"],
  ], jobs, "the queue is empty"));
}

const campaignsCard = () => card("Campaigns", table([
  ["campaign", (c) => [campaignLink(c.ref), c.active ? tag("active", "good") : null,
    c.description ? h("div", { class: "dim" }, c.description) : null]],
  ["jobs", (c) => num(c.jobs), "num"],
  ["head", (c) => c.head_step ?? dash, "num"],
  ["ckpts", (c) => num(c.checkpoints), "num"],
], state.campaigns ? state.campaigns.campaigns : [], "no campaign yet"));

const recentCard = (title, rows, failed) => card(title, table([
  ["job", (j) => jobLink(j.id)], ["dataset", (j) => dataset(j.dataset)], ["prio", (j) => tag(j.priority)],
  ["steps", (j) => steps(j.start_step, j.final_step)], ["final loss", (j) => loss(j.final_loss), "num"],
  ["campaign", (j) => campaignLink(j.campaign)], ["finished", (j) => when(j.finished_at)],
  failed ? ["error", (j) => h("span", { class: "error-text" }, j.last_error || ""), "wide"] : null,
  ["", (j) => actionFor(j), "act"],
].filter(Boolean), rows, failed ? "no failures" : "nothing finished yet"));

// --- one job --------------------------------------------------------------------------------

const back = () => h("a", { class: "back", href: "#/" }, "← overview");

function jobView(data) {
  if (!data) return [back(), empty("loading…")];
  const { job, progress, config } = data;
  const gov = job.governor || {};
  return [
    back(),
    h("h1", null, h("span", { class: "mono" }, job.id), tag(job.status), actionFor(job)),
    job.last_error ? h("div", { class: "alert" }, h("b", null, `${job.status === "failed" ? "Failed" : "Last error"}: `),
      h("span", { class: "error-text" }, job.last_error)) : null,
    h("div", { class: "columns" },
      h("div", { class: "main-col" },
        progress ? card("Progress", progressBlock(progress)) : card("Loss", recordCurve(job)),
        card("Governor", facts([["rollbacks", num(gov.rollbacks)],
          ["panics", gov.panics ? Object.entries(gov.panics).map(([k, v]) => `${k} ${v}`).join(" · ") : null],
          ["batches skipped", gov.batches_skipped], ["snapshots", gov.snapshot_mode]]),
          progress ? null : rollbackList(gov.events), gov.enabled === false ? empty("governor off") : null),
        card("Log tail", h("div", { class: "dim mono small" }, data.log_path || ""),
          h("pre", { class: "log" }, (data.log_tail || []).map(logLine)))),
      h("div", { class: "side-col" }, card("Record", jobFacts(job, data.campaign)),
        card("History", table([["at", (r) => when(r.at)], ["from → to", (r) => `${r.from || "new"} → ${r.to}`],
          ["reason", (r) => r.reason, "wide"]], job.history, "no history"))),
    ),
    card("Resolved config", configTable(config)),
  ];
}

function jobFacts(job, campaign) {
  const meta = job.metadata || {};
  const resolved = job.resolved_config || {};
  return facts([
    ["dataset", job.dataset_name || job.dataset_path], ["path", h("span", { class: "mono small" }, job.dataset_path)],
    ["priority", tag(job.priority)], ["attempts", job.attempts],
    ["hero", resolved.hero || job.hero_id], ["campaign", campaignLink(campaign || resolved.campaign || job.campaign_id)],
    ["examples", num(job.num_examples)], ["created", when(job.created_at)],
    ["started", when(job.started_at)], ["finished", when(job.finished_at)],
    ["steps", steps(job.start_step, job.final_step)], ["final loss", loss(job.final_loss)],
    ["val loss", job.final_val_loss != null ? loss(job.final_val_loss) : null],
    ["tokens/s avg", job.tokens_per_sec_avg != null ? num(job.tokens_per_sec_avg) : null],
    ["checkpoint", meta.checkpoint ? h("span", { class: "mono small" }, meta.checkpoint) : null],
    ["config hash", h("span", { class: "mono small" }, (job.config_hash || "").slice(0, 19))],
    ["code", job.git_commit],
    ["held", job.held ? `yes: ${job.held.reason || ""}` : null],
  ]);
}

// The record keeps a downsampled curve (means of equal chunks) spread over start..final step.
function recordCurve(job) {
  const values = ((job.metadata || {}).data || {}).loss_curve || [];
  const a = job.start_step || 0, b = job.final_step ?? a + values.length;
  const points = values.map((v, i) => [a + (i + 1) * (b - a) / values.length, v]);
  return lossChart(points, { rollbacks: (job.governor || {}).events || [], none: "no loss curve recorded" });
}

function configTable(config) {
  if (!config) return empty("no config");
  if (config.error) return h("div", { class: "alert" }, config.error);
  return [
    facts([["hero", config.hero], ["campaign", campaignLink(config.campaign)],
      ["hash", h("span", { class: "mono small" }, config.config_hash)],
      ["recorded", config.recorded ? "as recorded with the job" : "resolved now (the job kept none)"]]),
    table([["key", (r) => r.key, "mono"], ["value", (r) => JSON.stringify(r.value), "mono wide"],
      ["layer", (r) => tag(r.layer, `layer-${r.layer}`)], ["source", (r) => r.source, "mono dim small"]],
    config.rows, "no rows"),
  ];
}

// A structlog JSON line reads as "time level event k=v …"; anything else is shown as is.
function logLine(line) {
  let rec;
  try { rec = JSON.parse(line); } catch (err) { return line + "\n"; }
  if (!rec || typeof rec !== "object" || !rec.event) return line + "\n";
  const { timestamp, level, event, job_id, ...rest } = rec;
  const kv = Object.entries(rest).map(([k, v]) => `${k}=${typeof v === "string" ? v : JSON.stringify(v)}`);
  return h("span", { class: `log-${level}` }, `${(timestamp || "").slice(11, 19)} ${(level || "").padEnd(7)} `,
    h("b", null, event), ` ${kv.join(" ")}\n`);
}

// --- one campaign ---------------------------------------------------------------------------

function campaignView(data) {
  if (!data) return [back(), empty("loading…")];
  const c = data.campaign;
  return [
    back(),
    h("h1", null, c.ref, c.active ? tag("active", "good") : null),
    h("p", { class: "mono small dim" }, c.path),
    facts([["description", c.description], ["created", when(c.created_at)],
      ["jobs", data.jobs.length], ["checkpoints", data.checkpoints.length]]),
    card("Loss across jobs", lossChart(data.curve, { boundaries: data.boundaries, rollbacks: data.rollbacks,
      width: 1360, height: 260 }), h("p", { class: "dim small" }, "dashed: a job starts · red: a governor rollback")),
    card("Jobs in training order", table([
      ["#", (j) => data.jobs.indexOf(j) + 1, "num"], ["job", (j) => jobLink(j.id)],
      ["dataset", (j) => dataset(j.dataset)], ["status", (j) => tag(j.status)],
      ["steps", (j) => steps(j.start_step, j.final_step)], ["final loss", (j) => loss(j.final_loss), "num"],
      ["rollbacks", (j) => j.rollbacks ? tag(String(j.rollbacks), "bad") : "0", "num"],
      ["finished", (j) => when(j.finished_at)],
    ], data.jobs, "no job has trained in this campaign")),
    card("Checkpoint chain", data.checkpoints.length ? h("div", { class: "chain" },
      data.checkpoints.map((k, i) => [i ? h("span", { class: "dim" }, "→") : null,
        h("span", { class: `ckpt ${k.finished ? "" : "partial"}`, title: k.finished ? "finished"
          : "not finished: a snapshot mid-job" }, h("b", { class: "mono" }, `step ${k.step}`), " ", jobLink(k.job_id))]))
      : empty("no checkpoint yet")),
  ];
}

window.addEventListener("hashchange", navigate);
navigate();
if (POLL_ONLY) poll(); else connect();
