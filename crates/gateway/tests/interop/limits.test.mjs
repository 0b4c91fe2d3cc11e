// The per-user rate limit (CONTRACT.md, "Rate limit"): 20 events per second,
// burst 20, shared by all of a user's connections.
import { test, describe, before, after } from "node:test";
import assert from "node:assert/strict";
import { node, user, cleanup, join, next, emitAck, sleep, recordAll } from "./harness.mjs";

after(cleanup);

// A token refills every 1000/20 = 50 ms; a burst of 25 emits leaves the
// socket in well under that, but one refill is tolerated.
const REFILL_MS = 50;

/** Emits `n` pod:move events back to back, each with an ack; resolves with the acks in order. */
function burst(socket, n, tag = "p") {
  const acks = [];
  for (let i = 0; i < n; i++) {
    acks.push(emitAck(socket, "pod:move", { podId: `${tag}${i}`, position: { x: i, y: i } }));
  }
  return Promise.all(acks);
}

const okCount = (acks) => acks.filter((a) => a.ok === true).length;

/** Joins (which spends one token), then waits until that token is back. */
async function joinAndRefill(socket, flowId) {
  await join(socket, flowId);
  await sleep(REFILL_MS * 2);
}

describe("default budget (20/s, burst 20)", () => {
  let url;
  before(async () => {
    url = (await node()).url;
  });

  test("the 21st event within a second is refused with RATE_LIMIT and a failed ack, and not relayed", async () => {
    const a = await user(url, "rl-a");
    const b = await user(url, "rl-b");
    await joinAndRefill(b, "f-rl");
    await joinAndRefill(a, "f-rl");
    const errors = [];
    a.on("error", (e) => errors.push(e));
    const atB = recordAll(b);

    const acks = await burst(a, 25);
    const ok = okCount(acks);
    assert.ok(ok === 20 || ok === 21, `20 accepted (21 if a token refilled), got ${ok}: ${JSON.stringify(acks)}`);
    for (let i = 0; i < 20; i++) assert.deepEqual(acks[i], { ok: true }, `event ${i + 1} is within the burst`);
    for (const ack of acks.filter((x) => !x.ok)) {
      assert.equal(ack.code, "RATE_LIMIT");
      assert.equal(typeof ack.message, "string");
    }
    // One `error` event per refused event, each RATE_LIMIT.
    const refusedCount = 25 - ok;
    const deadline = Date.now() + 2000;
    while (errors.length < refusedCount && Date.now() < deadline) await sleep(10);
    assert.equal(errors.length, refusedCount, JSON.stringify(errors));
    for (const e of errors) assert.equal(e.code, "RATE_LIMIT");
    assert.ok(a.connected, "the connection stays open");

    // Only the accepted events reached b: wait for the last accepted one.
    const lastOk = acks.map((x, i) => (x.ok ? i : -1)).filter((i) => i >= 0).pop();
    const deadline2 = Date.now() + 2000;
    while (!atB.some(([n, d]) => n === "pod:moved" && d.podId === `p${lastOk}`) && Date.now() < deadline2) await sleep(10);
    const moved = atB.filter(([n]) => n === "pod:moved").map(([, d]) => d.podId);
    const expected = acks.map((x, i) => (x.ok ? `p${i}` : null)).filter(Boolean);
    assert.deepEqual(moved, expected, "exactly the accepted events are relayed");

    // The budget refills: after a few refill periods events pass again.
    await sleep(REFILL_MS * 3);
    assert.deepEqual(await emitAck(a, "pod:move", { podId: "again", position: { x: 0, y: 0 } }), { ok: true });
  });

  test("unknown and refused events count too (every client event counts)", async () => {
    const a = await user(url, "rl-count");
    // Not joined: within budget these are NOT_IN_FLOW / INVALID_PAYLOAD, beyond it RATE_LIMIT.
    const acks = await Promise.all(
      Array.from({ length: 25 }, (_, i) =>
        emitAck(a, i % 2 ? "no:such:event" : "pod:lock", { podId: `x${i}` }),
      ),
    );
    const limited = acks.filter((x) => x.code === "RATE_LIMIT").length;
    assert.ok(limited === 5 || limited === 4, `RATE_LIMIT for 5 (4 after a refill), got ${limited}: ${JSON.stringify(acks)}`);
    for (let i = 0; i < 20; i++) assert.notEqual(acks[i].code, "RATE_LIMIT", `event ${i + 1}`);
  });

  test("two users do not share a budget", async () => {
    const a = await user(url, "rl-u1");
    const b = await user(url, "rl-u2");
    await joinAndRefill(a, "f-rl-2");
    await joinAndRefill(b, "f-rl-2");
    const acksA = await burst(a, 22, "a");
    assert.ok(acksA.some((x) => x.code === "RATE_LIMIT"), "user 1 is over budget");
    const acksB = await burst(b, 20, "b");
    assert.equal(okCount(acksB), 20, `user 2 still has its whole budget: ${JSON.stringify(acksB)}`);
  });

  test("two sockets of the same user share one budget", async () => {
    const s1 = await user(url, "rl-same");
    const s2 = await user(url, "rl-same");
    await joinAndRefill(s1, "f-rl-3");
    await joinAndRefill(s2, "f-rl-3");
    const [acks1, acks2] = await Promise.all([burst(s1, 13, "s1-"), burst(s2, 12, "s2-")]);
    const ok = okCount(acks1) + okCount(acks2);
    assert.ok(ok === 20 || ok === 21, `20 accepted across both sockets (21 after a refill), got ${ok}`);
    const limited = [...acks1, ...acks2].filter((x) => x.code === "RATE_LIMIT").length;
    assert.equal(limited, 25 - ok);
    // And sequentially: the second socket finds the budget spent by the first.
    await sleep(1000 / 20 * 21); // full refill
    const first = await burst(s1, 20, "q");
    assert.equal(okCount(first), 20);
    const second = await burst(s2, 5, "r");
    assert.ok(okCount(second) <= 1, `the other socket of the same user is over budget: ${JSON.stringify(second)}`);
  });

  test("refusals are counted in /metrics", async () => {
    const res = await fetch(url + "/metrics", { signal: AbortSignal.timeout(3000) });
    assert.equal(res.status, 200);
    const text = await res.text();
    const line = text.split("\n").find((l) => !l.startsWith("#") && l.includes("RATE_LIMIT"));
    assert.ok(line, "a metric line labelled RATE_LIMIT");
    assert.ok(Number(line.trim().split(/\s+/).pop()) > 0, line);
  });
});

