// Connection lifecycle: token expiry and refresh, reconnect after a node's
// drain, and the Origin check (CONTRACT.md, "Authentication", "Operating").
import { test, describe, before, after } from "node:test";
import assert from "node:assert/strict";
import http from "node:http";
import { io } from "socket.io-client";
import {
  node, client, user, track, cleanup, connectError, token, next, emitAck, join, sleep, refused, nowSecs,
} from "./harness.mjs";

after(cleanup);

/** Milliseconds until `exp` (seconds since the epoch). */
const untilExp = (exp) => exp * 1000 - Date.now();

/** Connects with a token for `userId` that expires in `ttl` s; returns { socket, exp }. */
async function shortLived(url, userId, ttl = 2, opts = {}) {
  const exp = nowSecs() + ttl;
  const socket = await client(url, { auth: { token: token(userId, { extra: { exp } }) }, ...opts });
  return { socket, exp };
}

/** Resolves with the `disconnect` reason, or rejects after `ms`. */
function disconnected(socket, ms) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no disconnect within ${ms} ms`)), ms);
    socket.once("disconnect", (reason, details) => {
      clearTimeout(timer);
      resolve({ reason, details, at: Date.now() });
    });
  });
}

describe("token expiry (JWT_LEEWAY_SECS=0)", { concurrency: true }, () => {
  let url;
  before(async () => {
    url = (await node({ JWT_LEEWAY_SECS: "0" })).url;
  });

  for (const transport of ["websocket", "polling"]) test(`without a refresh (${transport}): error TOKEN_EXPIRED at exp, then one "io server disconnect"`, async () => {
    const { socket, exp } = await shortLived(url, `exp-a-${transport}`, 2, { transports: [transport] });
    const peer = await user(url, `exp-peer-${transport}`);
    const flow = `f-exp-${transport}`;
    await join(socket, flow, { userName: "Exy" });
    await join(peer, flow);
    const order = [];
    let errAt = 0;
    socket.on("error", (e) => {
      order.push(["error", e]);
      errAt = Date.now();
    });
    const reasons = [];
    socket.on("disconnect", (r) => reasons.push(r));
    const id = socket.id;
    const left = next(peer, "user:left", untilExp(exp) + 3000);
    const { reason } = await disconnected(socket, untilExp(exp) + 3000);
    order.push(["disconnect", reason]);
    assert.equal(reason, "io server disconnect");
    // Over long-polling the close packet once shared a payload with the
    // error: the client acted on the close first ("transport close"),
    // never saw the error, then disconnected a second time.
    await new Promise((r) => setTimeout(r, 300));
    assert.deepEqual(reasons, ["io server disconnect"]);
    assert.equal(order[0][0], "error", `TOKEN_EXPIRED comes first: ${JSON.stringify(order)}`);
    assert.equal(order[0][1].code, "TOKEN_EXPIRED");
    assert.equal(typeof order[0][1].message, "string");
    assert.ok(errAt >= exp * 1000 - 50, `not before exp (${errAt - exp * 1000} ms)`);
    assert.ok(errAt <= exp * 1000 + 1500, `promptly at exp (${errAt - exp * 1000} ms)`);
    assert.deepEqual(await left, { userId: `exp-a-${transport}`, socketId: id, userName: "Exy" });
    assert.equal(socket.connected, false);
  });

  test("JWT_LEEWAY_SECS extends exp, at connect and while connected", async () => {
    const { url: lurl } = await node({ JWT_LEEWAY_SECS: "3" });
    const exp = nowSecs() - 1; // already past exp, within the leeway (which ends at least 1 s from now,
    // so the expiry cannot race the listeners attached after `connected`)
    const socket = await client(lurl, { auth: { token: token("lee-a", { extra: { exp } }) } });
    const err = next(socket, "error", untilExp(exp + 3) + 3000);
    const { reason, at } = await disconnected(socket, untilExp(exp + 3) + 3000);
    assert.equal((await err).code, "TOKEN_EXPIRED");
    assert.equal(reason, "io server disconnect");
    assert.ok(at >= (exp + 3) * 1000 - 50, `not before exp + leeway (${at - (exp + 3) * 1000} ms)`);
    const old = await connectError(lurl, { auth: { token: token("lee-b", { extra: { exp: nowSecs() - 10 } }) } });
    assert.equal(old.data?.code, "INVALID_TOKEN", "beyond the leeway");
  });

  test("auth:refresh before exp keeps the socket past the first token's exp", async () => {
    const { socket, exp } = await shortLived(url, "ref-a");
    let gone = null;
    socket.on("disconnect", (r) => (gone = r));
    const errors = [];
    socket.on("error", (e) => errors.push(e));
    assert.deepEqual(await emitAck(socket, "auth:refresh", { token: token("ref-a", { ttl: 60 }) }), { ok: true });
    await sleep(untilExp(exp) + 700);
    assert.equal(gone, null, "still connected past the first exp");
    assert.deepEqual(errors, []);
    assert.ok(socket.connected);
    await join(socket, "f-refreshed"); // and still serving
  });

  test("auth:refresh with another user's, an invalid or an expired token is refused; the old exp stands", async () => {
    const { socket, exp } = await shortLived(url, "ref-b");
    const other = await refused(socket, "auth:refresh", { token: token("someone-else", { ttl: 60 }) });
    assert.equal(other.ack.ok, false);
    assert.equal(other.ack.code, "AUTH_ERROR");
    const bad = await refused(socket, "auth:refresh", { token: token("ref-b", { ttl: 60, secret: "wrong" }) });
    assert.equal(bad.ack.code, "INVALID_TOKEN");
    const expired = await refused(socket, "auth:refresh", { token: token("ref-b", { ttl: -10 }) });
    assert.equal(expired.ack.code, "INVALID_TOKEN");
    const missing = await refused(socket, "auth:refresh", {});
    assert.equal(missing.ack.ok, false);
    assert.ok(socket.connected, "a refused refresh does not disconnect");
    const expiredErr = next(socket, "error", untilExp(exp) + 3000);
    const { reason } = await disconnected(socket, untilExp(exp) + 3000);
    assert.equal((await expiredErr).code, "TOKEN_EXPIRED");
    assert.equal(reason, "io server disconnect");
  });
});

describe("reconnect after a node drains", () => {
  test("the client reconnects by itself to a new node on the same port, joins and relays again", async () => {
    const first = await node();
    const port = first.port;
    const socket = track(
      io(first.url + "/flows", {
        transports: ["websocket"],
        forceNew: true,
        reconnection: true,
        reconnectionDelay: 50,
        reconnectionDelayMax: 200,
        randomizationFactor: 0,
        auth: { token: token("re-a") },
      }),
    );
    const connectedOnce = next(socket, "connected", 3000);
    const info1 = await connectedOnce;
    assert.equal(info1.userId, "re-a");
    await join(socket, "f-re");

    const gone = disconnected(socket, 5000);
    const reconnected = next(socket, "connected", 10000);
    reconnected.catch(() => {});
    await first.stop(); // SIGTERM: drain closes sockets with 1001
    const { reason, details } = await gone;
    assert.equal(reason, "transport close", "a drain is a transport close, so the client reconnects");
    assert.equal(details?.context?.code, 1001, "WebSocket close code 1001 (going away)");

    const second = await node({ PORT: String(port) });
    assert.equal(second.port, port);
    const info2 = await reconnected;
    assert.equal(info2.userId, "re-a");
    assert.ok(socket.connected);

    const peer = await user(second.url, "re-peer");
    const users = await join(peer, "f-re");
    assert.deepEqual(users.map((u) => u.userId), ["re-peer"], "the old session is not on the new node");
    const joined = next(peer, "user:joined");
    await join(socket, "f-re");
    assert.equal((await joined).userId, "re-a");
    const moved = next(peer, "pod:moved");
    assert.deepEqual(await emitAck(socket, "pod:move", { podId: "p", position: { x: 1, y: 2 } }), { ok: true });
    assert.deepEqual(await moved, { podId: "p", position: { x: 1, y: 2 }, userId: "re-a" });
  });
});

describe("drain", () => {
  test("/health is 200 while serving, 503 while draining; new upgrades are refused; sockets close with 1001", async () => {
    const n = await node({ FLOWGATE_DRAIN_NOTICE_MS: "400", FLOWGATE_DRAIN_WINDOW_MS: "100" });
    const health = async () => {
      const res = await fetch(n.url + "/health", { signal: AbortSignal.timeout(2000) });
      return { status: res.status, body: await res.json() };
    };
    const up = await health();
    assert.equal(up.status, 200);
    assert.equal(typeof up.body, "object");
    const s = await user(n.url, "drain-a");
    const gone = disconnected(s, 5000);
    const exited = new Promise((r) => n.proc.once("exit", r));
    n.proc.kill("SIGTERM");
    // Within the notice period: /health says 503 and upgrades are refused, the socket is still open.
    let draining;
    const deadline = Date.now() + 300;
    do {
      draining = await health();
    } while (draining.status === 200 && Date.now() < deadline);
    assert.equal(draining.status, 503, JSON.stringify(draining.body));
    const err = await connectError(n.url, { auth: { token: token("drain-b") } });
    assert.ok(err instanceof Error);
    assert.ok(s.connected, "open sockets stay until the notice period is over");
    const { reason, details } = await gone;
    assert.equal(reason, "transport close");
    assert.equal(details?.context?.code, 1001);
    await exited;
  });
});

describe("Engine.IO heartbeat", () => {
  test("the stock client answers server pings (FLOWGATE_PING_INTERVAL_MS=100) and stays connected", async () => {
    const { url } = await node({ FLOWGATE_PING_INTERVAL_MS: "100", FLOWGATE_PING_TIMEOUT_MS: "300" });
    const s = await user(url, "hb-a");
    let pings = 0;
    s.io.engine.on("ping", () => pings++);
    let gone = null;
    s.on("disconnect", (r) => (gone = r));
    await sleep(900);
    assert.equal(gone, null, "still connected");
    assert.ok(pings >= 4, `the server pinged (${pings} pings in 900 ms)`);
    await join(s, "f-hb");
  });
});

describe("FRONTEND_URL", () => {
  let url;
  before(async () => {
    url = (await node({ FRONTEND_URL: "http://good.test,https://app.example.com" })).url;
  });

  /** A raw WebSocket upgrade request; resolves with the HTTP status (101 on upgrade). */
  function upgradeStatus(origin) {
    return new Promise((resolve, reject) => {
      const req = http.get(url + "/socket.io/?EIO=4&transport=websocket", {
        headers: {
          Connection: "Upgrade",
          Upgrade: "websocket",
          "Sec-WebSocket-Version": "13",
          "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
          Origin: origin,
        },
        timeout: 3000,
      });
      req.on("upgrade", (res, sock) => {
        sock.destroy();
        resolve(res.statusCode);
      });
      req.on("response", (res) => {
        res.resume();
        resolve(res.statusCode);
      });
      req.on("timeout", () => req.destroy(new Error("upgrade request timed out")));
      req.on("error", reject);
    });
  }

  test("a wrong Origin gets connect_error (HTTP 403 at the upgrade)", async () => {
    for (const origin of ["http://evil.test", "http://good.test.evil.test", "https://good.test", "null"]) {
      const err = await connectError(url, { auth: { token: token("o-bad") }, extraHeaders: { Origin: origin } });
      assert.ok(err instanceof Error, origin);
      assert.equal(err.data?.code, undefined, "refused before Socket.IO, not by auth");
      assert.equal(await upgradeStatus(origin), 403, origin);
    }
  });

  test("an allowed Origin connects", async () => {
    for (const origin of ["http://good.test", "https://app.example.com"]) {
      const s = await client(url, { auth: { token: token("o-good") }, extraHeaders: { Origin: origin } });
      assert.equal(s.connectedInfo.userId, "o-good");
      assert.equal(await upgradeStatus(origin), 101, origin);
    }
  });
});
