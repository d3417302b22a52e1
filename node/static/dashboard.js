// chatmesh live dashboard: polls GET /cluster on the server that served the page (every POLL_MS) and
// GET /status on the other servers that are up (for their message counters), then redraws.
//
// If the page's own server dies (e.g. the coordinator was killed and this page came from it), the page
// follows another server's view: every server's /cluster answers with the whole cluster as it sees it,
// and the admin endpoints allow cross-origin reads from the cluster's own dashboards.
//
// Data from the servers (room names, identities, event text) is only ever put in the page as text, never
// as HTML.
"use strict";

const POLL_MS = 500;             // how often the view is refreshed
const FETCH_TIMEOUT_MS = 1200;   // one request; a stopped server must not stall the page
const RATE_WINDOW_MS = 3000;     // messages/s is averaged over this window
const SPARK_POINTS = 120;        // 60 s of history at POLL_MS
const MAX_EVENTS = 60;           // events kept on screen
const MAX_ROOMS = 200;           // rooms listed on screen
const STALE_MS = 2500;           // "stale" once no answer for this long

const state = {
  origin: window.location.origin,
  sources: [],                   // admin URLs of every server, from the last view
  source: null,                  // whose view is shown (server id)
  view: null,                    // last /cluster answer
  lastOkAt: 0,
  samples: new Map(),            // server id -> [{t, v}] of messages_relayed
  seesCoordinator: new Map(),    // server id -> {coordinator, term} from its /status
  spark: [],
  events: [],                    // {time, text, tag, kind}
  eventKeys: new Set(),
  cards: new Map(),              // server id -> card element
  ownId: null,                   // id of the server that served this page, once it answered
};

function $(id) { return document.getElementById(id); }

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

// Sets text and flashes the element when the value really changed.
function setText(node, text) {
  text = String(text);
  if (node.textContent === text) return;
  const first = node.dataset.seen === undefined;
  node.textContent = text;
  node.dataset.seen = "1";
  if (!first) {
    node.classList.remove("changed");
    void node.offsetWidth; // restart the animation
    node.classList.add("changed");
  }
}

