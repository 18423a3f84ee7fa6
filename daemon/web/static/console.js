// nexus-jobd console. Every text from the database (commands, output, errors, node names) goes into the page as
// text nodes (el() below, textContent), never as HTML: a job's command and output are anyone's words.
"use strict";

const main = document.getElementById("main");
const SVG = "http://www.w3.org/2000/svg";
const VIEW_LIMIT = 2_000_000; // characters of a stream kept on the page; the row and the API keep it all
let teardown = () => {};

// -- small helpers -------------------------------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
  for (const child of children.flat(Infinity)) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

function toast(message, bad) {
  const box = document.getElementById("toast");
  box.textContent = message;
  box.className = bad ? "bad" : "";
  box.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { box.hidden = true; }, bad ? 6000 : 2500);
}

async function api(method, path, body) {
  const options = { method, headers: { Accept: "application/json" }, credentials: "same-origin" };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(data.error || `${response.status} ${response.statusText}`);
  return data;
}

function age(ms) {
  if (typeof ms !== "number") return "–";
  const s = Math.max(0, (Date.now() - ms) / 1000);
  if (s < 60) return `${Math.floor(s)}s ago`;
  if (s < 3600) return `${Math.floor(s / 60)}m ago`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ago`;
  return `${Math.floor(s / 86400)}d ago`;
}

function span(ms) {
  if (typeof ms !== "number") return "–";
  if (ms < 1000) return `${ms} ms`;
  if (ms < 60000) return `${(ms / 1000).toFixed(ms < 10000 ? 2 : 1)} s`;
  if (ms < 3600000) return `${Math.floor(ms / 60000)}m ${Math.round((ms % 60000) / 1000)}s`;
  return `${Math.floor(ms / 3600000)}h ${Math.round((ms % 3600000) / 60000)}m`;
}

function when(ms) {
  return typeof ms === "number" ? el("span", { title: new Date(ms).toLocaleString(), "data-age": ms }, age(ms)) : "–";
}

function badge(status) {
  const text = String(status ?? "?");
  return el("span", { class: `badge s-${text.replace(/[^a-z]+/gi, "-")}` }, text);
}

function bytes(n) {
  if (typeof n !== "number") return "–";
  if (n < 1024) return `${n} B`;
  if (n < 1048576) return `${(n / 1024).toFixed(1)} KiB`;
  if (n < 1073741824) return `${(n / 1048576).toFixed(1)} MiB`;
  return `${(n / 1073741824).toFixed(1)} GiB`;
}

// Relative times move on by themselves.
setInterval(() => {
  for (const node of document.querySelectorAll("[data-age]")) node.textContent = age(Number(node.dataset.age));
}, 1000);

function showCounts(counts) {
  if (!counts) return;
  document.getElementById("counts").replaceChildren(
    el("span", {}, el("b", {}, counts.executing), " running"),
    el("span", {}, el("b", {}, counts.queued), " queued"),
    el("span", {}, el("b", {}, counts.finished_last_hour), " finished in 1 h"));
}

// An EventSource closed when the page changes.
function listen(url, onData) {
  const source = new EventSource(url);
  source.onmessage = (event) => onData(JSON.parse(event.data), source);
  return source;
}

// -- jobs ----------------------------------------------------------------------------------------------------

function jobRow(job) {
  const problem = job.status !== "completed" && job.error;
  return el("a", { class: "job-row", href: `#/job/${encodeURIComponent(job.id)}`, "data-job": job.id },
    el("span", { class: "id mono" }, String(job.id).slice(0, 8)),
    el("span", { class: "st" }, badge(job.status)),
    el("span", { class: "cmd mono", title: job.command }, problem ? el("span", { class: "err" }, job.error) : job.command),
    el("span", { class: "node" }, job.node_id),
    el("span", { class: "dur" }, span(job.duration)),
    el("span", { class: "age" }, when(job.created_at)));
}