describe("configured budget", () => {
  test("FLOWGATE_RATE_LIMIT_PER_SEC / FLOWGATE_RATE_LIMIT_BURST", async () => {
    const { url } = await node({ FLOWGATE_RATE_LIMIT_PER_SEC: "2", FLOWGATE_RATE_LIMIT_BURST: "5" });
    const a = await user(url, "cfg-a");
    await join(a, "f-cfg"); // 1 of 5
    const acks = await burst(a, 6);
    assert.equal(okCount(acks), 4, JSON.stringify(acks));
    assert.deepEqual(acks.slice(4).map((x) => x.code), ["RATE_LIMIT", "RATE_LIMIT"]);
    const other = await user(url, "cfg-b");
    await join(other, "f-cfg");
    assert.equal(okCount(await burst(other, 4)), 4);
  });
});

describe("FLOWGATE_MAX_PAYLOAD", () => {
  test("an oversize frame closes that one connection only (1009), the room sees user:left", async () => {
    const { url } = await node({ FLOWGATE_MAX_PAYLOAD: "4000" });
    const big = await user(url, "mp-big");
    const peer = await user(url, "mp-peer");
    await join(big, "f-mp", { userName: "Big" });
    await join(peer, "f-mp");
    const id = big.id;
    const left = next(peer, "user:left");
    const gone = new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new Error("no disconnect within 3000 ms")), 3000);
      big.once("disconnect", (reason, details) => {
        clearTimeout(t);
        resolve({ reason, code: details?.context?.code });
      });
    });
    // Within the limit first: relayed.
    const ok = next(peer, "pod:updated");
    assert.deepEqual(await emitAck(big, "pod:update", { podId: "p", updates: { s: "x".repeat(1000) } }), { ok: true });
    await ok;
    big.emit("pod:update", { podId: "p", updates: { s: "x".repeat(8000) } });
    const { reason, code } = await gone;
    assert.equal(reason, "transport close");
    assert.equal(code, 1009, "WebSocket close code 1009 (message too big)");
    assert.deepEqual(await left, { userId: "mp-big", socketId: id, userName: "Big" });
    assert.ok(peer.connected, "the other connection is unaffected");
    assert.deepEqual(await emitAck(peer, "pod:lock", { podId: "p" }), { ok: true });
  });
});
