// The master's dashboard: every instance at a glance, live, and each one's controls.
// Everything shown comes from the seed API (docs/api.md) with the key the user gives;
// every value from it is set as text, never as markup.

import { Api } from "./api.js";
import { drawRates, newSparkline, sparkline } from "./charts.js";
import * as fmt from "./format.js";
import { buildUrl, masked, parseTags } from "./urlform.js";

const API_BASE = document.querySelector('meta[name="nodepass-api"]').content;
const NEEDS_KEY = document.querySelector('meta[name="nodepass-auth"]').content !== "0";
const KEY_STORE = "nodepass-api-key";
const HOUR = 3600e3;
const LOG_LINES = 500;
const COLLATOR = new Intl.Collator(undefined, { numeric: true }); // "tunnel 9" < "tunnel 10"
const $ = (id) => document.getElementById(id);

const state = {
  api: null,
  stream: null,
  instances: new Map(),
  series: new Map(), // id -> [{t, in, out}] bytes per second, oldest first
  counted: new Map(), // id -> {t, in, out}: the counters of the last point
  total: [],
  logs: new Map(),
  info: null,
  infoAt: 0,
  interval: 5000,
  filter: { text: "", status: "", tag: "" },
  sort: { key: "alias", dir: 1 },
  selected: null,
  dirty: new Set(),
  structural: true,
  newPoints: false,
  frame: 0,
  chartsAt: 0,
  chartTimer: 0,
  rows: new Map(),
  order: [],
};

// -- the columns of the overview ---------------------------------------------------------

function rateOf(id, side) {
  const series = state.series.get(id) || [];
  const last = series[series.length - 1];
  return last && Date.now() - last.t < 3 * state.interval ? last[side] : 0;
}

const COLUMNS = [
  { key: "alias", label: "Tunnel", value: (i) => (i.alias || i.id).toLowerCase() },
  { key: "type", label: "Type", value: (i) => i.type },
  { key: "mode", label: "Mode", value: (i) => i.mode || "", optional: true },
  { key: "transport", label: "Pool over", value: (i) => i.transport || "", optional: true },
  { key: "node", label: "Node", value: (i) => nodeName(i.node), optional: true },
  { key: "status", label: "Status", value: (i) => i.status },
  { key: "tunnel", label: "Session", value: (i) => i.tunnel || "", optional: true },
  { key: "ping", label: "Ping", value: (i) => (i.ping === null ? -1 : i.ping), numeric: true,
    optional: true },
  { key: "pool_size", label: "Pool", value: (i) => i.pool_size, numeric: true, optional: true },
  { key: "connections", label: "Conns / UDP", value: (i) => i.connections + i.udp_sessions,
    numeric: true },
  { key: "refused", label: "Refused", value: (i) => i.refused, numeric: true, optional: true },
  { key: "rate_in", label: "In", value: (i) => rateOf(i.id, "in"), numeric: true },
  { key: "rate_out", label: "Out", value: (i) => rateOf(i.id, "out"), numeric: true },
  { key: "uptime", label: "Uptime", value: (i) => i.uptime, numeric: true, optional: true },
  { key: "restarts", label: "Restarts", value: (i) => i.restarts, numeric: true,
    optional: true },
  { key: "tags", label: "Tags", value: (i) => fmt.tags(i.tags).join(" "), optional: true },
  { key: "spark", label: "Recent traffic", sortable: false },
];

// A node as people know it: its alias, else its id; "this master" for the one answering.
function nodeName(id) {
  const store = state.info && state.info.store;
  if (!store || !id) return id || "";
  if (id === store.node) return "this master";
  const node = (store.nodes || []).find((n) => n.id === id);
  return node && node.alias ? node.alias : id;
}