function jobsView(params) {
  const filters = {
    status: el("select", { "aria-label": "status" }, el("option", { value: "" }, "any status"),
      ["queued", "executing", "completed", "failed", "cancelled"].map((s) => el("option", { value: s }, s))),
    node: el("input", { type: "search", placeholder: "node", "aria-label": "node" }),
    q: el("input", { type: "search", placeholder: "search command, error or id", "aria-label": "search" }),
  };
  for (const [key, input] of Object.entries(filters)) input.value = params.get(key) || "";
  const list = el("div", { class: "jobs job-list-box", id: "job-list" });
  const more = el("button", { class: "more", hidden: true }, "Older jobs");
  main.replaceChildren(el("div", { class: "filters" }, filters.status, filters.node, filters.q), list, more);
  let source = null;
  let older = [];
  let next = null;

  function query() {
    const q = new URLSearchParams();
    for (const [key, input] of Object.entries(filters)) if (input.value.trim()) q.set(key, input.value.trim());
    return q;
  }
  function render(first) {
    const rows = [...first, ...older];
    list.replaceChildren(el("div", { class: "job-row head" }, el("span", {}, "id"), el("span", {}, "status"),
      el("span", {}, "command / error"), el("span", {}, "node"), el("span", {}, "duration"), el("span", {}, "queued")),
      ...(rows.length ? rows.map(jobRow) : [el("div", { class: "empty" }, "No jobs match.")]));
  }
  let first = [];
  function connect() {
    if (source) source.close();
    older = [];
    const q = query();
    history.replaceState(null, "", `#/jobs${q.toString() ? "?" + q : ""}`);
    q.set("limit", "50");
    source = listen(`/api/v1/events?${q}`, (data) => {
      if (data.type !== "jobs") return;
      first = data.jobs;
      if (!older.length) next = data.next;
      more.hidden = !next;
      showCounts(data.counts);
      render(first);
    });
  }
  more.addEventListener("click", async () => {
    const q = query();
    q.set("limit", "50");
    q.set("before", next);
    try {
      const page = await api("GET", `/api/v1/jobs?${q}`);
      older = older.concat(page.jobs);
      next = page.next;
      more.hidden = !next;
      render(first);
    } catch (e) { toast(e.message, true); }
  });
  let timer = null;
  for (const input of Object.values(filters)) {
    input.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(connect, 250); });
  }
  connect();
  return () => { if (source) source.close(); };
}

// ANSI colours: SGR sequences become classes (or a colour set through the CSSOM, which the CSP allows); every
// other escape sequence is dropped. A sequence cut between two chunks waits for the rest.
const ESCAPE = /\x1b(?:\[([0-9;?]*)([@-~])|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])/g;
const PARTIAL = /\x1b(?:\[[0-9;?]*|\][^\x07\x1b]*)?$/;

class Terminal {
  constructor(node) {
    this.node = node;
    this.pending = "";
    this.style = { classes: [], color: null };
    this.chars = 0;
    this.trimmed = false;
  }

  write(text, marker) {
    text = this.pending + text;
    const partial = text.match(PARTIAL);
    this.pending = partial ? partial[0] : "";
    if (partial) text = text.slice(0, text.length - partial[0].length);
    const atBottom = this.node.scrollHeight - this.node.scrollTop - this.node.clientHeight < 40;
    const fragment = document.createDocumentFragment();
    if (marker) {
      fragment.append(el("span", { class: "marker" }, text));
    } else {
      let last = 0;
      for (const match of text.matchAll(ESCAPE)) {
        this.emit(fragment, text.slice(last, match.index));
        if (match[2] === "m") this.sgr(match[1]);
        last = match.index + match[0].length;
      }
      this.emit(fragment, text.slice(last));
    }
    this.node.append(fragment);
    this.chars += text.length;
    this.trim();
    if (atBottom) this.node.scrollTop = this.node.scrollHeight;
  }

  emit(fragment, text) {
    if (!text) return;
    if (!this.style.classes.length && !this.style.color) { fragment.append(document.createTextNode(text)); return; }
    const part = el("span", { class: this.style.classes.join(" ") }, text);
    if (this.style.color) part.style.color = this.style.color;
    fragment.append(part);
  }

