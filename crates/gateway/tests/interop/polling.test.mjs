// HTTP long-polling and the upgrade with the stock socket.io-client, through
// HAProxy round-robin with NO sticky sessions in front of three nodes on one
// Redis: every request of a session may land on another node, which
// forwards it to the session's owner (CONTRACT.md, "Transport"); when the
// owner dies, its sessions' clients reconnect through another node and recover.
import { test, describe, before, after } from "node:test";
import assert from "node:assert/strict";
import { io } from "socket.io-client";
import { cleanup, token, track, next, join, sleep } from "./harness.mjs";
import { startCluster } from "./cluster.mjs";

let cluster;
after(async () => {
  await cleanup();
  await cluster?.stop();
});

/** The sum of one metric sample over `nodes`' /metrics. */
async function metricSum(nodes, sample) {
  let sum = 0;
  for (const n of nodes) {
    const text = await (await fetch(n.url + "/metrics")).text();
    for (const line of text.split("\n")) {
      if (line.startsWith(sample + " ")) sum += Number(line.slice(sample.length + 1));
    }
  }
  return sum;
}

/** Connects with `opts` (the client's defaults when empty); resolves once `connected` arrived. */
function open(url, userId, opts = {}) {
  const socket = track(
    io(url + "/flows", { auth: { token: token(userId) }, reconnection: false, forceNew: true, ...opts }),
  );
  return new Promise((resolve, reject) => {
    socket.once("connected", () => resolve(socket));
    socket.once("connect_error", (e) => reject(e));
  });
}

/** Resolves once the socket's Engine.IO transport is `name`. */
async function transportIs(socket, name, ms = 5000) {
  const deadline = Date.now() + ms;
  while (socket.io.engine.transport.name !== name) {
    if (Date.now() > deadline) throw new Error(`transport still ${socket.io.engine.transport.name}`);
    await sleep(20);
  }
}

/** Emits `n` numbered pod updates from `from`; resolves with what `to` received, in order. */
async function relay(from, to, n, tag) {
  const seen = [];
  const on = (d) => d.updates?.tag === tag && seen.push(d.updates.i);
  to.on("pod:updated", on);
  for (let i = 0; i < n; i++) from.emit("pod:update", { podId: "p", updates: { tag, i } });
  const deadline = Date.now() + 5000;
  while (seen.length < n && Date.now() < deadline) await sleep(20);
  // Anything extra (a duplicate) would show up now.
  await sleep(200);
  to.off("pod:updated", on);
  return seen;
}

const ORDERED = (n) => Array.from({ length: n }, (_, i) => i);

describe("three nodes behind round-robin HAProxy, no stickiness", () => {
  let url, nodes;
  before(async () => {
    cluster = await startCluster(
      {
        FLOWGATE_PING_INTERVAL_MS: "300",
        FLOWGATE_PING_TIMEOUT_MS: "1000",
        FLOWGATE_RATE_LIMIT_PER_SEC: "1000",
        FLOWGATE_RATE_LIMIT_BURST: "1000",
      },
      { LB_ROUNDROBIN: "1" },
    );
    ({ nodes } = cluster);
    url = cluster.lb.url;
  });

  test("default options: connects over polling, upgrades, relays both ways", async () => {
    const upgradesBefore = await metricSum(nodes, "flowgate_upgrades_total");
    const a = await open(url, "def-a");
    const b = await open(url, "def-b");
    await Promise.all([transportIs(a, "websocket"), transportIs(b, "websocket")]);
    await join(a, "poll-default");
    const joined = next(a, "user:joined");
    await join(b, "poll-default");
    await joined;
    assert.deepEqual(await relay(a, b, 10, "ab"), ORDERED(10));
    assert.deepEqual(await relay(b, a, 10, "ba"), ORDERED(10));
    assert.equal((await metricSum(nodes, "flowgate_upgrades_total")) - upgradesBefore, 2);
    const hops = await metricSum(nodes, 'flowgate_forwarded_requests_total{kind="polling",outcome="ok"}');
    assert.ok(hops > 0, "no polling request was forwarded: the test would prove nothing");
  });

  test("polling only: 20 events each way exactly once in order, across ping cycles", async () => {
    const a = await open(url, "poll-a", { transports: ["polling"] });
    const b = await open(url, "poll-b", { transports: ["polling"] });
    assert.equal(a.io.engine.transport.name, "polling");
    await join(a, "poll-only");
    const joined = next(a, "user:joined");
    await join(b, "poll-only");
    await joined;
    assert.deepEqual(await relay(a, b, 20, "ab1"), ORDERED(20));
    assert.deepEqual(await relay(b, a, 20, "ba1"), ORDERED(20));
    // Several ping cycles (300 ms) with every request on another node.
    let pings = 0;
    a.io.engine.on("ping", () => pings++);
    await sleep(2000);
    assert.ok(pings >= 4, `only ${pings} pings`);
    assert.ok(a.connected && b.connected);
    assert.equal(a.io.engine.transport.name, "polling");
    assert.deepEqual(await relay(a, b, 20, "ab2"), ORDERED(20));
    assert.deepEqual(await relay(b, a, 20, "ba2"), ORDERED(20));
  });

  test("a polling client and a WebSocket client in one flow", async () => {
    const p = await open(url, "mix-p", { transports: ["polling"] });
    const w = await open(url, "mix-w", { transports: ["websocket"] });
    await join(p, "poll-mixed");
    const joined = next(p, "user:joined");
    await join(w, "poll-mixed");
    assert.equal((await joined).userId, "mix-w");
    assert.deepEqual(await relay(p, w, 20, "pw"), ORDERED(20));
    assert.deepEqual(await relay(w, p, 20, "wp"), ORDERED(20));
    const left = next(w, "user:left");
    p.close();
    assert.equal((await left).userId, "mix-p");
  });

  test("the owner of a polling session dies: the client reconnects through another node and recovers", async () => {
    const opts = { transports: ["polling"], reconnection: true, reconnectionDelay: 100, reconnectionDelayMax: 300 };
    const p = await open(url, "dead-p", opts);
    const w = await open(url, "dead-w", { transports: ["websocket"] });
    await join(p, "poll-dead");
    const joined = next(p, "user:joined");
    await join(w, "poll-dead");
    await joined;
    // The sid names its owner: "<random>.<node id in base64url>".
    const owner = Buffer.from(p.io.engine.id.split(".").pop(), "base64url").toString();
    const node = cluster.nodes.find((n) => n.id === owner);
    assert.ok(node, `owner ${owner} is one of the nodes`);
    const reconnected = new Promise((r) => p.once("disconnect", () => p.once("connect", r)));
    await node.kill();
    await reconnected;
    assert.equal(p.recovered, true, "the session is recovered (pid/offset)");
    assert.notEqual(Buffer.from(p.io.engine.id.split(".").pop(), "base64url").toString(), owner);
    // `w` may have been on the dead node too: relay with a new peer.
    const w2 = await open(url, "dead-w2", { transports: ["websocket"] });
    await join(w2, "poll-dead");
    assert.deepEqual(await relay(w2, p, 5, "after"), ORDERED(5));
    assert.deepEqual(await relay(p, w2, 5, "after2"), ORDERED(5));
  });
});