function cellText(column, i) {
  switch (column.key) {
    case "type": return i.type;
    case "mode": return i.mode || "—";
    case "transport": return i.transport || "—";
    case "node": return i.stale ? `${nodeName(i.node)} (offline)` : nodeName(i.node);
    case "status": return i.status;
    case "tunnel": return i.tunnel || "—";
    case "ping": return fmt.ping(i.ping);
    case "pool_size": return String(i.pool_size);
    case "connections": return `${i.connections} / ${i.udp_sessions}`;
    case "refused": return String(i.refused);
    case "rate_in": return fmt.rate(rateOf(i.id, "in"));
    case "rate_out": return fmt.rate(rateOf(i.id, "out"));
    case "uptime": return i.status === "running" ? fmt.duration(i.uptime) : "—";
    case "restarts": return String(i.restarts);
    case "tags": return fmt.tags(i.tags).join(", ");
    default: return "";
  }
}

// -- start, the key ----------------------------------------------------------------------

function show(section) {
  for (const id of ["login", "overview", "detail", "master"]) $(id).hidden = true;
  for (const id of section) $(id).hidden = false;
}

async function tryKey(key) {
  const api = new Api(API_BASE, key);
  try {
    state.info = await api.request("GET", "/info");
    state.infoAt = Date.now();
    return api;
  } catch (e) {
    if (e.status === 401) return null;
    throw e;
  }
}

function askForKey(message) {
  stopStream();
  $("bar-actions").hidden = true;
  $("live").textContent = "key needed";
  show(["login"]);
  $("login-error").textContent = message || "";
  $("key-input").value = "";
  $("key-input").focus();
}

async function begin() {
  const saved = sessionStorage.getItem(KEY_STORE) || "";
  if (NEEDS_KEY && !saved) {
    askForKey("");
    return;
  }
  let api;
  try {
    api = await tryKey(saved);
  } catch (e) {
    $("live").textContent = "unreachable";
    askForKey(`The master cannot be reached (${e.message}).`);
    return;
  }
  if (api) open(api);
  else askForKey(saved ? "The saved key is not this master's key any more." : "");
}

async function login(event) {
  event.preventDefault();
  const key = $("key-input").value.trim();
  $("login-error").textContent = "";
  let api;
  try {
    api = await tryKey(key);
  } catch (e) {
    $("login-error").textContent = e.message;
    return;
  }
  if (!api) {
    $("login-error").textContent = "That is not this master's API key.";
    $("key-input").select();
    return;
  }
  sessionStorage.setItem(KEY_STORE, key);
  open(api);
}

function logout() {
  sessionStorage.removeItem(KEY_STORE);
  askForKey("The key is forgotten in this tab.");
}

async function open(api) {
  state.api = api;
  $("bar-actions").hidden = false;
  renderMaster();
  route();
  try {
    const listed = await api.request("GET", "/instances");
    replaceAll(listed.instances);
  } catch (e) {
    if (e.status === 401) return askForKey("The key was refused.");
  }
  loadHistories([...state.instances.keys()]);
  stopStream();
  state.stream = api.follow(onEvent, onStreamState);
}

function stopStream() {
  if (state.stream) state.stream.stop();
  state.stream = null;
}

function onStreamState(what) {
  $("live").textContent = { live: "live", reconnecting: "reconnecting…" }[what] || what;
  $("live").dataset.state = what;
  if (what === "unauthorized") askForKey("The master refused the key (was it changed?).");
}

// -- what the master tells -----------------------------------------------------------------

function replaceAll(list) {
  const seen = new Set();
  for (const instance of list) {
    seen.add(instance.id);
    upsert(instance);
  }
  for (const id of [...state.instances.keys()]) if (!seen.has(id)) remove(id);
  state.structural = true;
  if (state.selected && !state.instances.has(state.selected)) location.hash = "#/";
  schedule();
}

function upsert(instance) {
  if (!state.instances.has(instance.id)) state.structural = true;
  state.instances.set(instance.id, instance);
  if (state.selected === instance.id && state.formsFor !== instance.id) fillForms(instance);
  observe(instance, Date.now());
  state.dirty.add(instance.id);
}

