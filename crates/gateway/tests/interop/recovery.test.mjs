// Connection state recovery with the stock client (no client option):
// through HAProxy in front of three nodes sharing a real Redis, a client
// whose node is killed or drained reconnects to another node and receives
// exactly the events it missed, in order, then live ones.
import { test, describe, before, after } from "node:test";
import assert from "node:assert/strict";
import { io } from "socket.io-client";
import { token, sleep, nextArgs, emitAck } from "./harness.mjs";
import { startCluster, connectionsPerNode } from "./cluster.mjs";

/** A client through the load balancer that reconnects by itself. */
function reconnecting(url, userId, opts = {}) {
  const socket = io(url + "/flows", {
    transports: ["websocket"],
    forceNew: true,
    reconnectionDelay: 200,
    reconnectionDelayMax: 1000,
    auth: { token: token(userId) },
    ...opts,
  });
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`${userId} did not connect`)), 5000);
    socket.once("connected", () => { clearTimeout(t); resolve(socket); });
  });
}

function recordMoves(socket) {
  const got = [];
  socket.on("pod:moved", (p, offset) => got.push({ n: p.position.x, offset }));
  return got;
}

/** Resolves when `socket` connects again; with `socket.recovered`. */
function reconnected(socket, ms = 10000) {
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error("no reconnect")), ms);
    socket.once("connect", () => { clearTimeout(t); resolve(socket.recovered); });
  });
}

async function until(cond, ms = 10000, what = "condition") {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (await cond()) return;
    await sleep(50);
  }
  throw new Error(`timed out waiting for ${what}`);
}