  sgr(params) {
    const codes = (params || "0").split(";").map((n) => parseInt(n || "0", 10));
    for (let i = 0; i < codes.length; i++) {
      const c = codes[i];
      let classes = this.style.classes;
      if (c === 0) { this.style = { classes: [], color: null }; continue; }
      if (c === 1) classes.push("ansi-b"); else if (c === 2) classes.push("ansi-d");
      else if (c === 3) classes.push("ansi-i"); else if (c === 4) classes.push("ansi-u");
      else if (c === 22 || c === 23 || c === 24) classes = classes.filter((k) => !/ansi-[bdiu]/.test(k));
      else if ((c >= 30 && c <= 37) || (c >= 90 && c <= 97)) { classes = classes.filter((k) => !k.startsWith("fg-")); classes.push(`fg-${c}`); this.style.color = null; }
      else if (c === 39) { classes = classes.filter((k) => !k.startsWith("fg-")); this.style.color = null; }
      else if (c >= 41 && c <= 44) { classes = classes.filter((k) => !k.startsWith("bg-")); classes.push(`bg-${c}`); }
      else if (c === 49 || c === 40 || (c >= 45 && c <= 47)) classes = classes.filter((k) => !k.startsWith("bg-"));
      else if (c === 38 && codes[i + 1] === 2 && i + 4 < codes.length) { this.style.color = `rgb(${codes[i + 2]},${codes[i + 3]},${codes[i + 4]})`; i += 4; }
      else if (c === 38 && codes[i + 1] === 5 && i + 2 < codes.length) { this.style.color = xterm256(codes[i + 2]); i += 2; }
      else if (c === 48 && codes[i + 1] === 2) i += 4;
      else if (c === 48 && codes[i + 1] === 5) i += 2;
      this.style.classes = classes;
    }
  }

  trim() {
    while (this.chars > VIEW_LIMIT && this.node.firstChild) {
      this.chars -= (this.node.firstChild.textContent || "").length;
      this.node.firstChild.remove();
      if (!this.trimmed) {
        this.trimmed = true;
        this.node.before(el("p", { class: "muted" }, "The start of this stream is no longer shown here; the row keeps it (GET /api/v1/jobs/ID)."));
      }
    }
  }
}

function xterm256(n) {
  if (n < 16) return ["#000", "#cd3131", "#0dbc79", "#e5e510", "#2472c8", "#bc3fbc", "#11a8cd", "#e5e5e5",
    "#666", "#f14c4c", "#23d18b", "#f5f543", "#3b8eea", "#d670d6", "#29b8db", "#fff"][n] || null;
  if (n < 232) {
    const v = [0, 95, 135, 175, 215, 255];
    const i = n - 16;
    return `rgb(${v[Math.floor(i / 36)]},${v[Math.floor(i / 6) % 6]},${v[i % 6]})`;
  }
  const g = 8 + (n - 232) * 10;
  return `rgb(${g},${g},${g})`;
}

const GAP = /^\n\[nexus-jobd: \d+ bytes of (stdout|stderr) (not shown|omitted[^\]]*)\]\n$/;

