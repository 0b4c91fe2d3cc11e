// Scaling under load, the way ops do it locally: `scripts/cluster.sh up`
// (Redis, Postgres behind PgBouncer, three nodes, HAProxy), then `scale 6`
// and `scale 2` while stock clients in several rooms keep sending
// acknowledged events. Shows that new nodes take new clients, that the
// clients of removed nodes reconnect through HAProxy and recover every
// acknowledged event exactly once and in order, and that the connections
// end up balanced over the nodes that remain.
import { test, describe, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { io } from "socket.io-client";
import { BIN, SECRET, token, sleep, emitAck } from "./harness.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));
const SCRIPT = path.resolve(here, "../../../../scripts/cluster.sh");

const ROOMS = 4;
const FIRST_WAVE = 4; // WebSocket receivers per room before scaling out
const SECOND_WAVE = 4; // WebSocket receivers per room after scaling out

describe("scripts/cluster.sh scale under load", () => {
  let dir;
  let env;
  const sockets = [];

  /** Runs scripts/cluster.sh with ARGS; resolves to its output. */
  function cluster(...args) {
    return new Promise((resolve, reject) => {
      execFile("bash", [SCRIPT, ...args], { env, timeout: 120_000 }, (err, stdout, stderr) => {
        if (err) reject(new Error(`cluster.sh ${args.join(" ")}: ${err.message}\n${stdout}\n${stderr}`));
        else resolve(stdout + stderr);
      });
    });
  }

  /** The running cluster's cluster.env as an object. */
  function clusterEnv() {
    const out = {};
    for (const line of fs.readFileSync(path.join(env.FLOWGATE_CLUSTER_DIR, "cluster.env"), "utf8").split("\n")) {
      const m = /^([A-Z0-9_]+)=(.*)$/.exec(line);
      if (m) out[m[1]] = m[2];
    }
    return out;
  }

  /** Open connections per running node, from each node's own /metrics. */
  async function connectionsByNode() {
    const out = {};
    for (const [k, port] of Object.entries(clusterEnv())) {
      const m = /^NODE(\d+)_PORT$/.exec(k);
      if (!m) continue;
      const text = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
      out[`node${m[1]}`] = Number(/^flowgate_connections (\d+)/m.exec(text)?.[1] ?? -1);
    }
    return out;
  }

  before(async () => {
    // The postgres system user must traverse the state dir (mkdtemp is 0700).
    dir = fs.mkdtempSync(path.join(os.tmpdir(), "flowgate-scale-"));
    fs.chmodSync(dir, 0o755);
    env = {
      ...process.env,
      FLOWGATE_CLUSTER_DIR: path.join(dir, "c"),
      FLOWGATE_BIN: BIN,
      FLOWGATE_CLUSTER_SKIP_DEPS: "1",
      FLOWGATE_ACCESS_POLICY: "open",
      JWT_ACCESS_TOKEN_SECRET: SECRET,
      // Removed nodes are taken out of HAProxy by the script first, so a
      // short notice is enough; the window still spreads the reconnects.
      FLOWGATE_DRAIN_NOTICE_MS: "1000",
      FLOWGATE_DRAIN_WINDOW_MS: "2000",
      RUST_LOG: "info",
    };
    await cluster("up");
  });

  after(async () => {
    for (const s of sockets) s.close();
    if (env) await cluster("down").catch((e) => console.error(e.message));
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  /** A stock client through the load balancer that reconnects by itself. */
  function client(userId, transports = ["websocket"]) {
    const socket = io(clusterEnv().LB_URL + "/flows", {
      transports,
      forceNew: true,
      reconnectionDelay: 200,
      reconnectionDelayMax: 1000,
      auth: { token: token(userId) },
    });
    sockets.push(socket);
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new Error(`${userId} did not connect`)), 10_000);
      socket.once("connected", () => { clearTimeout(t); resolve(socket); });
    });
  }

  test("3 → 6 → 2 nodes under a steady load: nothing acknowledged is lost, connections end balanced", async (t) => {
    const rooms = [];
    for (let r = 0; r < ROOMS; r++) {
      const flowId = `scale-${r}`;
      const sender = await client(`scale-s${r}`);
      await emitAck(sender, "flow:join", { flowId });
      sender.on("connect", () => { if (!sender.recovered) sender.emit("flow:join", { flowId }); });
      rooms.push({ flowId, sender, next: 1, acked: [], receivers: [] });
    }

    /** A receiver of room R: records what it gets and how it reconnects. */
    async function receiver(room, userId, transports) {
      const socket = await client(userId, transports);
      await emitAck(socket, "flow:join", { flowId: room.flowId });
      const rec = { userId, socket, from: room.next, got: [], reconnects: 0, lost: 0 };
      socket.on("pod:moved", (p) => rec.got.push(p.position.x));
      socket.on("connect", () => {
        rec.reconnects++;
        // A front end joins again when the session was not recovered.
        if (!socket.recovered) {
          rec.lost++;
          socket.emit("flow:join", { flowId: room.flowId });
        }
      });
      room.receivers.push(rec);
    }

    for (const room of rooms) {
      for (let i = 0; i < FIRST_WAVE; i++) await receiver(room, `${room.flowId}-w${i}`, ["websocket"]);
      // Long-polling too: its owner may be any node, HAProxy round-robins.
      await receiver(room, `${room.flowId}-p`, ["polling"]);
    }

    let stop = false;
    const pumps = rooms.map(async (room) => {
      while (!stop) {
        const i = room.next++;
        try {
          const ack = await room.sender.timeout(5000)
            .emitWithAck("pod:move", { podId: "p", position: { x: i, y: 0 } });
          if (ack.ok) room.acked.push(i);
        } catch { /* not acknowledged: may or may not have been relayed */ }
        await sleep(50);
      }
    });

    await sleep(1500);
    await cluster("scale", "6");
    assert.deepEqual(Object.keys(await connectionsByNode()).sort(),
      ["node1", "node2", "node3", "node4", "node5", "node6"]);
    for (const room of rooms) {
      for (let i = 0; i < SECOND_WAVE; i++) await receiver(room, `${room.flowId}-v${i}`, ["websocket"]);
    }
    const out = await connectionsByNode();
    t.diagnostic(`connections on 6 nodes after the second wave: ${JSON.stringify(out)}`);
    for (const n of ["node4", "node5", "node6"]) {
      assert.ok(out[n] >= 3, `HAProxy (leastconn) sends new clients to the new nodes: ${JSON.stringify(out)}`);
    }

    await sleep(1500);
    const ackedBefore = rooms.map((r) => r.acked.length);
    await cluster("scale", "2");
    assert.deepEqual(Object.keys(await connectionsByNode()).sort(), ["node1", "node2"]);
    // Every client is connected again, then the load runs on two nodes.
    const all = rooms.flatMap((r) => [r.sender, ...r.receivers.map((x) => x.socket)]);
    const until = Date.now() + 15_000;
    while (all.some((s) => !s.connected) && Date.now() < until) await sleep(100);
    assert.ok(all.every((s) => s.connected), "every client reconnected");
    await sleep(2000);
    stop = true;
    await Promise.all(pumps);
    await sleep(2000);

    let reconnects = 0;
    for (const [r, room] of rooms.entries()) {
      assert.ok(room.acked.length > ackedBefore[r] + 10, `room ${r} kept going on two nodes`);
      for (const rec of room.receivers) {
        reconnects += rec.reconnects;
        assert.equal(rec.lost, 0, `${rec.userId}: every reconnect recovered`);
        assert.equal(new Set(rec.got).size, rec.got.length, `${rec.userId}: exactly once`);
        assert.deepEqual([...rec.got].sort((a, b) => a - b), rec.got, `${rec.userId}: in order`);
        const seen = new Set(rec.got);
        const missing = room.acked.filter((i) => i >= rec.from && !seen.has(i));
        assert.deepEqual(missing, [], `${rec.userId}: every acknowledged event since its join arrived`);
      }
    }
    // node3..node6 held about two thirds of the receivers: they all moved.
    assert.ok(reconnects >= 10, `receivers of removed nodes reconnected (${reconnects})`);

    const total = all.length;
    const final = await connectionsByNode();
    t.diagnostic(`connections on 2 nodes: ${JSON.stringify(final)}; receivers' reconnects: ${reconnects}; acked: ${rooms.map((r) => r.acked.length)}`);
    assert.equal(final.node1 + final.node2, total, JSON.stringify(final));
    for (const n of ["node1", "node2"]) {
      assert.ok(final[n] >= total * 0.35, `balanced over the two nodes: ${JSON.stringify(final)}`);
    }
  });
});