function remove(id) {
  state.instances.delete(id);
  state.series.delete(id);
  state.counted.delete(id);
  state.logs.delete(id);
  state.structural = true;
}

function onEvent(name, data) {
  if (name === "initial") replaceAll(data.instances || []);
  else if (name === "create" || name === "update") upsert(data);
  else if (name === "delete") {
    remove(data.id);
    if (state.selected === data.id) location.hash = "#/";
  } else if (name === "log") addLog(data.id, { time: new Date().toISOString(),
                                               level: data.level, message: data.message });
  else if (name === "shutdown") $("live").textContent = "the master is stopping";
  schedule();
}

// A rate point from the change of an instance's counters since its last point.
function observe(instance, t) {
  const now = { t, in: instance.tcp_in + instance.udp_in, out: instance.tcp_out + instance.udp_out };
  const before = state.counted.get(instance.id);
  if (!before) {
    state.counted.set(instance.id, now);
    return;
  }
  const seconds = (t - before.t) / 1000;
  if (seconds < 0.5) return; // a status change right after a report: no new point
  state.counted.set(instance.id, now);
  const point = { t, in: Math.max(0, (now.in - before.in) / seconds),
                  out: Math.max(0, (now.out - before.out) / seconds) };
  const series = state.series.get(instance.id) || [];
  series.push(point);
  trim(series);
  state.series.set(instance.id, series);
  state.newPoints = true;
}

function trim(series) {
  const oldest = Date.now() - HOUR;
  while (series.length && series[0].t < oldest) series.shift();
}

async function loadHistories(ids) {
  const queue = [...ids];
  const worker = async () => {
    while (queue.length) {
      const id = queue.shift();
      try {
        const history = await state.api.request("GET", `/instances/${id}/traffic?window=3600`);
        state.interval = history.interval * 1000;
        const past = history.samples.map((s) => ({ t: s.timestamp * 1000,
                                                   in: s.tcp_in_rate + s.udp_in_rate,
                                                   out: s.tcp_out_rate + s.udp_out_rate }));
        const live = state.series.get(id) || [];
        const first = live.length ? live[0].t : Infinity;
        state.series.set(id, [...past.filter((p) => p.t < first), ...live]);
        state.dirty.add(id);
      } catch (e) {
        // an instance deleted meanwhile: nothing to show
      }
    }
  };
  await Promise.all([worker(), worker(), worker(), worker()]);
  rebuildTotal();
  schedule();
}

// The master-wide series: each point the sum of every instance's rate at that time.
function rebuildTotal() {
  const step = state.interval;
  const buckets = new Map();
  for (const series of state.series.values()) {
    for (const p of series) {
      const key = Math.round(p.t / step);
      const bucket = buckets.get(key) || { t: key * step, in: 0, out: 0 };
      bucket.in += p.in;
      bucket.out += p.out;
      buckets.set(key, bucket);
    }
  }
  state.total = [...buckets.values()].sort((a, b) => a.t - b.t);
}

function addTotalPoint() {
  const now = Date.now();
  let rateIn = 0;
  let rateOut = 0;
  for (const id of state.instances.keys()) {
    rateIn += rateOf(id, "in");
    rateOut += rateOf(id, "out");
  }
  const last = state.total[state.total.length - 1];
  if (last && now - last.t < state.interval / 2) {
    Object.assign(last, { in: rateIn, out: rateOut });
  } else {
    state.total.push({ t: now, in: rateIn, out: rateOut });
  }
  trim(state.total);
}

function addLog(id, line) {
  const lines = state.logs.get(id) || [];
  lines.push(line);
  if (lines.length > LOG_LINES) lines.splice(0, lines.length - LOG_LINES);
  state.logs.set(id, lines);
  if (state.selected === id) appendLogLine(line);
}

// -- drawing: at most once per animation frame ---------------------------------------------

function schedule() {
  if (!state.frame) state.frame = requestAnimationFrame(render);
}