function jobView(id) {
  const title = el("h1", { class: "mono" }, id);
  const status = el("span", {}, badge("…"));
  const cancel = el("button", { class: "danger", id: "cancel" }, "Cancel");
  const retry = el("button", { id: "retry" }, "Retry");
  const command = el("pre", { class: "command" });
  const meta = el("dl", { class: "meta" });
  const error = el("p", { class: "error-text", hidden: true });
  const terms = {};
  const boxes = ["stdout", "stderr"].map((name) => {
    const pre = el("pre", { class: "term", id: name, "aria-label": name });
    terms[name] = new Terminal(pre);
    const size = el("span", { class: "muted", id: `${name}-bytes` });
    return el("section", { class: "stream" }, el("h2", {}, name, size), pre);
  });
  main.replaceChildren(el("div", { class: "job-head" }, status, title,
    el("div", { class: "actions" }, cancel, retry)), command, error, meta, el("div", { class: "streams" }, boxes));

  let row = null;
  let source = null;
  async function load() {
    try {
      row = await api("GET", `/api/v1/jobs/${encodeURIComponent(id)}`);
    } catch (e) {
      main.replaceChildren(el("h1", {}, "Job not found"), el("p", { class: "error-text" }, e.message));
      return false;
    }
    showRow(row);
    return true;
  }
  function showRow(job) {
    status.replaceChildren(badge(job.status));
    command.textContent = job.command;
    const pickup = typeof job.started_at === "number" ? job.started_at - Math.max(job.created_at, job.run_after || 0) : null;
    const items = [["node", job.node_id], ["tool", job.tool], ["exit code", job.exit_code ?? "–"],
      ["attempt", `${job.attempt ?? 0} of ${job.max_attempts ?? 1}`], ["queued", when(job.created_at)],
      ["started", when(job.started_at)], ["ended", when(job.completed_at)], ["duration", span(job.duration)],
      ["pickup latency", span(pickup)], ["priority", job.priority ?? 0], ["timeout", job.timeout_ms ? span(job.timeout_ms) : "daemon's default"],
      ["working dir", job.cwd || "default"], ["depends on", job.depends_on || "–"], ["worker", job.worker_id || "–"]];
    meta.replaceChildren(...items.map(([k, v]) => el("div", {}, el("dt", {}, k), el("dd", {}, v))));
    error.hidden = !job.error;
    error.textContent = job.error || "";
    for (const name of ["stdout", "stderr"]) document.getElementById(`${name}-bytes`).textContent = bytes(job[`${name}_bytes`]);
    const final = ["completed", "failed", "cancelled"].includes(job.status);
    cancel.disabled = final;
    retry.disabled = !final;
  }
  function follow() {
    source = listen(`/api/v1/jobs/${encodeURIComponent(id)}/stream`, async (event, es) => {
      if (event.type === "output_chunk") {
        terms[event.stream === "stderr" ? "stderr" : "stdout"].write(event.text, GAP.test(event.text));
      } else if (event.type === "status" || event.type === "response_done" || event.type === "error") {
        load();
      } else if (event.type === "done") {
        es.close();
        load();
      }
    });
  }
  cancel.addEventListener("click", async () => {
    cancel.disabled = true;
    try {
      const answer = await api("DELETE", `/api/v1/jobs/${encodeURIComponent(id)}`);
      toast(answer.killed ? "Cancelled: its daemon stops the process" : "Cancelled");
      load();
    } catch (e) { toast(e.message, true); cancel.disabled = false; }
  });
  retry.addEventListener("click", async () => {
    retry.disabled = true;
    try {
      await api("POST", `/api/v1/jobs/${encodeURIComponent(id)}/retry`);
      toast("Queued again");
      if (source) source.close();
      for (const name of ["stdout", "stderr"]) { document.getElementById(name).replaceChildren(); terms[name] = new Terminal(document.getElementById(name)); }
      await load();
      follow();
    } catch (e) { toast(e.message, true); retry.disabled = false; }
  });
  load().then((found) => { if (found) follow(); });
  return () => { if (source) source.close(); };
}

// -- nodes ---------------------------------------------------------------------------------------------------