describe("connection state recovery across nodes", () => {
  let cluster;
  const sockets = [];
  before(async () => {
    cluster = await startCluster({
      FLOWGATE_DRAIN_NOTICE_MS: "0",
      FLOWGATE_DRAIN_WINDOW_MS: "300",
      FLOWGATE_SERVICE_TOKEN: "svc",
    });
  });
  after(async () => {
    for (const s of sockets) s.close();
    await cluster?.stop();
  });

  test("kill -9 of the receiver's node: it recovers elsewhere with exactly the missed events, in order", async () => {
    const receiver = await reconnecting(cluster.lb.url, "rec-r");
    sockets.push(receiver);
    await emitAck(receiver, "flow:join", { flowId: "rec-kill" });
    const counts = await connectionsPerNode(cluster.nodes);
    const victim = cluster.nodes[counts.indexOf(1)];
    assert.ok(victim, `one node holds the receiver: ${counts}`);
    const other = cluster.nodes.find((n) => n !== victim);
    const sender = await reconnecting(other.url, "rec-s", { reconnection: false });
    sockets.push(sender);
    await emitAck(sender, "flow:join", { flowId: "rec-kill" });
    const got = recordMoves(receiver);
    const cursors = [];
    receiver.on("cursor:updated", (c) => cursors.push(c));
    const back = reconnected(receiver);

    for (let i = 1; i <= 20; i++) {
      if (i === 6) await victim.kill();
      assert.deepEqual(
        await emitAck(sender, "pod:move", { podId: "p", position: { x: i, y: 0 } }),
        { ok: true },
      );
      if (i >= 6 && i < 9) await emitAck(sender, "cursor:move", { position: { x: i, y: i } });
      await sleep(40);
    }
    assert.equal(await back, true, "socket.recovered");
    await until(() => got.length >= 20, 5000, "20 events");
    await sleep(300);
    assert.deepEqual(got.map((g) => g.n), Array.from({ length: 20 }, (_, i) => i + 1));
    assert.ok(got.every((g) => typeof g.offset === "string"), "each carries its offset");
    assert.equal(new Set(got.map((g) => g.offset)).size, 20);
    // Cursors sent while it was away are volatile: never replayed.
    assert.ok(cursors.every((c) => c.position.x < 6), JSON.stringify(cursors));
    await victim.start();
  });

  test("a recovered session is listed again and peers hear user:joined", async () => {
    const peer = await reconnecting(cluster.nodes[0].url, "pres-peer", { reconnection: false });
    sockets.push(peer);
    await emitAck(peer, "flow:join", { flowId: "rec-pres" });
    const target = await reconnecting(cluster.nodes[1].url, "pres-t");
    sockets.push(target);
    const joined1 = nextArgs(peer, "user:joined");
    await emitAck(target, "flow:join", { flowId: "rec-pres" });
    await joined1;
    const left = nextArgs(peer, "user:left");
    const joined = nextArgs(peer, "user:joined", 8000);
    const back = reconnected(target);
    target.io.engine.close(); // a network drop: the client reconnects by itself
    assert.equal((await left)[0].userId, "pres-t");
    assert.equal(await back, true);
    assert.equal((await joined)[0].userId, "pres-t");
    const res = await fetch(`${cluster.nodes[2].url}/v1/flows/rec-pres/presence`, {
      headers: { authorization: "Bearer svc" },
    });
    const listed = (await res.json()).map((s) => s.userId).sort();
    assert.deepEqual(listed, ["pres-peer", "pres-t"], "listed once, on every node");
  });

  test("an unknown pid, or a window that passed, is a new session (recovered === false)", async () => {
    const s = await reconnecting(cluster.nodes[0].url, "rec-unknown");
    sockets.push(s);
    const firstId = s.id;
    s._pid = "no-such-session";
    const back = reconnected(s);
    s.io.engine.close();
    assert.equal(await back, false);
    assert.notEqual(s.id, firstId);
  });

  test("recovered where the old connection is still open: the old one is closed, the new one keeps receiving after it ends", async () => {
    // A client whose network blipped reconnects to the same node before
    // that node noticed the old connection dead. The old connection's end
    // used to remove the recovered one from the room: it stayed connected
    // and silently received nothing more.
    const url = cluster.nodes[0].url;
    const peer = await reconnecting(url, "rec-z-peer");
    const old = await reconnecting(url, "rec-z", { reconnection: false });
    sockets.push(peer, old);
    assert.deepEqual(await emitAck(old, "flow:join", { flowId: "f-z" }), { ok: true });
    assert.deepEqual(await emitAck(peer, "flow:join", { flowId: "f-z" }), { ok: true });
    const move = (n) => emitAck(peer, "pod:move", { podId: "p", position: { x: n, y: 0 } });
    const first = nextArgs(old, "pod:moved");
    await move(1);
    await first;
    const sid = old.id;
    const oldEnd = new Promise((r) => old.once("disconnect", r));
    // The same session on a second connection: what the stock client sends
    // when it reconnects (its pid and last offset in the auth payload).
    const fresh = io(url + "/flows", {
      transports: ["websocket"], forceNew: true, reconnection: false,
      auth: { token: token("rec-z"), pid: old._pid, offset: old._lastOffset },
    });
    sockets.push(fresh);
    const got = recordMoves(fresh);
    await new Promise((r) => fresh.once("connect", r));
    assert.equal(fresh.id, sid, "the session was recovered on the new connection");
    const ended = await Promise.race([oldEnd, sleep(3000).then(() => "still open")]);
    assert.equal(ended, "io server disconnect", "the replaced connection is closed");
    await move(2);
    await until(() => got.length >= 1, 3000, "the move after the takeover");
    await move(3);
    await until(() => got.length >= 2, 3000, "the move after the old connection ended");
    assert.deepEqual(got.map((g) => g.n), [2, 3]);
  });

  test("rolling SIGTERM restart of all three nodes loses no acknowledged event", async () => {
    const receivers = [];
    for (let i = 0; i < 3; i++) {
      const r = await reconnecting(cluster.lb.url, `roll-r${i}`);
      sockets.push(r);
      await emitAck(r, "flow:join", { flowId: "rec-roll" });
      // A front end joins again on every connect; a recovered socket keeps
      // its flow, and joining it again changes nothing.
      r.on("connect", () => { if (!r.recovered) r.emit("flow:join", { flowId: "rec-roll" }); });
      receivers.push({ r, got: recordMoves(r), lost: 0, reconnects: 0 });
      r.on("connect", () => {
        receivers[i].reconnects++;
        if (!r.recovered) receivers[i].lost++;
      });
    }
    const sender = await reconnecting(cluster.lb.url, "roll-s");
    sockets.push(sender);
    await emitAck(sender, "flow:join", { flowId: "rec-roll" });
    sender.on("connect", () => { if (!sender.recovered) sender.emit("flow:join", { flowId: "rec-roll" }); });

    const acked = [];
    let stop = false;
    const pump = (async () => {
      for (let i = 1; !stop && i < 10000; i++) {
        try {
          const ack = await sender.timeout(4000).emitWithAck("pod:move", { podId: "p", position: { x: i, y: 0 } });
          if (ack.ok) acked.push(i);
        } catch { /* not acknowledged: may or may not have been relayed */ }
        await sleep(30);
      }
    })();
    for (const n of cluster.nodes) {
      await n.term();
      await n.start();
      await sleep(1500);
    }
    await sleep(1000);
    stop = true;
    await pump;
    await sleep(1500);
    assert.ok(acked.length > 50, `acked ${acked.length}`);
    for (const { got, lost, reconnects } of receivers) {
      assert.ok(reconnects >= 1, "its node was restarted under it");
      assert.equal(lost, 0, "every reconnect recovered");
      const seen = got.map((g) => g.n);
      assert.equal(new Set(seen).size, seen.length, "exactly once");
      assert.deepEqual([...seen].sort((a, b) => a - b), seen, "in order");
      const missing = acked.filter((i) => !seen.includes(i));
      assert.deepEqual(missing, [], "every acknowledged event arrived");
    }
  });
});