function render() {
  state.frame = 0;
  if (!state.api) return;
  if (state.newPoints) {
    addTotalPoint();
    state.newPoints = false;
  }
  if (state.structural) renderStructure();
  for (const id of state.dirty) renderRow(id);
  state.dirty.clear();
  renderOrder();
  renderStats();
  const now = Date.now();
  if (now - state.chartsAt >= 1000) {
    state.chartsAt = now;
    drawRates($("total-chart"), state.total);
    if (state.selected) renderDetailChart();
  } else if (!state.chartTimer) {
    // charts redraw at most once a second: the next one when its second has passed
    state.chartTimer = setTimeout(() => {
      state.chartTimer = 0;
      schedule();
    }, 1000 - (now - state.chartsAt));
  }
  if (state.selected) renderDetail();
}

function renderHead() {
  const head = $("instances-head");
  head.replaceChildren();
  for (const column of COLUMNS) {
    const th = document.createElement("th");
    th.scope = "col";
    if (column.optional) th.classList.add("optional");
    if (column.numeric) th.classList.add("num");
    if (column.sortable === false) {
      th.textContent = column.label;
    } else {
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = column.label;
      button.addEventListener("click", () => {
        state.sort = { key: column.key,
                       dir: state.sort.key === column.key ? -state.sort.dir : 1 };
        renderHead();
        schedule();
      });
      th.append(button);
      if (state.sort.key === column.key) {
        th.setAttribute("aria-sort", state.sort.dir > 0 ? "ascending" : "descending");
      }
    }
    head.append(th);
  }
}

function renderStructure() {
  state.structural = false;
  const body = $("instances-body");
  for (const [id, row] of state.rows) {
    if (!state.instances.has(id)) {
      row.tr.remove();
      state.rows.delete(id);
    }
  }
  for (const id of state.instances.keys()) {
    if (!state.rows.has(id)) {
      const row = newRow(id);
      state.rows.set(id, row);
      body.append(row.tr);
      state.dirty.add(id);
    }
  }
  const tags = new Set();
  for (const instance of state.instances.values()) fmt.tags(instance.tags).forEach((t) => tags.add(t));
  const select = $("filter-tag");
  const chosen = select.value;
  select.replaceChildren(new Option("any", ""));
  for (const tag of [...tags].sort()) select.append(new Option(tag, tag));
  select.value = tags.has(chosen) ? chosen : "";
  state.filter.tag = select.value;
  state.order = [];
}

function newRow(id) {
  const tr = document.createElement("tr");
  tr.dataset.id = id;
  const cells = {};
  for (const column of COLUMNS) {
    const td = document.createElement("td");
    td.dataset.column = column.key;
    if (column.optional) td.classList.add("optional");
    if (column.numeric) td.classList.add("num");
    if (column.key === "alias") {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "link";
      button.addEventListener("click", () => { location.hash = `#/${id}`; });
      const small = document.createElement("small");
      td.append(button, small);
      cells.alias = { button, small };
    } else if (column.key === "spark") {
      const svg = newSparkline();
      td.append(svg);
      cells.spark = svg;
    } else if (column.key === "status") {
      const span = document.createElement("span");
      td.append(span);
      cells.status = span;
    } else {
      cells[column.key] = td;
    }
    tr.append(td);
  }
  return { tr, cells };
}

// Sets a node's text only when it changed: most cells stay the same from one report
// to the next, and an unchanged page costs nothing to lay out again.
function setText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

const PLAIN_COLUMNS = COLUMNS.filter((c) => !["alias", "status", "spark"].includes(c.key));

