// chatmesh chat page: the client protocol over WebSocket, no build step.
//
// The page is served by a server's admin port. It learns the cluster from GET /servers there (each
// server's ws_url, up/down, and which one is "self") and talks WebSocket to the servers' ws ports, one
// JSON message per text frame.
//
// - Joining a room on another server: the server answers `route` with `wsurl`; the page opens a
//   WebSocket there and sends `movejoin` (answered by `serverchange`), as the Java client does over TCP.
// - When the connection drops unexpectedly, the page asks the live servers' /servers and /clients which
//   servers are up, waits until the dead one is declared down (its identities are released then), and logs
//   in again under the same name on another live server. If the name is held by someone else, or no
//   server is reachable, it says so plainly.
//
// Everything a server or another person sent is put in the page as text (textContent), never as HTML.
"use strict";

const FETCH_TIMEOUT_MS = 1500;      // one HTTP request to an admin port
const CONNECT_TIMEOUT_MS = 4000;    // opening a WebSocket
const REPLY_TIMEOUT_MS = 12000;     // an answer to newidentity/movejoin (a server may wait for a coordinator)
const RECONNECT_FOR_MS = 30000;     // how long to keep trying to get back in after losing the server
const RETRY_MS = 500;               // between reconnection rounds
const LIST_EVERY_MS = 4000;         // rooms are refreshed this often (rooms elsewhere are not pushed)
const MAX_MESSAGES = 500;           // lines kept on screen
const NAME_RE = /^[A-Za-z][A-Za-z0-9]{2,15}$/;

const state = {
  servers: [],          // last /servers answer: {server_id, ws_url, admin_url, up, self}
  identity: null,
  room: null,
  owner: "",
  members: [],
  rooms: [],
  serverId: null,       // the server this page is connected to
  ws: null,
  phase: "login",       // login | joining | chat | moving | reconnecting | lost
  lastOwnRoomsRefresh: 0,
};

function $(id) { return document.getElementById(id); }

function text(tag, value, cls) {
  const node = document.createElement(tag);
  node.textContent = value;
  if (cls) node.className = cls;
  return node;
}

function setStatus(label, kind) {
  const status = $("status");
  status.textContent = label;
  status.className = `status status-${kind}`;
  status.dataset.state = state.phase;
}

function notice(message, kind) {
  const box = $("notice");
  if (!message) { box.hidden = true; box.textContent = ""; box.dataset.kind = ""; return; }
  box.hidden = false;
  box.textContent = message;
  box.className = `notice notice-${kind || "info"}`;
  box.dataset.kind = kind || "info";
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

// --- the conversation view -----------------------------------------------------------------------

function nearBottom(list) {
  return list.scrollHeight - list.scrollTop - list.clientHeight < 80;
}

function addLine(node) {
  const list = $("messages");
  const follow = nearBottom(list);
  list.appendChild(node);
  while (list.children.length > MAX_MESSAGES) list.removeChild(list.firstChild);
  if (follow || node.classList.contains("mine")) list.scrollTop = list.scrollHeight;
}

function addMessage(identity, content, mine) {
  const item = document.createElement("li");
  item.className = mine ? "msg mine" : "msg";
  item.dataset.identity = identity;
  item.appendChild(text("span", identity, "author"));
  item.appendChild(text("span", content, "body"));
  const when = new Date();
  item.appendChild(text("time", when.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }), "when"));
  addLine(item);
}

function addEvent(message) {
  addLine(text("li", message, "event"));
}

function drawRooms() {
  const list = $("rooms");
  list.replaceChildren();
  const rooms = [...state.rooms].sort((a, b) => {
    const hall = (r) => (r.startsWith("MainHall-") ? 0 : 1);
    return hall(a) - hall(b) || a.localeCompare(b);
  });
  for (const room of rooms) {
    const item = document.createElement("li");
    const button = text("button", room, room === state.room ? "room current" : "room");
    button.type = "button";
    button.dataset.room = room;
    button.disabled = room === state.room;
    button.addEventListener("click", () => joinRoom(room));
    item.appendChild(button);
    list.appendChild(item);
  }
}

