// Pod locks with the stock socket.io-client (CONTRACT.md, "Pod locks"):
// LOCKED / NOT_LOCK_OWNER refusals, what is relayed and what is not,
// pod:delete, flow:locks and the locks API, release with reason
// "released" on leave, on disconnect and after the recovery window, kept
// across a recovered reconnect, and one winner out of twenty.
import { test, describe, before, after } from "node:test";
import assert from "node:assert/strict";
import {
  node, user, cleanup, next, emitAck, join, sleep, recordAll, refused, api, ISO,
} from "./harness.mjs";

after(cleanup);

const SERVICE = "interop-service-token";
const WINDOW_MS = 1000;

/** Users `${tag}-a`, `${tag}-b` (and more) joined to `flowId`, in order. */
async function joined(url, flowId, tag, n = 2) {
  const out = [];
  for (let i = 0; i < n; i++) {
    const s = await user(url, `${tag}-${"abcdefghij"[i]}`);
    await join(s, flowId);
    out.push(s);
  }
  await sleep(50); // the joins' user:joined settle
  return out;
}

const names = (seen, wanted) => seen.filter(([n]) => wanted.includes(n));

describe("pod locks", () => {
  let url;
  before(async () => {
    url = (await node({
      FLOWGATE_SERVICE_TOKEN: SERVICE,
      FLOWGATE_RECOVERY_WINDOW_MS: String(WINDOW_MS),
      FLOWGATE_NODE_HEARTBEAT_MS: "100",
    })).url;
  });

  test("one holder: LOCKED and NOT_LOCK_OWNER are refused, nothing relayed", async () => {
    const [a, b] = await joined(url, "f-rules", "rules");
    const atA = recordAll(a);
    const locked = next(b, "pod:locked");
    assert.deepEqual(await emitAck(a, "pod:lock", { podId: "p" }), { ok: true });
    const l = await locked;
    assert.equal(l.podId, "p");
    assert.equal(l.userId, "rules-a");
    assert.match(l.timestamp, ISO);

    const atB = recordAll(b);
    let r = await refused(b, "pod:lock", { podId: "p" });
    assert.equal(r.ack.ok, false);
    assert.equal(r.ack.code, "LOCKED");
    assert.equal(r.error.code, "LOCKED");
    r = await refused(b, "pod:unlock", { podId: "p" });
    assert.equal(r.ack.code, "NOT_LOCK_OWNER");
    assert.equal(r.error.code, "NOT_LOCK_OWNER");
    assert.equal(b.connected, true, "the connection stays open");

    // Re-locking one's own pod and unlocking a free one: ok, nothing relayed.
    assert.deepEqual(await emitAck(a, "pod:lock", { podId: "p" }), { ok: true });
    assert.deepEqual(await emitAck(a, "pod:unlock", { podId: "free" }), { ok: true });
    await emitAck(a, "pod:move", { podId: "barrier", position: { x: 0, y: 0 } });
    await next(b, "pod:moved");
    assert.deepEqual(names(atA, ["pod:locked", "pod:unlocked"]), [], "refusals relay nothing");
    assert.deepEqual(names(atB, ["pod:locked", "pod:unlocked"]), [], "re-lock and free unlock relay nothing");

    const unlocked = next(b, "pod:unlocked");
    assert.deepEqual(await emitAck(a, "pod:unlock", { podId: "p" }), { ok: true });
    const u = await unlocked;
    assert.deepEqual(Object.keys(u).sort(), ["podId", "timestamp", "userId"]);
    assert.equal(u.userId, "rules-a");
    assert.deepEqual(await emitAck(b, "pod:lock", { podId: "p" }), { ok: true }, "free again");
  });

  test("pod:delete releases the lock without a pod:unlocked", async () => {
    const [a, b] = await joined(url, "f-del", "del");
    await emitAck(a, "pod:lock", { podId: "p" });
    const atA = recordAll(a);
    const deleted = next(a, "pod:deleted");
    assert.deepEqual(await emitAck(b, "pod:delete", { podId: "p" }), { ok: true });
    await deleted;
    await sleep(100);
    assert.deepEqual(names(atA, ["pod:unlocked"]), []);
    assert.deepEqual((await api(url, "GET", "/v1/flows/f-del/locks", { bearer: SERVICE })).body, []);
  });

  test("flow:locks right after flow:users, and GET /v1/flows/{id}/locks", async () => {
    const [a] = await joined(url, "f-list", "list", 1);
    await emitAck(a, "pod:lock", { podId: "p1" });
    await emitAck(a, "pod:lock", { podId: "p2" });
    const b = await user(url, "list-b");
    const seen = recordAll(b);
    await join(b, "f-list");
    await sleep(50);
    const order = seen.map(([n]) => n);
    assert.equal(order[order.indexOf("flow:users") + 1], "flow:locks", order.join());
    const locks = seen.find(([n]) => n === "flow:locks")[1];
    assert.deepEqual(locks.map((l) => [l.podId, l.userId]), [["p1", "list-a"], ["p2", "list-a"]]);
    for (const l of locks) {
      assert.deepEqual(Object.keys(l).sort(), ["lockedAt", "podId", "userId"]);
      assert.match(l.lockedAt, ISO);
    }
    const res = await api(url, "GET", "/v1/flows/f-list/locks", { bearer: SERVICE });
    assert.equal(res.status, 200);
    assert.deepEqual(res.body, locks);
    assert.equal((await api(url, "GET", "/v1/flows/f-list/locks")).status, 401);
    assert.equal((await api(url, "GET", "/v1/flows/f-list/locks", { bearer: "nope" })).status, 403);
  });

  test("leaving the flow, or disconnecting on purpose, releases with reason \"released\"", async () => {
    const [a, b, w] = await joined(url, "f-leave", "leave", 3);
    await emitAck(a, "pod:lock", { podId: "pa" });
    await emitAck(b, "pod:lock", { podId: "pb" });
    let unlocked = next(w, "pod:unlocked");
    await emitAck(a, "flow:leave");
    let u = await unlocked;
    assert.deepEqual([u.podId, u.userId, u.reason], ["pa", "leave-a", "released"]);
    assert.match(u.timestamp, ISO);

    unlocked = next(w, "pod:unlocked");
    b.disconnect();
    u = await unlocked;
    assert.deepEqual([u.podId, u.reason], ["pb", "released"]);
  });

  test("a lost connection keeps its locks for the recovery window, then they are released", async () => {
    const [a, w] = await joined(url, "f-lost", "lost");
    await emitAck(a, "pod:lock", { podId: "p" });
    const atW = recordAll(w);
    const lostAt = Date.now();
    a.io.engine.close(); // the transport is gone; no reconnection (harness default)
    await next(w, "user:left");
    await sleep(WINDOW_MS / 2);
    assert.deepEqual(names(atW, ["pod:unlocked"]), [], "kept within the window");
    const u = await next(w, "pod:unlocked", WINDOW_MS + 3000);
    assert.equal(u.reason, "released");
    assert.ok(Date.now() - lostAt >= WINDOW_MS - 100, `released after ${Date.now() - lostAt} ms`);
  });

  test("a recovered reconnect keeps its locks", async () => {
    const a = await user(url, "rec-a", { reconnection: true, reconnectionDelay: 50, reconnectionDelayMax: 50 });
    const [w] = await joined(url, "f-rec", "rec-w", 1);
    await join(a, "f-rec");
    await emitAck(a, "pod:lock", { podId: "p" });
    const atW = recordAll(w);
    const back = new Promise((resolve) => a.io.once("reconnect", resolve));
    a.io.engine.close();
    await back;
    await new Promise((r) => (a.connected ? r() : a.once("connect", r)));
    assert.equal(a.recovered, true, "the session was recovered");
    await sleep(WINDOW_MS * 2);
    assert.deepEqual(names(atW, ["pod:unlocked"]), [], "nothing released");
    const locks = (await api(url, "GET", "/v1/flows/f-rec/locks", { bearer: SERVICE })).body;
    assert.deepEqual(locks.map((l) => [l.podId, l.userId]), [["p", "rec-a"]]);
    const unlocked = next(w, "pod:unlocked");
    assert.deepEqual(await emitAck(a, "pod:unlock", { podId: "p" }), { ok: true }, "still the holder");
    assert.equal((await unlocked).reason, undefined);
  });

  test("twenty clients lock one pod at once: exactly one wins", async () => {
    const racers = await joined(url, "f-race", "race", 10);
    racers.push(...(await joined(url, "f-race", "race2", 10)));
    const acks = await Promise.all(racers.map((s) => emitAck(s, "pod:lock", { podId: "hot" })));
    const winners = acks.filter((a) => a.ok);
    assert.equal(winners.length, 1, JSON.stringify(acks));
    assert.ok(acks.filter((a) => !a.ok).every((a) => a.code === "LOCKED"));
    const locks = (await api(url, "GET", "/v1/flows/f-race/locks", { bearer: SERVICE })).body;
    assert.equal(locks.length, 1);
    const ids = [..."abcdefghij"].flatMap((l) => [`race-${l}`]).concat(
      [..."abcdefghij"].map((l) => `race2-${l}`),
    );
    assert.equal(locks[0].userId, ids[acks.indexOf(winners[0])]);
  });
});