function renderRow(id) {
  const row = state.rows.get(id);
  const instance = state.instances.get(id);
  if (!row || !instance) return;
  setText(row.cells.alias.button, instance.alias || instance.id);
  if (row.cells.alias.button.title !== (instance.alias || "")) {
    row.cells.alias.button.title = instance.alias || ""; // all of a long alias
  }
  setText(row.cells.alias.small, instance.alias ? instance.id : "");
  setText(row.cells.status, instance.status);
  const statusClass = `status status-${instance.status}`;
  if (row.cells.status.className !== statusClass) row.cells.status.className = statusClass;
  if (row.cells.status.title !== (instance.error || "")) row.cells.status.title = instance.error || "";
  for (const column of PLAIN_COLUMNS) setText(row.cells[column.key], cellText(column, instance));
  const series = state.series.get(id) || [];
  const last = series.length ? series[series.length - 1].t : 0;
  if (row.drawn !== last) {
    row.drawn = last;
    sparkline(row.cells.spark, series);
  }
}

function visible(instance) {
  const { text, status, tag } = state.filter;
  if (status && instance.status !== status) return false;
  if (tag && !fmt.tags(instance.tags).includes(tag)) return false;
  if (text) {
    const haystack = [instance.alias || "", instance.id, masked(instance.url),
                      ...fmt.tags(instance.tags)].join(" ").toLowerCase();
    if (!haystack.includes(text.toLowerCase())) return false;
  }
  return true;
}

function renderOrder() {
  const column = COLUMNS.find((c) => c.key === state.sort.key) || COLUMNS[0];
  const shown = [...state.instances.values()].filter(visible);
  shown.sort((a, b) => {
    const x = column.value(a);
    const y = column.value(b);
    const order = typeof x === "string" ? COLLATOR.compare(x, y) : x - y;
    return (order || COLLATOR.compare(a.id, b.id)) * state.sort.dir;
  });
  const order = shown.map((i) => i.id);
  const kept = new Set(order);
  for (const [id, row] of state.rows) {
    const hidden = !kept.has(id);
    if (row.tr.hidden !== hidden) row.tr.hidden = hidden;
  }
  if (order.join() !== state.order.join()) {
    const body = $("instances-body");
    for (const id of order) body.append(state.rows.get(id).tr);
    state.order = order;
  }
  $("empty").hidden = order.length > 0;
  $("empty").firstChild.textContent = state.instances.size ? "No instance matches. " :
    "No tunnel yet. ";
}

function renderStats() {
  const counts = { running: 0, stopped: 0, error: 0 };
  for (const instance of state.instances.values()) counts[instance.status] += 1;
  const last = state.total[state.total.length - 1] || { in: 0, out: 0 };
  const items = [["instances", String(state.instances.size)], ["running", String(counts.running)],
                 ["stopped", String(counts.stopped)], ["error", String(counts.error)],
                 ["in", fmt.rate(last.in)], ["out", fmt.rate(last.out)]];
  const list = $("stats");
  if (list.children.length !== items.length * 2) {
    list.replaceChildren(...items.flatMap(([name]) => {
      const dt = document.createElement("dt");
      dt.textContent = name;
      const dd = document.createElement("dd");
      dd.dataset.stat = name;
      return [dt, dd];
    }));
  }
  for (const [name, value] of items) list.querySelector(`[data-stat="${name}"]`).textContent = value;
}

// -- one instance --------------------------------------------------------------------------