function drawMembers() {
  $("members-room").textContent = state.room || "—";
  const list = $("members");
  list.replaceChildren();
  for (const member of state.members) {
    const item = text("li", member, member === state.identity ? "member me" : "member");
    if (member === state.owner) {
      item.classList.add("owner");
      item.appendChild(text("span", "owner", "badge"));
    }
    list.appendChild(item);
  }
  $("delete-button").hidden = !(state.owner && state.owner === state.identity);
}

function drawRoom() {
  $("room").textContent = state.room || "—";
  $("server").textContent = state.serverId ? `on ${state.serverId}` : "";
  $("me").textContent = state.identity || "";
  $("me").hidden = !state.identity;
  drawRooms();
  drawMembers();
}

// --- WebSocket plumbing -----------------------------------------------------------------------------

function openSocket(url) {
  return new Promise((resolve, reject) => {
    let ws;
    try { ws = new WebSocket(url); } catch (error) { reject(error); return; }
    const timer = setTimeout(() => { ws.close(); reject(new Error("timed out")); }, CONNECT_TIMEOUT_MS);
    ws.onopen = () => { clearTimeout(timer); resolve(ws); };
    ws.onerror = () => { clearTimeout(timer); reject(new Error("cannot connect")); };
  });
}

// Send `message` on a fresh socket and wait for the first answer of type `type` (others are kept).
function firstAnswer(ws, message, type) {
  return new Promise((resolve, reject) => {
    const early = [];
    const timer = setTimeout(() => finish(null, new Error("no answer in time")), REPLY_TIMEOUT_MS);
    function finish(answer, error) {
      clearTimeout(timer);
      ws.onmessage = null;
      ws.onclose = null;
      if (error) reject(error); else resolve({ answer, early });
    }
    ws.onmessage = (event) => {
      let parsed;
      try { parsed = JSON.parse(event.data); } catch { return; }
      if (parsed.type === type) finish(parsed); else early.push(parsed);
    };
    ws.onclose = () => finish(null, new Error("closed"));
    ws.send(JSON.stringify(message));
  });
}

function adopt(ws, serverId, early) {
  state.ws = ws;
  state.serverId = serverId;
  ws.onmessage = (event) => {
    let parsed;
    try { parsed = JSON.parse(event.data); } catch { return; }
    receive(parsed);
  };
  ws.onclose = () => { if (state.ws === ws) lost(serverId); };
  for (const message of early) receive(message);
  send({ type: "who" });
  send({ type: "list" });
}

function send(message) {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify(message));
}

function serverByUrl(url) {
  return state.servers.find((s) => s.ws_url === url) || null;
}

// --- protocol ---------------------------------------------------------------------------------------

function receive(message) {
  switch (message.type) {
    case "roomchange": return onRoomChange(message);
    case "roomlist":
      state.rooms = Array.isArray(message.rooms) ? message.rooms.map(String) : [];
      return drawRooms();
    case "roomcontents":
      if (message.roomid !== state.room) return undefined;
      state.members = Array.isArray(message.identities) ? message.identities.map(String) : [];
      state.owner = String(message.owner || "");
      return drawMembers();
    case "message":
      return addMessage(String(message.identity), String(message.content), false);
    case "createroom":
      if (message.approved === "true") addEvent(`Room ${message.roomid} is created.`);
      else notice(`Could not create room ${message.roomid}: the name is taken or not valid, or you already own a room.`, "warn");
      return send({ type: "list" });
    case "deleteroom":
      if (message.approved === "true") addEvent(`Room ${message.roomid} is deleted.`);
      else notice(`Could not delete room ${message.roomid}.`, "warn");
      return send({ type: "list" });
    case "route": return follow(message);
    case "error":
      return notice(`The server says: ${String(message.reason)}`, "warn");
    default:
      return undefined;
  }
}