async function getJSON(url) {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), FETCH_TIMEOUT_MS);
  try {
    const response = await fetch(url, { signal: controller.signal, cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    return await response.json();
  } finally {
    clearTimeout(timer);
  }
}

// The page's own server first, then the others the last view listed.
async function fetchView() {
  const candidates = [state.origin, ...state.sources.filter((url) => url !== state.origin)];
  for (const base of candidates) {
    try {
      return { view: await getJSON(`${base}/cluster`), base };
    } catch (_) {
      // next candidate
    }
  }
  return { view: null, base: null };
}

function hhmmss(seconds) {
  const d = new Date(seconds * 1000);
  const pad = (n, w = 2) => String(n).padStart(w, "0");
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}

function classify(text) {
  if (/\b(down|dead|lost|failed|fenced|unreachable|killed)\b/i.test(text)) return "bad";
  if (/\b(up|back|joined|ready|recovered)\b/i.test(text)) return "good";
  if (/(elect|coordinator|leader|term)/i.test(text)) return "info";
  return "";
}

const SAME_EVENT_S = 10;          // a page-seen event and a server's event with the same text are one

function addEvent(time, text, tag) {
  const key = `${tag}|${time.toFixed(3)}|${text}`;
  if (state.eventKeys.has(key)) return;
  const near = (e) => e.text === text && Math.abs(e.time - time) < SAME_EVENT_S;
  if (tag === "page") {
    if (state.events.some((e) => e.tag !== "page" && near(e))) return; // a server already told
  } else {
    // The server's own record replaces what the page inferred.
    state.events = state.events.filter((e) => {
      const drop = e.tag === "page" && near(e);
      if (drop) state.eventKeys.delete(`${e.tag}|${e.time.toFixed(3)}|${e.text}`);
      return !drop;
    });
  }
  state.eventKeys.add(key);
  state.events.push({ time, text, tag, kind: classify(text) });
  state.events.sort((a, b) => b.time - a.time);
  while (state.events.length > MAX_EVENTS) {
    const dropped = state.events.pop();
    state.eventKeys.delete(`${dropped.tag}|${dropped.time.toFixed(3)}|${dropped.text}`);
  }
}

// Transitions this page saw between two views, so a kill shows even before a server logs it.
function observeTransitions(prev, next) {
  const now = Date.now() / 1000;
  if (!prev) return;
  if (prev.server_id !== next.server_id) {
    addEvent(now, `${prev.server_id} unreachable: showing ${next.server_id}'s view`, "page");
  }
  if (prev.coordinator !== next.coordinator) {
    addEvent(now, `coordinator ${prev.coordinator ?? "none"} → ${next.coordinator ?? "none"}`, "page");
  }
  if (prev.raft.leader !== next.raft.leader) {
    addEvent(now, `Raft leader ${prev.raft.leader ?? "none"} → ${next.raft.leader ?? "none"} (term ${next.raft.term})`, "page");
  }
  const before = new Map(prev.servers.map((s) => [s.server_id, s.up]));
  for (const server of next.servers) {
    const was = before.get(server.server_id);
    if (was === true && !server.up) addEvent(now, `${server.server_id} is down`, "page");
    if (was === false && server.up) addEvent(now, `${server.server_id} is up`, "page");
  }
}

function recordCounter(serverId, value) {
  const now = performance.now();
  let samples = state.samples.get(serverId) || [];
  if (samples.length && value < samples[samples.length - 1].v) samples = []; // restarted: counters reset
  samples.push({ t: now, v: value });
  while (samples.length > 2 && now - samples[0].t > RATE_WINDOW_MS) samples.shift();
  state.samples.set(serverId, samples);
}

function rate(serverId) {
  const samples = state.samples.get(serverId);
  if (!samples || samples.length < 2) return null;
  const first = samples[0];
  const last = samples[samples.length - 1];
  if (performance.now() - last.t > RATE_WINDOW_MS) return null; // no fresh data
  const seconds = (last.t - first.t) / 1000;
  return seconds > 0 ? (last.v - first.v) / seconds : null;
}

// Other servers' counters (and whom they take as coordinator); failures just leave gaps.
async function pollPeers(view) {
  const peers = view.servers.filter((s) => s.up && s.server_id !== view.server_id);
  const answers = await Promise.allSettled(peers.map((s) => getJSON(`${s.admin_url}/status`)));
  answers.forEach((answer, i) => {
    const id = peers[i].server_id;
    if (answer.status === "fulfilled") {
      recordCounter(id, answer.value.counters ? answer.value.counters.messages_relayed : 0);
      state.seesCoordinator.set(id, { coordinator: answer.value.coordinator, term: answer.value.raft.term });
    } else {
      state.seesCoordinator.delete(id);
    }
  });
  for (const server of view.servers) {
    if (!server.up) state.seesCoordinator.delete(server.server_id);
  }
}

function card(server) {
  let node = state.cards.get(server.server_id);
  if (node) return node;
  node = el("div", { class: "card", id: `server-${server.server_id}` },
    el("div", { class: "card-head" },
      el("span", { class: "dot" }),
      el("span", { class: "sid" }, server.server_id),
      el("span", { class: "badges" })),
    el("div", { class: "state" }),
    el("dl", { class: "nums" },
      el("div", {}, el("dt", {}, "clients"), el("dd", { class: "clients" }, "0")),
      el("div", {}, el("dt", {}, "rooms"), el("dd", { class: "rooms" }, "0")),
      el("div", {}, el("dt", {}, "msg/s"), el("dd", { class: "rate" }, "—"))),
    el("div", { class: "meta addr" }),
    el("div", { class: "meta sees" }));
  state.cards.set(server.server_id, node);
  $("servers").append(node);
  return node;
}

function renderServers(view) {
  for (const server of view.servers) {
    const node = card(server);
    const role = server.coordinator ? "coordinator" : (server.up ? server.role : "down");
    node.classList.toggle("down", !server.up);
    node.classList.toggle("coordinator", server.coordinator);
    node.dataset.up = String(server.up);
    node.dataset.role = role;
    const badges = node.querySelector(".badges");
    badges.replaceChildren();
    if (server.coordinator) badges.append(el("span", { class: "badge coord" }, "coordinator"));
    if (server.raft_leader) badges.append(el("span", { class: "badge leader" }, "raft leader"));
    if (server.self) badges.append(el("span", { class: "badge self" }, "this view"));
    setText(node.querySelector(".state"), server.up ? `up · ${role}` : "down");
    setText(node.querySelector(".clients"), server.clients);
    setText(node.querySelector(".rooms"), server.rooms);
    const r = server.up ? rate(server.server_id) : null;
    node.querySelector(".rate").textContent = r === null ? "—" : r.toFixed(1);
    const addr = node.querySelector(".addr");
    addr.replaceChildren(`${server.host}:${server.clients_port} · priority ${server.priority} · `,
      el("a", { href: `${server.admin_url}/` }, "admin"));
    const sees = state.seesCoordinator.get(server.server_id);
    const seesText = server.self
      ? `sees coordinator ${view.coordinator ?? "none"} · term ${view.raft.term}`
      : sees ? `sees coordinator ${sees.coordinator ?? "none"} · term ${sees.term}` : "";
    node.querySelector(".sees").textContent = server.up ? seesText : "";
  }
}

function renderRooms(view) {
  const rows = view.rooms.slice(0, MAX_ROOMS).map((room) => el("tr", {},
    el("td", {}, room.room_id),
    el("td", {}, room.server_id),
    el("td", {}, room.owner || "—"),
    el("td", { class: "num" }, room.member_count === null ? "—" : String(room.member_count))));
  $("rooms").replaceChildren(...rows);
  const more = view.rooms.length - rows.length;
  $("rooms-more").textContent = more > 0 ? `+ ${more} more rooms` : "";
}

function renderEvents() {
  const list = $("events");
  if (!state.events.length) {
    list.replaceChildren(el("li", { class: "empty" }, "no events yet"));
    return;
  }
  list.replaceChildren(...state.events.map((e) => el("li", { class: e.kind },
    el("time", {}, hhmmss(e.time)),
    el("span", { class: "tag" }, e.tag),
    el("span", { class: "text" }, e.text))));
}

function renderSpark() {
  const points = state.spark;
  const max = Math.max(1, ...points);
  const step = 240 / (SPARK_POINTS - 1);
  const offset = SPARK_POINTS - points.length;
  $("spark-line").setAttribute("points",
    points.map((v, i) => `${((offset + i) * step).toFixed(1)},${(38 - (v / max) * 34).toFixed(1)}`).join(" "));
}

function render(view) {
  const up = view.servers.filter((s) => s.up);
  const down = view.servers.filter((s) => !s.up);
  setText($("coordinator"), view.coordinator ?? "none");
  setText($("raft-leader"), view.raft.leader ?? "none");
  // Plain text: the commit index moves all the time and must not flash.
  $("raft-term").textContent = `term ${view.raft.term} · commit ${view.raft.commit_index}`;
  setText($("servers-up"), `${up.length} / ${view.servers.length}`);
  setText($("servers-down"), down.length ? `down: ${down.map((s) => s.server_id).join(", ")}` : "all up");
  $("servers-down").classList.toggle("bad", down.length > 0);
  setText($("clients-total"), view.servers.reduce((n, s) => n + s.clients, 0));
  setText($("registry-identities"), `${view.registry.identities} identities in registry`);
  setText($("rooms-total"), view.rooms.length);

  let total = 0;
  let known = false;
  for (const server of up) {
    const r = rate(server.server_id);
    if (r !== null) { total += r; known = true; }
  }
  $("msg-rate").textContent = known ? total.toFixed(1) : "—";
  state.spark.push(known ? total : 0);
  if (state.spark.length > SPARK_POINTS) state.spark.shift();

  renderServers(view);
  renderRooms(view);
  renderEvents();
  renderSpark();
  $("source").textContent = view.server_id;
  $("updated").textContent = hhmmss(Date.now() / 1000);
}

function setConnection() {
  const node = $("connection");
  const age = Date.now() - state.lastOkAt;
  let cls = "conn-live";
  let text = "live";
  if (!state.lastOkAt) { cls = "conn-wait"; text = "connecting…"; }
  else if (age > STALE_MS * 4) { cls = "conn-lost"; text = "no server answers"; }
  else if (age > STALE_MS) { cls = "conn-stale"; text = "stale"; }
  node.className = `conn ${cls}`;
  node.textContent = text;
}

function setBanner(view) {
  const banner = $("banner");
  const ownId = state.ownId;
  let text = "";
  if (!view && state.lastOkAt) text = "No server of the cluster answers.";
  else if (view && ownId && view.server_id !== ownId) {
    text = `${ownId}, which served this page, does not answer: showing ${view.server_id}'s view.`;
  } else if (view && !view.serving) text = `${view.server_id} is not serving clients yet.`;
  banner.hidden = !text;
  banner.textContent = text;
}

async function tick() {
  const { view, base } = await fetchView();
  if (view) {
    if (base === state.origin) state.ownId = view.server_id;
    observeTransitions(state.view, view);
    for (const e of view.events) addEvent(e.time, e.text, view.server_id);
    state.sources = view.servers.map((s) => s.admin_url);
    state.view = view;
    state.lastOkAt = Date.now();
    recordCounter(view.server_id, view.counters.messages_relayed);
    render(view);
  }
  setBanner(view);
  setConnection();
  // After drawing: a stopped peer may take FETCH_TIMEOUT_MS to fail and must not delay what the view shows.
  if (view) await pollPeers(view);
}

async function main() {
  renderEvents();
  for (;;) {
    const started = performance.now();
    try {
      await tick();
    } catch (err) {
      console.error("dashboard refresh failed", err);
    }
    const spent = performance.now() - started;
    await new Promise((resolve) => setTimeout(resolve, Math.max(50, POLL_MS - spent)));
  }
}

main();