function route() {
  const id = location.hash.replace(/^#\/?/, "");
  if (!state.api) return;
  if (id && state.instances.size && !state.instances.has(id)) {
    location.hash = "#/";
    return;
  }
  state.selected = id || null;
  if (state.selected) {
    show(["detail"]);
    openDetail(state.selected);
  } else {
    show(["overview", "master"]);
  }
  schedule();
}

async function openDetail(id) {
  $("detail-error").textContent = "";
  state.formsFor = null;
  const instance = state.instances.get(id);
  if (instance) fillForms(instance);
  state.chartsAt = 0;
  $("logs").replaceChildren();
  try {
    const kept = await state.api.request("GET", `/instances/${id}/logs`);
    const live = state.logs.get(id) || [];
    state.logs.set(id, [...kept.logs, ...live].slice(-LOG_LINES));
  } catch (e) {
    // no log yet
  }
  if (state.selected === id) {
    $("logs").replaceChildren();
    for (const line of state.logs.get(id) || []) appendLogLine(line);
  }
  $("detail-title").focus();
}

function fillForms(instance) {
  state.formsFor = instance.id; // filled once per visit: an edit in progress is kept
  $("alias-input").value = instance.alias || "";
  $("tags-input").value = fmt.tags(instance.tags).join("\n");
  $("restart-input").checked = Boolean(instance.restart);
  $("url-input").value = instance.url;
}

function renderDetail() {
  const instance = state.instances.get(state.selected);
  if (!instance) return;
  $("detail-title").textContent = instance.alias || instance.id;
  $("detail-url").textContent = masked(instance.url);
  const fields = [
    ["id", instance.id], ["type", instance.type], ["mode", instance.mode || "—"],
    ["pool over", instance.transport || "—"],
    ["status", instance.status + (instance.error ? ` — ${instance.error}` : "")],
    ["session", instance.tunnel || "—"], ["ping", fmt.ping(instance.ping)],
    ["pool", String(instance.pool_size)], ["connections", String(instance.connections)],
    ["UDP sessions", String(instance.udp_sessions)], ["refused", String(instance.refused)],
    ["in now", fmt.rate(rateOf(instance.id, "in"))], ["out now", fmt.rate(rateOf(instance.id, "out"))],
    ["TCP in / out", `${fmt.bytes(instance.tcp_in)} / ${fmt.bytes(instance.tcp_out)}`],
    ["UDP in / out", `${fmt.bytes(instance.udp_in)} / ${fmt.bytes(instance.udp_out)}`],
    ["uptime", instance.status === "running" ? fmt.duration(instance.uptime) : "—"],
    ["restarts", String(instance.restarts)], ["restart policy", instance.restart ? "on" : "off"],
    ["created", instance.created_at], ["pid", instance.pid === null ? "—" : String(instance.pid)],
    ["tags", fmt.tags(instance.tags).join(", ") || "—"],
  ];
  const list = $("detail-fields");
  if (list.children.length !== fields.length) {
    list.replaceChildren(...fields.map(([name]) => {
      const group = document.createElement("div");
      const dt = document.createElement("dt");
      dt.textContent = name;
      const dd = document.createElement("dd");
      dd.dataset.field = name;
      group.append(dt, dd);
      return group;
    }));
  }
  for (const [name, value] of fields) setText(list.querySelector(`[data-field="${name}"]`), value);
  const running = instance.status === "running";
  for (const button of $("detail-actions").querySelectorAll("button")) {
    const action = button.dataset.action;
    if (!button.dataset.busy) {
      button.disabled = (action === "start" && running) || (action === "stop" && !running);
    }
  }
}

function renderDetailChart() {
  drawRates($("detail-chart"), state.series.get(state.selected) || [],
            { window: Number($("detail-window").value) * 1000 });
}

function appendLogLine(line) {
  const list = $("logs");
  const item = document.createElement("li");
  item.className = `level-${String(line.level).toLowerCase()}`;
  const time = document.createElement("time");
  time.textContent = String(line.time).replace("T", " ").replace("Z", "").slice(11, 19);
  const level = document.createElement("span");
  level.className = "level";
  level.textContent = String(line.level).toUpperCase();
  const message = document.createElement("span");
  message.textContent = line.message;
  item.append(time, level, message);
  list.append(item);
  while (list.children.length > LOG_LINES) list.firstChild.remove();
  list.scrollTop = list.scrollHeight;
}

async function change(body, button) {
  const id = state.selected;
  $("detail-error").textContent = "";
  if (button) {
    button.disabled = true;
    button.dataset.busy = "1";
  }
  try {
    const instance = await state.api.request("PUT", `/instances/${id}`, body);
    upsert(instance);
    return instance;
  } catch (e) {
    $("detail-error").textContent = e.message;
    return null;
  } finally {
    if (button) delete button.dataset.busy;
    schedule();
  }
}

async function onAction(event) {
  const button = event.target.closest("button[data-action]");
  if (!button) return;
  const id = state.selected;
  const instance = state.instances.get(id);
  const action = button.dataset.action;
  const name = instance ? instance.alias || instance.id : id;
  if (action === "delete") {
    if (!(await confirmed(`Delete ${name}? Its process stops and it is forgotten.`))) return;
    try {
      await state.api.request("DELETE", `/instances/${id}`);
      remove(id);
      location.hash = "#/";
    } catch (e) {
      $("detail-error").textContent = e.message;
    }
    return;
  }
  if (action === "reset" && !(await confirmed(`Reset the traffic counters of ${name}?`))) return;
  await change({ action }, button);
}

function confirmed(text) {
  const dialog = $("confirm");
  $("confirm-text").textContent = text;
  dialog.returnValue = "";
  dialog.showModal();
  $("confirm-yes").focus();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "yes"), { once: true });
  });
}