function nodeCard(node) {
  const caps = node.capabilities || {};
  const tools = caps.tools && typeof caps.tools === "object" ? Object.entries(Array.isArray(caps.tools) ? Object.fromEntries(caps.tools.map((t) => [t, ""])) : caps.tools) : [];
  const rows = [["heartbeat", node.heartbeatAgeMs == null ? "never" : `${span(node.heartbeatAgeMs)} ago`],
    ["running", node.running], ["queued", node.queued], ["host", node.hostname]];
  if (caps.cpus) rows.push(["cpus", caps.cpus]);
  if (Array.isArray(caps.load)) rows.push(["load", caps.load.map((x) => Number(x).toFixed(2)).join(" ")]);
  if (caps.mem_available_kb) rows.push(["memory free", `${bytes(1024 * caps.mem_available_kb)} of ${bytes(1024 * caps.mem_total_kb)}`]);
  if (caps.os) rows.push(["system", `${caps.os} ${caps.arch || ""} ${caps.kernel || ""}`]);
  if (caps.rtt_ms != null) rows.push(["round trip", `${Number(caps.rtt_ms).toFixed(1)} ms`]);
  return el("div", { class: "panel node", "data-node": node.id },
    el("h3", {}, el("span", { class: "mono" }, node.id), badge(node.status)),
    node.error ? el("p", { class: "error-text" }, node.error) : null,
    el("dl", {}, rows.map(([k, v]) => [el("dt", {}, k), el("dd", {}, String(v ?? "–"))]),
      el("dt", {}, "tools"), el("dd", { class: "tools" }, tools.length ? tools.map(([t, v]) => el("span", { class: "tool", title: String(v) }, t)) : "–")));
}

function nodesView() {
  const grid = el("div", { class: "nodes", id: "node-list" });
  const daemons = el("tbody");
  main.replaceChildren(el("h1", {}, "Nodes"), grid, el("h2", {}, "Daemons"),
    el("table", { class: "daemons" }, el("thead", {}, el("tr", {}, ["daemon", "host", "pid", "state", "running", "heartbeat"].map((h) => el("th", {}, h)))), daemons));
  const source = listen("/api/v1/events?limit=1", (data) => {
    if (data.type === "jobs") showCounts(data.counts);
    if (data.type !== "nodes") return;
    grid.replaceChildren(...(data.nodes.length ? data.nodes.map(nodeCard) : [el("p", { class: "empty" }, "No node has reported yet: is a daemon running?")]));
    daemons.replaceChildren(...data.daemons.map((d) => el("tr", {}, el("td", { class: "mono" }, String(d.id).slice(0, 18)), el("td", {}, d.host),
      el("td", {}, d.pid), el("td", {}, badge(d.state), d.stopReason ? el("div", { class: "muted" }, d.stopReason) : null), el("td", {}, d.running),
      el("td", {}, d.stoppedAt ? "–" : `${span(d.heartbeatAgeMs)} ago`))));
  });
  return () => source.close();
}

// -- charts --------------------------------------------------------------------------------------------------

const W = 560;
const H = 180;
const PAD = { l: 38, r: 8, t: 8, b: 20 };

function frame(stats, max, unit) {
  const g = [];
  const inner = H - PAD.t - PAD.b;
  for (const f of [0, 0.5, 1]) {
    const y = PAD.t + inner * (1 - f);
    g.push(svg("line", { class: "axis", x1: PAD.l, x2: W - PAD.r, y1: y, y2: y }));
    g.push(svg("text", { x: PAD.l - 4, y: y + 3, "text-anchor": "end" }, unit(max * f)));
  }
  const fmt = (t) => new Date(t).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  g.push(svg("text", { x: PAD.l, y: H - 4 }, fmt(stats.start)));
  g.push(svg("text", { x: W - PAD.r, y: H - 4, "text-anchor": "end" }, fmt(stats.end)));
  return g;
}

function xAt(i, n) { return PAD.l + ((W - PAD.l - PAD.r) * (i + 0.5)) / n; }
function yAt(v, max) { return PAD.t + (H - PAD.t - PAD.b) * (1 - v / max); }

function barChart(stats) {
  const n = stats.queueDepth.length;
  const totals = stats.finished.completed.map((_, i) => ["completed", "failed", "cancelled"].reduce((s, k) => s + stats.finished[k][i], 0));
  const max = countMax(totals);
  const bw = Math.max(1, (W - PAD.l - PAD.r) / n - 1);
  const bars = [];
  for (let i = 0; i < n; i++) {
    let base = 0;
    for (const k of ["completed", "failed", "cancelled"]) {
      const v = stats.finished[k][i];
      if (!v) continue;
      bars.push(svg("rect", { class: `c-${k}`, x: xAt(i, n) - bw / 2, width: bw, y: yAt(base + v, max), height: yAt(base, max) - yAt(base + v, max) },
        svg("title", {}, `${v} ${k}`)));
      base += v;
    }
  }
  return svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "jobs finished" }, frame(stats, max, (v) => Math.round(v)), bars);
}

