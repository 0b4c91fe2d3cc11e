// flowgate demo canvas: a small collaborative canvas on the stock
// socket.io-client, using only the events of the flow-room contract
// (CONTRACT.md). Written to be read: front-end teams can lift the patterns.
//
// The shape of it:
//   * `state` holds everything the page knows (pods, edges, locks, users,
//     cursors). Socket handlers and UI handlers change `state`, then call a
//     render function for what changed. Nothing is read back from the DOM.
//   * The server stamps `userId`, `socketId` and `timestamp` on what it
//     relays; the page never trusts those fields from its own payloads.
//   * Rate limit: the server allows 20 events/s per user, shared by every
//     event. Cursor and move events are therefore throttled to ~8/s each,
//     leaving room for the lock, unlock and final move of a drag.
//   * Locks: `pod:lock` is emitted with an ack when a drag starts and the pod
//     is moved for the others only once the lock is granted. A gateway that
//     owns locks refuses a taken pod (`error {code: "LOCKED"}` plus a failed
//     ack) and the drag is undone; a gateway that only relays locks grants
//     every lock. `flow:locks` (sent to a joiner by lock-owning gateways)
//     replaces the known locks.
"use strict";

(() => {
  // --- settings ------------------------------------------------------------

  const params = new URLSearchParams(location.search);
  /** The flow every tab of this URL joins. */
  const FLOW_ID = params.get("flow") || "demo";
  /**
   * `?transports=websocket` (or `polling`, or `polling,websocket`) is passed
   * to the client as is. Without it the client's defaults apply: HTTP
   * long-polling first, then an upgrade to WebSocket.
   */
  const TRANSPORTS = params.get("transports")
    ? params.get("transports").split(",").map((t) => t.trim()).filter(Boolean)
    : null;
  /** Cursor and pod-move events are sent at most this often (ms): ~8/s each. */
  const CURSOR_EVERY_MS = 125;
  const MOVE_EVERY_MS = 125;
  /** Pod size in px; must match --pod-w / --pod-h in style.css. */
  const POD_W = 168;
  const POD_H = 76;
  /** How long an event with an ack may wait for it. */
  const ACK_TIMEOUT_MS = 5000;

  const PALETTE = ["#e11d48", "#ea580c", "#ca8a04", "#16a34a", "#0891b2", "#2563eb", "#7c3aed", "#db2777"];
  const NAMES = ["Ada", "Alan", "Grace", "Edsger", "Barbara", "Donald", "Frances", "Ken", "Radia", "Leslie"];
  const POD_TITLES = ["Prompt", "Retriever", "LLM", "Tool call", "Summarise", "Classifier", "Router", "Output"];

  // --- state ---------------------------------------------------------------

  const state = {
    /** Who this tab is: filled at join. */
    me: { userId: null, name: "", color: "#888888" },
    /** socket.io-client's Socket, once joined. */
    socket: null,
    /** podId -> {id, title, position: {x, y}, color, createdBy} */
    pods: new Map(),
    /** edgeId -> {id, source, target} */
    edges: new Map(),
    /** podId -> userId of the holder */
    locks: new Map(),
    /** socketId -> session ({userId, socketId, userName, userColor, joinedAt}) */
    users: new Map(),
    /** socketId -> {x, y} of that session's pointer on the canvas */
    cursors: new Map(),
    /** socketId -> selected pod ids of that session */
    selections: new Map(),
    /** The pod this tab has selected, if any. */
    selected: null,
    /** The drag in progress, if any (see startDrag). */
    drag: null,
    /** Connect mode: null (off), or {source: podId | null}. */
    connect: null,
    /** Connections made after the first (reconnects). */
    reconnects: 0,
    /** Creates pods with distinct default titles. */
    podCounter: 0,
  };

  // --- small helpers -------------------------------------------------------

  const $ = (id) => document.getElementById(id);
  const el = (tag, attrs = {}, ...children) => {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else node.setAttribute(k, v);
    }
    node.append(...children);
    return node;
  };
  const pick = (list) => list[Math.floor(Math.random() * list.length)];
  /** A random id; crypto.randomUUID needs a secure context, plain http on a LAN is not one. */
  const newId = (prefix) => `${prefix}-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`;
  const isNum = (n) => typeof n === "number" && Number.isFinite(n);
  const isPosition = (p) => p && isNum(p.x) && isNum(p.y);

  /**
   * Calls `fn` at most once per `ms`; the last call in a burst is delivered
   * when the interval allows (so the final position is never lost).
   * `.flush()` delivers a pending call now, `.cancel()` drops it.
   */
  function throttle(fn, ms) {
    let last = 0;
    let timer = null;
    let pending = null;
    const flush = () => {
      clearTimeout(timer);
      timer = null;
      if (!pending) return;
      const args = pending;
      pending = null;
      last = Date.now();
      fn(...args);
    };
    const call = (...args) => {
      pending = args;
      const wait = last + ms - Date.now();
      if (wait <= 0) flush();
      else if (!timer) timer = setTimeout(flush, wait);
    };
    call.flush = flush;
    call.cancel = () => {
      clearTimeout(timer);
      timer = null;
      pending = null;
    };
    return call;
  }

  /** A user's display name and colour, from the presence list. */
  function userLook(userId, socketId) {
    const session =
      (socketId && state.users.get(socketId)) ||
      [...state.users.values()].find((s) => s.userId === userId);
    if (session) return { name: session.userName, color: session.userColor };
    if (userId === state.me.userId) return { name: state.me.name, color: state.me.color };
    return { name: userId || "someone", color: "#888888" };
  }

  /** Shows a short message in the corner; errors carry their contract code. */
  function toast(message, { code = null, kind = "info", ms = 5000 } = {}) {
    const node = el("div", { class: `toast ${kind}` });
    if (code) {
      node.dataset.code = code;
      node.append(el("code", { text: code }));
    }
    node.append(document.createTextNode(message));
    $("toasts").append(node);
    setTimeout(() => node.remove(), ms);
  }

  // --- talking to the gateway ----------------------------------------------

  /**
   * Emits with an ack and resolves with it: `{ok: true}` or
   * `{ok: false, code, message}`. A missing ack (disconnected, timeout)
   * resolves as a failure too, so callers have one shape to handle.
   */
  function request(event, data) {
    return new Promise((resolve) => {
      state.socket.timeout(ACK_TIMEOUT_MS).emit(event, data, (err, ack) => {
        if (err) resolve({ ok: false, code: "TIMEOUT", message: `no answer to ${event}` });
        else resolve(ack ?? { ok: true });
      });
    });
  }

  /** Fire and forget: refusals still arrive as `error` events (see below). */
  function send(event, data) {
    state.socket.emit(event, data);
  }

  // Cursors are volatile on both ends: the client drops them while
  // disconnected instead of buffering, and the server never replays them.
  const sendCursor = throttle((position) => state.socket?.volatile.emit("cursor:move", { position }), CURSOR_EVERY_MS);
  const sendMove = throttle((podId, position) => send("pod:move", { podId, position }), MOVE_EVERY_MS);

  async function fetchToken(name) {
    const res = await fetch(`token?user=${encodeURIComponent(name)}`, { cache: "no-store" });
    const body = await res.json().catch(() => ({}));
    if (!res.ok) throw new Error(body.error?.message || `token request failed (${res.status})`);
    return body; // {token, userId, exp}
  }

  /** Refreshes the token five minutes before it expires (`auth:refresh`). */
  function scheduleRefresh(exp) {
    const inMs = Math.max(10_000, exp * 1000 - Date.now() - 5 * 60_000);
    setTimeout(async () => {
      try {
        const { token, exp: next } = await fetchToken(state.me.userId);
        // The next reconnect authenticates with the new token as well.
        state.socket.auth.token = token;
        const ack = await request("auth:refresh", { token });
        if (!ack.ok) toast(ack.message, { code: ack.code, kind: "error" });
        scheduleRefresh(next);
      } catch (e) {
        toast(`token refresh failed: ${e.message}`, { kind: "error" });
      }
    }, inMs);
  }

  /** Connects, wires every contract event, and joins the flow. */
  async function join(name, color) {
    const { token, userId, exp } = await fetchToken(name);
    state.me = { userId, name, color };

    // The one line a front end needs: the stock client, the /flows
    // namespace, the token in the auth payload. Default options unless the
    // page was opened with ?transports=...
    const options = { auth: { token } };
    if (TRANSPORTS) options.transports = TRANSPORTS;
    const socket = io(location.origin + "/flows", options);
    state.socket = socket;
    scheduleRefresh(exp);

    // Connection lifecycle --------------------------------------------------
    socket.on("connect", () => {
      showConnection("connected", "connected");
      showTransport();
      // After a reconnect the client may have been upgraded on the new
      // engine as well; each engine announces its own upgrade.
      socket.io.engine.once("upgrade", showTransport);
      $("socket-id").textContent = socket.id;
      $("reconnects").textContent = String(state.reconnects);
      // A recovered session is still in its flow and has been sent what it
      // missed; a new one must join again, as on first load. (The client
      // leaves `recovered` undefined when the server offers no recovery.)
      const recovered = socket.recovered === true;
      if (state.reconnects > 0) {
        $("recovered").textContent = recovered ? "yes, nothing missed" : "no, new session: re-joined";
        $("recovered").dataset.recovered = String(recovered);
      }
      if (!recovered) joinFlow();
    });
    socket.on("connected", (info) => {
      // {message, userId, serverTime}: the server's view of who we are.
      state.me.userId = info.userId;
    });
    socket.on("disconnect", (reason) => {
      state.reconnects += 1;
      showConnection("disconnected", `disconnected (${reason})`);
      $("transport").textContent = "–";
      $("transport").dataset.transport = "";
      // A drag cannot continue without a connection; the pod stays where it
      // is. (A lock-owning gateway releases our lock if we do not recover.)
      endDrag({ sendFinal: false });
      state.cursors.clear();
      renderCursors();
      if (reason === "io server disconnect") {
        // The server closed us on purpose (e.g. TOKEN_EXPIRED): the client
        // does not reconnect by itself in that case.
        toast("the server closed the connection", { kind: "error" });
      }
    });
    socket.io.on("reconnect_attempt", (n) => showConnection("connecting", `reconnecting (attempt ${n})`));
    socket.on("connect_error", (err) => {
      // Authentication failures carry a contract code in err.data.code.
      const code = err.data?.code;
      let text = code ? `${code}: ${err.message}` : err.message;
      showConnection("error", `cannot connect: ${text}`);
    });

    // Errors: every refused event, with its contract code -------------------
    socket.on("error", (e) => {
      toast(e?.message || "refused", { code: e?.code || "ERROR", kind: "error" });
    });

    // Presence ---------------------------------------------------------------
    socket.on("flow:users", (sessions) => {
      state.users = new Map(sessions.map((s) => [s.socketId, s]));
      renderPresence();
      renderAllPods();
    });
    socket.on("user:joined", (session) => {
      state.users.set(session.socketId, session);
      renderPresence();
    });
    socket.on("user:left", ({ socketId }) => {
      state.users.delete(socketId);
      state.cursors.delete(socketId);
      state.selections.delete(socketId);
      renderPresence();
      renderCursors();
      renderAllPods();
    });

    // Locks --------------------------------------------------------------------
    socket.on("flow:locks", (locks) => {
      state.locks = new Map(locks.map((l) => [l.podId, l.userId]));
      renderAllPods();
    });
    socket.on("pod:locked", ({ podId, userId }) => {
      state.locks.set(podId, userId);
      renderPod(podId);
    });
    socket.on("pod:unlocked", ({ podId }) => {
      // `reason: "released"` means the gateway let go for a holder that
      // left or vanished; either way the pod is free now.
      state.locks.delete(podId);
      renderPod(podId);
    });

    // Pods ---------------------------------------------------------------------
    socket.on("pod:created", ({ pod, userId }) => {
      if (!pod || typeof pod.id !== "string" || !isPosition(pod.position)) return;
      state.pods.set(pod.id, {
        id: pod.id,
        title: String(pod.title ?? "Untitled"),
        position: { x: pod.position.x, y: pod.position.y },
        color: String(pod.color ?? "#888888"),
        // The creator is the server-stamped sender, not a field of the pod.
        createdBy: userId,
      });
      renderPod(pod.id);
    });
    socket.on("pod:updated", ({ podId, updates }) => {
      const pod = state.pods.get(podId);
      if (!pod || !updates) return;
      if (typeof updates.title === "string") pod.title = updates.title;
      renderPod(podId);
    });
    socket.on("pod:moved", ({ podId, position }) => {
      const pod = state.pods.get(podId);
      if (!pod || !isPosition(position) || state.drag?.podId === podId) return;
      pod.position = { x: position.x, y: position.y };
      renderPod(podId);
      renderEdges();
    });
    socket.on("pod:deleted", ({ podId }) => removePod(podId));

    // Edges --------------------------------------------------------------------
    socket.on("edge:created", ({ edge }) => {
      if (!edge || typeof edge.id !== "string") return;
      state.edges.set(edge.id, { id: edge.id, source: edge.source, target: edge.target });
      renderEdges();
    });
    socket.on("edge:deleted", ({ edgeId }) => {
      state.edges.delete(edgeId);
      renderEdges();
    });

    // Cursors and selections ---------------------------------------------------
    socket.on("cursor:updated", ({ socketId, position }) => {
      if (!isPosition(position)) return;
      state.cursors.set(socketId, { x: position.x, y: position.y });
      renderCursors();
    });
    socket.on("selection:changed", ({ socketId, selectedPodIds }) => {
      state.selections.set(socketId, Array.isArray(selectedPodIds) ? selectedPodIds : []);
      renderAllPods();
    });
  }

  async function joinFlow() {
    // Whatever we knew of other sessions belongs to the old connection.
    state.cursors.clear();
    state.selections.clear();
    renderCursors();
    const ack = await request("flow:join", {
      flowId: FLOW_ID,
      userName: state.me.name,
      userColor: state.me.color,
    });
    if (!ack.ok) {
      showConnection("error", `join refused: ${ack.code}`);
      return;
    }
    for (const id of ["new-pod", "connect-mode", "blip"]) $(id).disabled = false;
  }

  // --- rendering ---------------------------------------------------------------

  function showConnection(kind, text) {
    $("conn-state").textContent = text;
    $("conn-state").dataset.state = kind;
  }

  function showTransport() {
    // "polling" or "websocket": the transport the engine uses right now.
    const name = state.socket?.io.engine?.transport?.name ?? "–";
    $("transport").textContent = name;
    $("transport").dataset.transport = name;
  }

  function renderPresence() {
    const list = $("presence");
    const sessions = [...state.users.values()].sort((a, b) => String(a.joinedAt).localeCompare(String(b.joinedAt)));
    list.replaceChildren(
      ...sessions.map((s) => {
        const li = el("li", { "data-user-id": s.userId, "data-socket-id": s.socketId });
        const dot = el("span", { class: "dot" });
        dot.style.background = s.userColor;
        const you = s.socketId === state.socket?.id ? " (you)" : "";
        li.append(dot, el("span", { class: "name", text: s.userName + you }), el("span", { class: "who", text: s.userId }));
        return li;
      }),
    );
    $("presence-count").textContent = String(sessions.length);
  }

  /** Creates or updates the element of one pod from `state`. */
  function renderPod(podId) {
    const pod = state.pods.get(podId);
    let node = document.querySelector(`.pod[data-pod-id="${CSS.escape(podId)}"]`);
    if (!pod) {
      node?.remove();
      return;
    }
    if (!node) {
      node = el("div", { class: "pod", "data-pod-id": pod.id });
      const header = el("div", { class: "pod-header" });
      header.append(
        el("span", { class: "pod-title", title: "Double-click to rename" }),
        el("button", { class: "pod-delete", type: "button", title: "Delete pod", text: "×" }),
      );
      node.append(header, el("div", { class: "pod-meta" }));
      $("pods").append(node);
    }
    node.style.left = `${pod.position.x}px`;
    node.style.top = `${pod.position.y}px`;
    node.style.setProperty("--pod-color", pod.color);
    node.dataset.x = String(Math.round(pod.position.x));
    node.dataset.y = String(Math.round(pod.position.y));
    const title = node.querySelector(".pod-title");
    if (title && title.textContent !== pod.title) title.textContent = pod.title;

    // Locked by someone else: outlined in their colour, not draggable.
    const holder = state.locks.get(podId);
    const lockedByOther = holder !== undefined && holder !== state.me.userId;
    node.classList.toggle("locked", lockedByOther);
    if (holder !== undefined) node.dataset.lockedBy = holder;
    else delete node.dataset.lockedBy;
    node.querySelector(".lock-badge")?.remove();
    if (lockedByOther) {
      const look = userLook(holder);
      node.style.setProperty("--lock-color", look.color);
      const badge = el("span", { class: "lock-badge", title: `Locked: ${look.name} is moving this pod` });
      badge.innerHTML = LOCK_SVG;
      badge.append(document.createTextNode(look.name));
      node.append(badge);
    }
    node.querySelector(".pod-meta").textContent = lockedByOther
      ? `${userLook(holder).name} is moving it`
      : `by ${userLook(pod.createdBy).name}`;

    // Selection: ours (blue outline) and others' (a ring in their colour).
    node.classList.toggle("selected", state.selected === podId);
    const selector = [...state.selections.entries()].find(([sid, ids]) => ids.includes(podId) && state.users.has(sid));
    node.classList.toggle("selected-by-other", Boolean(selector));
    if (selector) node.style.setProperty("--selector-color", state.users.get(selector[0]).userColor);
    node.classList.toggle("dragging", state.drag?.podId === podId && Boolean(state.drag.lock));
    node.classList.toggle("connect-source", state.connect?.source === podId);
    $("empty-hint").hidden = state.pods.size > 0;
  }

  function renderAllPods() {
    for (const id of state.pods.keys()) renderPod(id);
  }

  /** The point where the segment from a pod's centre towards (dx, dy) leaves the pod's box. */
  function boxExit(center, dx, dy) {
    const t = Math.min(dx ? POD_W / 2 / Math.abs(dx) : Infinity, dy ? POD_H / 2 / Math.abs(dy) : Infinity);
    return { x: center.x + dx * t, y: center.y + dy * t };
  }

  /** Redraws every edge (there are few): an arrow from box edge to box edge. */
  function renderEdges() {
    const svg = $("edges");
    svg.querySelectorAll(".edge").forEach((g) => g.remove());
    const ns = "http://www.w3.org/2000/svg";
    for (const edge of state.edges.values()) {
      const a = state.pods.get(edge.source);
      const b = state.pods.get(edge.target);
      if (!a || !b) continue; // an end is not (or no longer) on this canvas
      const ca = { x: a.position.x + POD_W / 2, y: a.position.y + POD_H / 2 };
      const cb = { x: b.position.x + POD_W / 2, y: b.position.y + POD_H / 2 };
      const dx = cb.x - ca.x;
      const dy = cb.y - ca.y;
      if (!dx && !dy) continue;
      const from = boxExit(ca, dx, dy);
      const to = boxExit(cb, -dx, -dy);
      const g = document.createElementNS(ns, "g");
      g.setAttribute("class", "edge");
      g.dataset.edgeId = edge.id;
      for (const cls of ["hit", "visible"]) {
        const line = document.createElementNS(ns, "line");
        line.setAttribute("class", cls);
        line.setAttribute("x1", from.x);
        line.setAttribute("y1", from.y);
        line.setAttribute("x2", to.x);
        line.setAttribute("y2", to.y);
        g.append(line);
      }
      const title = document.createElementNS(ns, "title");
      title.textContent = "Click to delete this edge";
      g.append(title);
      g.addEventListener("click", () => deleteEdge(edge.id));
      svg.append(g);
    }
  }

  /** A small padlock, drawn in the badge's text colour (no emoji font needed). */
  const LOCK_SVG =
    '<svg width="9" height="11" viewBox="0 0 9 11" aria-hidden="true"><rect x="0.5" y="4.5" width="8" height="6" rx="1.2" fill="currentColor"/><path d="M2.3 4.7V3.3a2.2 2.2 0 0 1 4.4 0v1.4" stroke="currentColor" stroke-width="1.4" fill="none"/></svg>';

  const CURSOR_SVG =
    '<svg width="18" height="22" viewBox="0 0 18 22"><path d="M1 1 L1 17 L5.5 13 L8.5 20 L11.5 18.7 L8.6 12 L15 12 Z" stroke="#fff" stroke-width="1.5"/></svg>';

  /** Others' pointers, labelled with their names, in their colours. */
  function renderCursors() {
    const layer = $("cursors");
    const seen = new Set();
    for (const [socketId, pos] of state.cursors) {
      const session = state.users.get(socketId);
      if (!session) continue; // not (or no longer) in the flow
      seen.add(socketId);
      let node = layer.querySelector(`.cursor[data-socket-id="${CSS.escape(socketId)}"]`);
      if (!node) {
        node = el("div", { class: "cursor", "data-socket-id": socketId, "data-user-id": session.userId });
        node.innerHTML = CURSOR_SVG;
        node.append(el("span", { class: "cursor-label" }));
        layer.append(node);
      }
      node.querySelector("path").setAttribute("fill", session.userColor);
      const label = node.querySelector(".cursor-label");
      label.textContent = session.userName;
      label.style.background = session.userColor;
      node.style.left = `${pos.x}px`;
      node.style.top = `${pos.y}px`;
    }
    layer.querySelectorAll(".cursor").forEach((n) => {
      if (!seen.has(n.dataset.socketId)) n.remove();
    });
  }

  // --- local actions -------------------------------------------------------------

  function canvasPoint(event) {
    const r = $("canvas").getBoundingClientRect();
    return { x: event.clientX - r.left, y: event.clientY - r.top };
  }

  /** Keeps a pod inside the visible canvas of this tab. */
  function clampToCanvas(pos) {
    const r = $("canvas").getBoundingClientRect();
    return {
      x: Math.round(Math.min(Math.max(0, pos.x), Math.max(0, r.width - POD_W))),
      y: Math.round(Math.min(Math.max(0, pos.y), Math.max(0, r.height - POD_H))),
    };
  }

  /** The first spot of a grid that no pod on this canvas covers yet. */
  function freeSpot() {
    const r = $("canvas").getBoundingClientRect();
    const columns = Math.max(1, Math.floor((r.width - 40) / 220));
    const taken = (pos) =>
      [...state.pods.values()].some(
        (p) => Math.abs(p.position.x - pos.x) < POD_W && Math.abs(p.position.y - pos.y) < POD_H + 20,
      );
    for (let n = 0; n < columns * 4; n++) {
      const pos = clampToCanvas({ x: 40 + (n % columns) * 220, y: 40 + Math.floor(n / columns) * 140 });
      if (!taken(pos)) return pos;
    }
    return clampToCanvas({ x: 40 + Math.random() * (r.width - POD_W - 80), y: 40 + Math.random() * (r.height - POD_H - 80) });
  }

  async function createPod() {
    const n = state.podCounter++;
    const position = freeSpot();
    const pod = { id: newId("pod"), title: POD_TITLES[n % POD_TITLES.length], position, color: state.me.color };
    state.pods.set(pod.id, { ...pod, createdBy: state.me.userId });
    renderPod(pod.id);
    const ack = await request("pod:create", { pod });
    if (!ack.ok) {
      // The others never saw it: take it back so every canvas agrees.
      removePod(pod.id);
    }
  }

  function removePod(podId) {
    state.pods.delete(podId);
    state.locks.delete(podId);
    // Edges hanging off a deleted pod go with it, on every canvas alike, so
    // no edge:delete is needed for them.
    for (const [id, edge] of state.edges) {
      if (edge.source === podId || edge.target === podId) state.edges.delete(id);
    }
    if (state.selected === podId) state.selected = null;
    renderPod(podId);
    renderEdges();
    $("empty-hint").hidden = state.pods.size > 0;
  }

  function lockedByOther(podId) {
    const holder = state.locks.get(podId);
    return holder !== undefined && holder !== state.me.userId ? holder : null;
  }

  function deletePod(podId) {
    const holder = lockedByOther(podId);
    if (holder) {
      toast(`${userLook(holder).name} is moving this pod`, { code: "LOCKED", kind: "error" });
      return;
    }
    removePod(podId);
    send("pod:delete", { podId });
  }

  function deleteEdge(edgeId) {
    state.edges.delete(edgeId);
    renderEdges();
    send("edge:delete", { edgeId });
  }

  function select(podId) {
    if (state.selected === podId) return;
    const before = state.selected;
    state.selected = podId;
    if (before) renderPod(before);
    if (podId) renderPod(podId);
    send("selection:change", { selectedPodIds: podId ? [podId] : [] });
  }

  /** Connect mode: the first click picks the source, the second draws the edge. */
  function connectClick(podId) {
    if (!state.connect.source) {
      state.connect.source = podId;
      renderPod(podId);
      return;
    }
    const source = state.connect.source;
    setConnectMode(false);
    if (source === podId) return;
    const edge = { id: newId("edge"), source, target: podId };
    state.edges.set(edge.id, edge);
    renderEdges();
    send("edge:create", { edge });
  }

  function setConnectMode(on) {
    const source = state.connect?.source;
    state.connect = on ? { source: null } : null;
    if (source) renderPod(source);
    $("connect-mode").classList.toggle("active", on);
    $("mode-hint").hidden = !on;
  }

  function editTitle(podId) {
    const pod = state.pods.get(podId);
    const node = document.querySelector(`.pod[data-pod-id="${CSS.escape(podId)}"]`);
    const title = node?.querySelector(".pod-title");
    if (!pod || !title) return;
    const input = el("input", { class: "pod-title-input", maxlength: "60" });
    input.value = pod.title;
    title.replaceWith(input);
    input.focus();
    input.select();
    let done = false;
    const finish = (commit) => {
      if (done) return;
      done = true;
      input.replaceWith(title);
      const text = input.value.trim();
      if (commit && text && text !== pod.title) {
        pod.title = text;
        send("pod:update", { podId, updates: { title: text } });
      }
      renderPod(podId);
    };
    input.addEventListener("keydown", (e) => {
      if (e.key === "Enter") finish(true);
      if (e.key === "Escape") finish(false);
      e.stopPropagation();
    });
    input.addEventListener("blur", () => finish(true));
    input.addEventListener("pointerdown", (e) => e.stopPropagation());
  }

  // --- dragging ----------------------------------------------------------------------
  //
  // pointerdown: refuse if someone else holds the pod; otherwise get ready.
  // pointermove: past a few pixels (a click or double-click is not a drag),
  //   ask for the lock (`pod:lock` with an ack) and start moving the pod
  //   locally at once; once the lock is granted, send `pod:move` (throttled).
  // pointerup: send the exact final position, then `pod:unlock`.
  // If the lock is refused (LOCKED from a lock-owning gateway, or a
  //   RATE_LIMIT), the pod snaps back: nothing of this drag was relayed.

  /** Pixels the pointer must travel before a press becomes a drag. */
  const DRAG_THRESHOLD = 4;

  function startDrag(podId, event) {
    const pod = state.pods.get(podId);
    const holder = lockedByOther(podId);
    if (holder) {
      toast(`${userLook(holder).name} is moving this pod`, { code: "LOCKED", kind: "error" });
      return;
    }
    const pointer = canvasPoint(event);
    state.drag = {
      podId,
      down: pointer,
      offset: { x: pointer.x - pod.position.x, y: pointer.y - pod.position.y },
      start: { ...pod.position },
      pointerId: event.pointerId,
      lock: null, // the pod:lock request, once the press became a drag
      granted: false,
    };
  }

  /** The press has moved far enough: take the lock. */
  function beginMoving(drag) {
    const { podId } = drag;
    // Keep receiving the pointer while it is outside the canvas. Only now:
    // a captured pointer's click and dblclick go to the canvas, not the
    // title being double-clicked.
    try {
      $("canvas").setPointerCapture(drag.pointerId);
    } catch {
      // The pointer is already gone (released between events): no matter.
    }
    drag.lock = request("pod:lock", { podId });
    drag.lock.then((ack) => {
      if (!ack.ok) {
        undoDrag(drag);
        return;
      }
      drag.granted = true;
      state.locks.set(podId, state.me.userId);
      // Catch the others up with where the pod already is.
      const pod = state.pods.get(podId);
      if (state.drag === drag && pod) sendMove(podId, { ...pod.position });
    });
    renderPod(podId);
  }

  function moveDrag(event) {
    const drag = state.drag;
    const pod = drag && state.pods.get(drag.podId);
    if (!pod) return;
    const p = canvasPoint(event);
    if (!drag.lock) {
      if (Math.hypot(p.x - drag.down.x, p.y - drag.down.y) < DRAG_THRESHOLD) return;
      beginMoving(drag);
    }
    pod.position = clampToCanvas({ x: p.x - drag.offset.x, y: p.y - drag.offset.y });
    renderPod(drag.podId);
    renderEdges();
    if (drag.granted) sendMove(drag.podId, { ...pod.position });
  }

  /** Ends the current drag; `sendFinal` sends the final position and unlocks. */
  function endDrag({ sendFinal }) {
    const drag = state.drag;
    if (!drag) return;
    state.drag = null;
    sendMove.cancel();
    renderPod(drag.podId);
    if (!sendFinal || !drag.lock) return;
    // If the lock answer is still on its way, finish when it arrives.
    drag.lock.then((ack) => {
      if (!ack.ok) return; // undoDrag put the pod back
      const pod = state.pods.get(drag.podId);
      if (pod) send("pod:move", { podId: drag.podId, position: { ...pod.position } });
      send("pod:unlock", { podId: drag.podId });
      if (state.locks.get(drag.podId) === state.me.userId) state.locks.delete(drag.podId);
      renderPod(drag.podId);
    });
  }

  function undoDrag(drag) {
    if (state.drag === drag) state.drag = null;
    const pod = state.pods.get(drag.podId);
    if (pod) pod.position = { ...drag.start };
    renderPod(drag.podId);
    renderEdges();
    // The `error` event has already been shown as a toast.
  }

  // --- wiring the page -------------------------------------------------------------

  function wireCanvas() {
    const canvas = $("canvas");

    canvas.addEventListener("pointerdown", (event) => {
      if (event.button !== 0) return;
      const podNode = event.target.closest(".pod");
      if (!podNode) {
        if (state.connect) setConnectMode(false);
        select(null);
        return;
      }
      const podId = podNode.dataset.podId;
      if (event.target.closest(".pod-delete")) {
        deletePod(podId);
        return;
      }
      if (state.connect) {
        connectClick(podId);
        return;
      }
      select(podId);
      startDrag(podId, event);
    });

    canvas.addEventListener("pointermove", (event) => {
      moveDrag(event);
      if (state.socket?.connected) sendCursor(canvasPoint(event));
    });

    const up = () => endDrag({ sendFinal: true });
    canvas.addEventListener("pointerup", up);
    canvas.addEventListener("pointercancel", up);

    canvas.addEventListener("dblclick", (event) => {
      const podNode = event.target.closest(".pod");
      if (podNode && event.target.closest(".pod-title")) {
        if (lockedByOther(podNode.dataset.podId)) return;
        editTitle(podNode.dataset.podId);
      }
    });

    document.addEventListener("keydown", (event) => {
      if (event.key === "Escape" && state.connect) setConnectMode(false);
    });
    $("new-pod").addEventListener("click", createPod);
    $("connect-mode").addEventListener("click", () => setConnectMode(!state.connect));
    $("blip").addEventListener("click", () => {
      // Closes the Engine.IO transport without telling the server: what a
      // network blip looks like. The client reconnects on its own and, if
      // the gateway recovers sessions, `socket.recovered` is true.
      state.socket?.io.engine?.close();
    });
  }

  function wireJoinForm() {
    $("flow-id").textContent = FLOW_ID;
    $("join-flow-id").textContent = FLOW_ID;
    $("ops-link").href = `ops?flow=${encodeURIComponent(FLOW_ID)}`;
    $("join-name").value = params.get("name") || `${pick(NAMES)}-${Math.floor(100 + Math.random() * 900)}`;
    $("join-color").value = params.get("color") || pick(PALETTE);
    $("join-form").addEventListener("submit", async (event) => {
      event.preventDefault();
      const name = $("join-name").value.trim();
      const color = $("join-color").value;
      if (!name) return;
      $("join-button").disabled = true;
      try {
        await join(name, color);
        $("join-overlay").hidden = true;
        const me = $("me");
        const dot = el("span", { class: "dot" });
        dot.style.background = color;
        me.replaceChildren(dot, el("span", { text: name }));
      } catch (e) {
        toast(e.message, { kind: "error", ms: 10_000 });
        $("join-button").disabled = false;
      }
    });
  }

  if (typeof io !== "function") {
    document.body.textContent = "socket.io.min.js did not load.";
    return;
  }
  wireJoinForm();
  wireCanvas();
})();