// -- create --------------------------------------------------------------------------------

function createFields() {
  const form = $("create-form");
  const data = Object.fromEntries(new FormData(form).entries());
  data.restart = form.elements.restart.checked;
  return data;
}

function refreshCreate() {
  const fields = createFields();
  const client = fields.scheme === "client";
  const labels = client ? ["0 — automatic", "1 — single-end", "2 — tunnel"] :
    ["0 — automatic", "1 — reverse", "2 — forward"];
  [...$("create-form").elements.mode.options].forEach((option, i) => {
    option.textContent = labels[i];
  });
  $("create-form").elements.tls.previousSibling.textContent =
    client ? "TLS it accepts at least" : "TLS";
  $("create-preview").textContent = masked(buildUrl(fields));
}

function openCreate() {
  $("create-form").reset();
  fillNodes();
  $("create-error").textContent = "";
  refreshCreate();
  $("create").showModal();
  $("create-form").elements.tunnel.focus();
}

// In a fleet, the node to run a new tunnel on: this master first; offline ones are listed
// (a create for one is queued) but marked.
function fillNodes() {
  const store = state.info && state.info.store;
  const nodes = (store && store.nodes) || [];
  const select = $("create-form").elements.node;
  select.replaceChildren();
  for (const node of nodes) {
    const name = node.self ? "this master" : (node.alias || node.id);
    select.append(new Option(node.online ? name : `${name} (offline)`, node.self ? "" : node.id));
  }
  $("create-node-label").hidden = nodes.length < 2;
}

async function submitCreate(event) {
  event.preventDefault();
  const fields = createFields();
  const body = { url: buildUrl(fields), restart: fields.restart };
  if (fields.node) body.node = fields.node;
  if (fields.alias.trim()) body.alias = fields.alias.trim();
  const tags = parseTags(fields.tags);
  if (Object.keys(tags).length) body.tags = tags;
  $("create-error").textContent = "";
  $("create-submit").disabled = true;
  try {
    const instance = await state.api.request("POST", "/instances", body);
    upsert(instance);
    $("create").close();
    location.hash = `#/${instance.id}`;
  } catch (e) {
    $("create-error").textContent = e.message;
  } finally {
    $("create-submit").disabled = false;
    schedule();
  }
}

// -- the master ----------------------------------------------------------------------------