function countMax(values) {
  const max = Math.max(2, ...values);
  return max % 2 ? max + 1 : max; // even: the middle line is a whole number
}

function lineChart(stats, series, unit, counts) {
  const n = stats.queueDepth.length;
  const values = series.flatMap(([, v]) => v.filter((x) => x != null));
  const max = counts ? countMax(values) : Math.max(1, ...values);
  const lines = series.map(([cls, values]) => {
    const points = values.map((v, i) => (v == null ? null : `${xAt(i, n).toFixed(1)},${yAt(v, max).toFixed(1)}`)).filter(Boolean);
    return points.length === 1 ? svg("circle", { class: cls, r: 2.5, cx: points[0].split(",")[0], cy: points[0].split(",")[1] })
      : svg("polyline", { class: cls, points: points.join(" ") });
  });
  return svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img" }, frame(stats, max, unit), lines);
}

function legend(items) {
  return el("div", { class: "legend" }, items.map(([cls, label]) => el("span", {}, el("i", { class: cls }), label)));
}

function chartsView() {
  const hours = el("select", { "aria-label": "span" }, [1, 6, 24, 72].map((h) => el("option", { value: h }, `last ${h} h`)));
  hours.value = "6";
  const grid = el("div", { class: "charts" });
  main.replaceChildren(el("div", { class: "toolbar" }, el("h1", {}, "Charts"), hours), grid);
  let last = 0;
  async function draw() {
    last = Date.now();
    let stats;
    try { stats = await api("GET", `/api/v1/stats?hours=${hours.value}`); } catch (e) { toast(e.message, true); return; }
    const ms = (v) => (v >= 1000 ? `${(v / 1000).toFixed(v >= 10000 ? 0 : 1)}s` : `${Math.round(v)}ms`);
    const bucket = stats.bucketMs % 3600000 ? `${stats.bucketMs / 60000} min` : `${stats.bucketMs / 3600000} h`;
    grid.replaceChildren(
      el("div", { class: "panel chart", id: "chart-finished" }, el("h3", {}, `Jobs finished per ${bucket}`), barChart(stats),
        legend([["c-completed", "completed"], ["c-failed", "failed"], ["c-cancelled", "cancelled"]])),
      el("div", { class: "panel chart", id: "chart-depth" }, el("h3", {}, "Queue depth"), lineChart(stats, [["c-depth", stats.queueDepth]], (v) => Math.round(v), true),
        legend([["c-depth", "jobs waiting"]])),
      el("div", { class: "panel chart", id: "chart-pickup" }, el("h3", {}, "Pickup latency (queued → started)"),
        lineChart(stats, [["c-p50", stats.pickupMs.p50], ["c-p95", stats.pickupMs.p95]], ms), legend([["c-p50", "p50"], ["c-p95", "p95"]])),
      el("div", { class: "panel chart", id: "chart-duration" }, el("h3", {}, "Duration"),
        lineChart(stats, [["c-p50", stats.durationMs.p50], ["c-p95", stats.durationMs.p95]], ms), legend([["c-p50", "p50"], ["c-p95", "p95"]])));
  }
  hours.addEventListener("change", draw);
  draw();
  // Redrawn when jobs change, at most every 10 s (the buckets are minutes).
  const source = listen("/api/v1/events?limit=1", (data) => {
    if (data.type === "jobs") { showCounts(data.counts); if (Date.now() - last > 10000) draw(); }
  });
  return () => source.close();
}

// -- submit --------------------------------------------------------------------------------------------------