function onRoomChange(m) {
  const who = String(m.identity), former = String(m.former), room = String(m.roomid);
  if (who === state.identity) {
    if (former === room) {
      notice(`Could not join ${room}: it does not exist, or you own the room you are in.`, "warn");
      return;
    }
    if (room === "") return;
    state.room = room;
    state.members = [];
    state.owner = "";
    addEvent(former ? `You moved from ${former} to ${room}.` : `You are in ${room}.`);
    drawRoom();
    send({ type: "who" });
    send({ type: "list" });
    return;
  }
  if (room === "") addEvent(`${who} has quit.`);
  else if (former === "") addEvent(`${who} joined ${room}.`);
  else addEvent(`${who} moved from ${former} to ${room}.`);
  send({ type: "who" });
}

async function follow(route) {
  // Another server hosts the room: reconnect there and movejoin (the old server closes nothing itself).
  const url = route.wsurl;
  const former = state.room;
  const old = state.ws;
  state.ws = null;
  state.phase = "moving";
  if (old) old.close();
  if (!url) { lost(state.serverId, "the server did not say where that room's WebSocket port is"); return; }
  setStatus("switching server…", "wait");
  try {
    const ws = await openSocket(url);
    const { answer, early } = await firstAnswer(
      ws, { type: "movejoin", identity: state.identity, former, roomid: String(route.roomid) }, "serverchange");
    if (answer.approved !== "true") throw new Error("refused");
    state.phase = "chat";
    adopt(ws, String(answer.serverid), early);
    addEvent(`You switched to server ${answer.serverid}.`);
    notice(null);
    setStatus(`connected to ${answer.serverid}`, "on");
  } catch (error) {
    lost(state.serverId, `Server change failed (${error.message})`);
  }
}

// --- login and getting back in ------------------------------------------------------------------------

async function refreshServers() {
  const sources = [window.location.origin, ...state.servers.map((s) => s.admin_url)];
  for (const source of [...new Set(sources)]) {
    try {
      const answer = await getJSON(`${source}/servers`);
      state.servers = answer.servers;
      return source;
    } catch { /* that admin port is gone too: ask the next */ }
  }
  return null;
}

async function login(identity) {
  $("login-error").hidden = true;
  if (!NAME_RE.test(identity)) {
    showLoginError("A name is 3 to 16 letters or digits, starting with a letter.");
    return;
  }
  if (!state.servers.length) await refreshServers();
  const own = state.servers.find((s) => s.self) || state.servers.find((s) => s.up);
  if (!own) { showLoginError("Cannot reach the cluster: no server answered."); return; }
  state.phase = "joining";
  setStatus("connecting…", "wait");
  $("login-button").disabled = true;
  try {
    const ws = await openSocket(own.ws_url);
    const { answer, early } = await firstAnswer(ws, { type: "newidentity", identity }, "newidentity");
    if (answer.approved !== "true") {
      ws.close();
      state.phase = "login";
      setStatus("not connected", "off");
      showLoginError(`The name ${identity} is already in use. Pick another one.`);
      return;
    }
    state.identity = identity;
    state.phase = "chat";
    $("login").hidden = true;
    $("chat").hidden = false;
    adopt(ws, own.server_id, early);
    drawRoom();
    setStatus(`connected to ${own.server_id}`, "on");
    $("text").focus();
  } catch (error) {
    state.phase = "login";
    setStatus("not connected", "off");
    showLoginError(`Could not connect to ${own.server_id}: ${error.message}.`);
  } finally {
    $("login-button").disabled = false;
  }
}

function showLoginError(message) {
  $("login-error").textContent = message;
  $("login-error").hidden = false;
}

function sleep(ms) { return new Promise((resolve) => setTimeout(resolve, ms)); }

// Who holds `identity` now, as the live servers see it: a server id, or null.
async function holder(identity, admin) {
  try {
    const answer = await getJSON(`${admin}/clients`);
    const found = answer.clients.find((c) => c.identity === identity);
    return found ? found.server_id : null;
  } catch { return null; }
}