function renderMaster() {
  const info = state.info;
  if (!info) return;
  $("master-name").textContent = `${info.alias || "master"} · nodepass ${info.version}`;
  renderStore(info.store);
  const base = API_BASE;
  const fields = [
    ["version", info.version], ["master id", info.master_id || "—"],
    ["uptime", fmt.duration(info.uptime + (Date.now() - state.infoAt) / 1000)],
    ["started", info.started_at], ["platform", info.platform],
    ["state directory", info.state_dir || "— (persist=0)"],
    ["state kept in", storeText(info.store)],
    ...(info.store && info.store.nodes && info.store.nodes.length > 1
      ? [["fleet", info.store.nodes.map((n) => `${n.alias || n.id}${n.self ? " (this master)" : ""}: ${n.online ? "online" : "offline"}`).join(", ")]]
      : []),
    ["API", info.bases ? info.bases.seed : base],
    ["NodePass dialect", info.bases ? info.bases.nodepass : "—"],
  ];
  const list = $("master-fields");
  list.replaceChildren();
  for (const [name, value] of fields) {
    const dt = document.createElement("dt");
    dt.textContent = name;
    const dd = document.createElement("dd");
    dd.textContent = String(value);
    list.append(dt, dd);
  }
  for (const [name, href, note] of [
    ["OpenAPI", `${base}/openapi.json`, ""], ["API documentation", `${base}/docs`, ""],
    ["Prometheus metrics", `${base}/metrics`, " (send the key as X-API-Key)"]]) {
    const dt = document.createElement("dt");
    dt.textContent = name;
    const dd = document.createElement("dd");
    const a = document.createElement("a");
    a.href = new URL(href, location.href).href;
    a.textContent = a.href;
    dd.append(a, document.createTextNode(note));
    list.append(dt, dd);
  }
}

function storeText(store) {
  if (!store) return "—";
  if (store.store === "postgresql") return `PostgreSQL ${store.database} (${store.status})`;
  return store.store === "memory" ? "memory (persist=0)" : "SQLite";
}

// While the fleet's database is away the page says so, with what still works.
function renderStore(store) {
  const banner = $("store-banner");
  const degraded = Boolean(store && store.status === "degraded");
  banner.hidden = !degraded;
  if (degraded) {
    banner.textContent = `The fleet database is unreachable (${store.error || "no answer"}). ` +
      "This master's tunnels keep running and its changes are written when the database is " +
      "back; creating, deleting, and changing other masters' tunnels wait until then.";
  }
}

async function refreshInfo() {
  if (!state.api) return;
  try {
    state.info = await state.api.request("GET", "/info");
    state.infoAt = Date.now();
    renderMaster();
  } catch (e) {
    // the stream says when the master is away
  }
}

// -- wiring ----------------------------------------------------------------------------------

function wire() {
  $("login-form").addEventListener("submit", login);
  $("logout-button").addEventListener("click", logout);
  $("new-button").addEventListener("click", openCreate);
  $("empty-new").addEventListener("click", openCreate);
  $("back-button").addEventListener("click", () => { location.hash = "#/"; });
  $("create-cancel").addEventListener("click", () => $("create").close());
  $("create-form").addEventListener("input", refreshCreate);
  $("create-form").addEventListener("submit", submitCreate);
  $("detail-actions").addEventListener("click", onAction);
  $("detail-window").addEventListener("change", () => {
    state.chartsAt = 0;
    schedule();
  });
  $("filter-text").addEventListener("input", (e) => { state.filter.text = e.target.value; schedule(); });
  $("filter-status").addEventListener("change", (e) => { state.filter.status = e.target.value; schedule(); });
  $("filter-tag").addEventListener("change", (e) => { state.filter.tag = e.target.value; schedule(); });
  $("filters").addEventListener("submit", (e) => e.preventDefault());
  $("alias-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    await change({ alias: $("alias-input").value });
  });
  $("tags-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    await change({ tags: parseTags($("tags-input").value) });
  });
  $("restart-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    await change({ restart: $("restart-input").checked });
  });
  $("url-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const instance = await change({ url: $("url-input").value.trim() });
    if (instance) fillForms(instance);
  });
  window.addEventListener("hashchange", route);
  setInterval(refreshInfo, 2000); // the fleet database's state, the nodes: said within 2 s
  setInterval(schedule, 5000); // rates fade to zero when reports stop
  $("detail-title").tabIndex = -1;
  renderHead();
}

wire();
begin();