function submitView() {
  const f = (name, input, hint) => el("label", { class: name === "command" || name === "env" ? "wide" : "" }, name, input, hint ? el("span", { class: "hint" }, hint) : null);
  const fields = {
    command: el("textarea", { name: "command", required: true, placeholder: "echo hello", spellcheck: "false" }),
    tool: el("select", { name: "tool" }, ["bash", "git", "docker"].map((t) => el("option", { value: t }, t))),
    nodeId: el("input", { name: "nodeId", value: "localhost" }),
    workingDir: el("input", { name: "workingDir", placeholder: "the daemon's default" }),
    timeout: el("input", { name: "timeout", type: "number", min: "0", step: "any", placeholder: "none" }),
    priority: el("input", { name: "priority", type: "number", value: "0", step: "1" }),
    delay: el("input", { name: "delay", type: "number", min: "0", step: "any", placeholder: "0" }),
    maxAttempts: el("input", { name: "maxAttempts", type: "number", min: "1", value: "1", step: "1" }),
    dependsOn: el("input", { name: "dependsOn", placeholder: "job id" }),
    env: el("textarea", { name: "env", placeholder: "NAME=value, one a line", spellcheck: "false" }),
  };
  const button = el("button", { class: "primary", type: "submit" }, "Queue the job");
  const form = el("form", { class: "submit panel" },
    f("command", fields.command), f("tool", fields.tool), f("node", fields.nodeId), f("working dir", fields.workingDir),
    f("timeout (s)", fields.timeout, "empty: none"), f("priority", fields.priority, "higher runs first"),
    f("delay (s)", fields.delay), f("max attempts", fields.maxAttempts), f("depends on", fields.dependsOn),
    f("env", fields.env), el("div", { class: "wide" }, button));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = { command: fields.command.value, tool: fields.tool.value, nodeId: fields.nodeId.value.trim() || "localhost",
      timeout: fields.timeout.value ? Math.round(Number(fields.timeout.value) * 1000) : null,
      priority: Number(fields.priority.value || 0), maxAttempts: Number(fields.maxAttempts.value || 1) };
    if (fields.workingDir.value.trim()) body.workingDir = fields.workingDir.value.trim();
    if (fields.delay.value) body.delay = Math.round(Number(fields.delay.value) * 1000);
    if (fields.dependsOn.value.trim()) body.dependsOn = fields.dependsOn.value.trim();
    const env = {};
    for (const line of fields.env.value.split("\n")) {
      if (!line.trim()) continue;
      const at = line.indexOf("=");
      if (at < 1) { toast(`env: ${line.slice(0, 40)}: expected NAME=value`, true); return; }
      env[line.slice(0, at).trim()] = line.slice(at + 1);
    }
    if (Object.keys(env).length) body.env = env;
    button.disabled = true;
    try {
      const job = await api("POST", "/api/v1/jobs", body);
      location.hash = `#/job/${encodeURIComponent(job.jobId)}`;
    } catch (e) { toast(e.message, true); } finally { button.disabled = false; }
  });
  main.replaceChildren(el("h1", {}, "Submit a job"), form);
  return () => {};
}

// -- routing -------------------------------------------------------------------------------------------------

function route() {
  teardown();
  document.getElementById("toast").hidden = true;
  const [path, search] = location.hash.slice(1).split("?");
  const params = new URLSearchParams(search || "");
  const parts = (path || "/jobs").split("/").filter(Boolean);
  const page = parts[0] || "jobs";
  for (const link of document.querySelectorAll("nav a")) link.classList.toggle("active", link.dataset.nav === (page === "job" ? "jobs" : page));
  if (page === "job" && parts[1]) teardown = jobView(decodeURIComponent(parts.slice(1).join("/")));
  else if (page === "nodes") teardown = nodesView();
  else if (page === "charts") teardown = chartsView();
  else if (page === "submit") teardown = submitView();
  else teardown = jobsView(params);
  window.scrollTo(0, 0);
}

window.addEventListener("hashchange", route);
route();