async function lost(deadServer, reason) {
  if (state.phase === "reconnecting" || state.phase === "lost") return;
  state.ws = null;
  state.phase = "reconnecting";
  const identity = state.identity;
  setStatus("reconnecting…", "wait");
  notice(`${reason || `Lost the connection to server ${deadServer}`}. Reconnecting to another server as ${identity}…`, "warn");
  addEvent(`Connection to ${deadServer} lost.`);
  const deadline = Date.now() + RECONNECT_FOR_MS;
  let refusedBy = null;
  while (Date.now() < deadline) {
    const source = await refreshServers();
    // Other live servers first; the old one too if it still answers (it may have dropped only us).
    const live = state.servers.filter((s) => s.up && s.server_id !== deadServer)
      .concat(state.servers.filter((s) => s.up && s.server_id === deadServer));
    if (source) {
      // Once the cluster has declared the old server down, its hold on the name is released: a holder on
      // another server is someone else.
      const owner = await holder(identity, source);
      if (owner && owner !== deadServer) {
        giveUp(`Cannot take your name back: ${identity} is now used by someone else (on ${owner}). ` +
               "Reload the page to join under another name.");
        return;
      }
      for (const server of live) {
        try {
          const ws = await openSocket(server.ws_url);
          const { answer, early } = await firstAnswer(ws, { type: "newidentity", identity }, "newidentity");
          if (answer.approved !== "true") { refusedBy = server.server_id; ws.close(); continue; }
          state.phase = "chat";
          state.room = null;
          adopt(ws, server.server_id, early);
          drawRoom();
          notice(`Reconnected to server ${server.server_id} as ${identity}.`, "ok");
          addEvent(`Reconnected to ${server.server_id}.`);
          setStatus(`connected to ${server.server_id}`, "on");
          return;
        } catch { /* that server is not answering either: try the next */ }
      }
    }
    await sleep(RETRY_MS);
  }
  if (refusedBy) {
    giveUp(`Cannot take your name back: the cluster refused ${identity} (it is still held, or taken by someone ` +
           "else). Reload the page to join again.");
  } else {
    giveUp("No server of the cluster is reachable. Reload the page to try again.");
  }
}

function giveUp(message) {
  state.phase = "lost";
  setStatus("disconnected", "off");
  notice(message, "error");
  addEvent(message);
  $("text").disabled = true;
  $("send").disabled = true;
}

// --- user actions -------------------------------------------------------------------------------------

function joinRoom(room) {
  if (room && room !== state.room) send({ type: "joinroom", roomid: room });
  document.body.classList.remove("show-side");
}

function wire() {
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    login($("identity").value.trim());
  });
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = $("text");
    const content = input.value;
    if (!content.trim() || state.phase !== "chat") return;
    send({ type: "message", content });
    addMessage(state.identity, content, true);  // the server never echoes one's own lines
    input.value = "";
  });
  $("create-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const room = $("new-room").value.trim();
    if (!NAME_RE.test(room)) {
      notice("A room name is 3 to 16 letters or digits, starting with a letter.", "warn");
      return;
    }
    send({ type: "createroom", roomid: room });
    $("new-room").value = "";
  });
  $("delete-button").addEventListener("click", () => {
    if (state.room) send({ type: "deleteroom", roomid: state.room });
  });
  $("refresh").addEventListener("click", () => send({ type: "list" }));
  $("toggle-side").addEventListener("click", () => document.body.classList.toggle("show-side"));
  setInterval(() => { if (state.phase === "chat") send({ type: "list" }); }, LIST_EVERY_MS);
  window.addEventListener("beforeunload", () => { if (state.ws) send({ type: "quit" }); });
}

async function start() {
  wire();
  const source = await refreshServers();
  const own = state.servers.find((s) => s.self);
  $("login-server").textContent = own ? `You will join through server ${own.server_id}.`
    : source ? "" : "This page's server is not answering.";
}

start();
