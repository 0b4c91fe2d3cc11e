// Flow rooms, the relay table, refusals, access policy and the server API
// (CONTRACT.md, "Rooms", "Errors", "Access", "Server API").
import { test, describe, before, after } from "node:test";
import assert from "node:assert/strict";
import {
  node, client, user, cleanup, token, next, emitAck, join, sleep, recordAll, refused, api,
  tempFile, ISO,
} from "./harness.mjs";

after(cleanup);

const SERVICE = "interop-service-token";
const SESSION_FIELDS = ["flowId", "joinedAt", "socketId", "userColor", "userId", "userName"];

/** Asserts a session object as in flow:users / user:joined. */
function assertSession(s, { userId, socketId, flowId, userName, userColor }) {
  assert.deepEqual(Object.keys(s).sort(), SESSION_FIELDS, `session fields of ${JSON.stringify(s)}`);
  assert.equal(s.userId, userId);
  assert.equal(s.socketId, socketId);
  assert.equal(s.flowId, flowId);
  if (userName !== undefined) assert.equal(s.userName, userName);
  else assert.equal(typeof s.userName, "string");
  if (userColor !== undefined) assert.equal(s.userColor, userColor);
  else assert.equal(typeof s.userColor, "string");
  assert.match(s.joinedAt, ISO);
}

/** Two users in one flow: a (already in) and b (joined second). */
async function pair(url, flowId, tag) {
  const a = await user(url, `${tag}-a`);
  const b = await user(url, `${tag}-b`);
  await join(a, flowId, { userName: "Ann", userColor: "#ff0000" });
  const joined = next(a, "user:joined");
  await join(b, flowId, { userName: "Ben", userColor: "#00ff00" });
  await joined;
  return { a, b };
}

// The contract's relay table: client event, payload, outgoing event, the
// fields the others receive (besides the server stamps), and the stamps.
const TABLE = [
  ["pod:create", { pod: { id: "p1", type: "llm", data: { x: 1 } } }, "pod:created", ["pod"], ["userId", "timestamp"]],
  ["pod:update", { podId: "p1", updates: { title: "t", n: 2 } }, "pod:updated", ["podId", "updates"], ["userId", "timestamp"]],
  ["pod:delete", { podId: "p1" }, "pod:deleted", ["podId"], ["userId", "timestamp"]],
  ["pod:move", { podId: "p1", position: { x: 10, y: -20.5 } }, "pod:moved", ["podId", "position"], ["userId"]],
  ["pod:lock", { podId: "p1" }, "pod:locked", ["podId"], ["userId", "timestamp"]],
  ["pod:unlock", { podId: "p1" }, "pod:unlocked", ["podId"], ["userId", "timestamp"]],
  ["edge:create", { edge: { id: "e1", source: "p1", target: "p2" } }, "edge:created", ["edge"], ["userId", "timestamp"]],
  ["edge:delete", { edgeId: "e1" }, "edge:deleted", ["edgeId"], ["userId", "timestamp"]],
  ["cursor:move", { position: { x: 3, y: 4 } }, "cursor:updated", ["position"], ["userId", "socketId"]],
  ["selection:change", { selectedPodIds: ["p1", "p2"] }, "selection:changed", ["selectedPodIds"], ["userId", "socketId"]],
];
const OUT_NAMES = new Set(TABLE.map((r) => r[2]));
const FORGED = { userId: "forged-user", socketId: "forged-socket", timestamp: "1999-01-01T00:00:00.000Z" };

describe("default node (open policy)", () => {
  let url;
  before(async () => {
    url = (await node({ FLOWGATE_SERVICE_TOKEN: SERVICE })).url;
  });

  test("flow:join: flow:users to the joiner, user:joined to the others", async () => {
    const a = await user(url, "join-a");
    const b = await user(url, "join-b");
    const usersA = await join(a, "f-join", { userName: "Ann", userColor: "#ff0000" });
    assert.equal(usersA.length, 1);
    assertSession(usersA[0], { userId: "join-a", socketId: a.id, flowId: "f-join", userName: "Ann", userColor: "#ff0000" });

    const joined = next(a, "user:joined");
    const usersB = await join(b, "f-join", { userName: "Ben", userColor: "#00ff00" });
    const j = await joined;
    assertSession(j, { userId: "join-b", socketId: b.id, flowId: "f-join", userName: "Ben", userColor: "#00ff00" });

    assert.equal(usersB.length, 2, JSON.stringify(usersB));
    const bySocket = Object.fromEntries(usersB.map((s) => [s.socketId, s]));
    assertSession(bySocket[a.id], { userId: "join-a", socketId: a.id, flowId: "f-join", userName: "Ann", userColor: "#ff0000" });
    assertSession(bySocket[b.id], { userId: "join-b", socketId: b.id, flowId: "f-join", userName: "Ben", userColor: "#00ff00" });

    // userName / userColor are optional.
    const c = await user(url, "join-c");
    const usersC = await join(c, "f-join");
    assert.equal(usersC.length, 3);
    assertSession(usersC.find((s) => s.socketId === c.id), { userId: "join-c", socketId: c.id, flowId: "f-join" });
  });

  test("every event of the contract table is relayed to the others, stamped by the server, not echoed", async () => {
    const { a, b } = await pair(url, "f-relay", "relay");
    const atA = recordAll(a);
    for (const [event, payload, out, fields, stamps] of TABLE) {
      const got = next(b, out);
      const ack = await emitAck(a, event, { ...payload, ...FORGED });
      assert.deepEqual(ack, { ok: true }, `ack of ${event}`);
      const data = await got;
      for (const f of fields) assert.deepEqual(data[f], payload[f], `${out}.${f}`);
      for (const s of stamps) assert.ok(s in data, `${out} carries the server's ${s}: ${JSON.stringify(data)}`);
      // Stamps are the server's whenever present; the forged values never pass.
      if ("userId" in data) assert.equal(data.userId, "relay-a", `${out}.userId`);
      if ("socketId" in data) assert.equal(data.socketId, a.id, `${out}.socketId`);
      if ("timestamp" in data) {
        assert.match(data.timestamp, ISO, `${out}.timestamp`);
        assert.notEqual(data.timestamp, FORGED.timestamp);
        assert.ok(Math.abs(Date.parse(data.timestamp) - Date.now()) < 5000, `${out}.timestamp is about now`);
      }
    }
    await emitAck(a, "pod:lock", { podId: "barrier" }); // every echo would be queued before this ack
    await sleep(50);
    const echoes = atA.filter(([name]) => OUT_NAMES.has(name));
    assert.deepEqual(echoes, [], "the sender gets none of its own events back");
  });

  test("\"except the sender\" means the sending socket: the same user's other socket receives", async () => {
    const s1 = await user(url, "twin");
    const s2 = await user(url, "twin");
    await join(s1, "f-twin");
    await join(s2, "f-twin");
    const at1 = recordAll(s1);
    const got = next(s2, "pod:moved");
    await emitAck(s1, "pod:move", { podId: "t", position: { x: 0, y: 0 } });
    assert.deepEqual(await got, { podId: "t", position: { x: 0, y: 0 }, userId: "twin" });
    await sleep(50);
    assert.deepEqual(at1.filter(([n]) => n === "pod:moved"), []);
  });

  test("events without an ack callback are relayed too", async () => {
    const { a, b } = await pair(url, "f-noack", "noack");
    const got = next(b, "pod:moved");
    a.emit("pod:move", { podId: "p9", position: { x: 1, y: 2 } });
    assert.deepEqual(await got, { podId: "p9", position: { x: 1, y: 2 }, userId: "noack-a" });
  });

  test("a binary payload arrives as a Buffer with the same bytes", async () => {
    const { a, b } = await pair(url, "f-bin", "bin");
    const bytes = Buffer.from([0, 1, 2, 250, 255, 0x7f, 0x80, 10, 13]);
    const big = Buffer.alloc(64 * 1024, 0xab);
    const got = next(b, "pod:updated");
    const ack = await emitAck(a, "pod:update", { podId: "pb", updates: { blob: bytes, nested: { big }, title: "bin" } });
    assert.deepEqual(ack, { ok: true });
    const data = await got;
    assert.equal(data.podId, "pb");
    assert.equal(data.userId, "bin-a");
    assert.equal(data.updates.title, "bin");
    assert.ok(Buffer.isBuffer(data.updates.blob), `blob is a Buffer, got ${typeof data.updates.blob}`);
    assert.ok(data.updates.blob.equals(bytes), "same bytes");
    assert.ok(Buffer.isBuffer(data.updates.nested.big));
    assert.ok(data.updates.nested.big.equals(big), "same bytes (64 KiB)");
    // The connection still works in text mode afterwards.
    const moved = next(b, "pod:moved");
    await emitAck(a, "pod:move", { podId: "pb", position: { x: 0, y: 0 } });
    await moved;
  });

  test("flow:leave sends user:left to the others; events after it are NOT_IN_FLOW", async () => {
    const { a, b } = await pair(url, "f-leave", "leave");
    const left = next(b, "user:left");
    assert.deepEqual(await emitAck(a, "flow:leave"), { ok: true });
    assert.deepEqual(await left, { userId: "leave-a", socketId: a.id, userName: "Ann" });
    const { ack, error } = await refused(a, "pod:move", { podId: "p", position: { x: 0, y: 0 } });
    assert.equal(ack.ok, false);
    assert.equal(ack.code, "NOT_IN_FLOW");
    assert.equal(error.code, "NOT_IN_FLOW");
  });

  test("disconnect sends user:left", async () => {
    const { a, b } = await pair(url, "f-disc", "disc");
    const left = next(b, "user:left");
    const id = a.id;
    a.disconnect();
    assert.deepEqual(await left, { userId: "disc-a", socketId: id, userName: "Ann" });
    // An abrupt close (no Socket.IO DISCONNECT, just the transport) too.
    const c = await user(url, "disc-c");
    await join(c, "f-disc", { userName: "Cid" });
    const left2 = next(b, "user:left");
    const cid = c.id;
    c.io.engine.close();
    assert.deepEqual(await left2, { userId: "disc-c", socketId: cid, userName: "Cid" });
  });

  test("joining a second flow leaves the first", async () => {
    const { a, b } = await pair(url, "f-first", "second");
    const c = await user(url, "second-c");
    await join(c, "f-second");
    const leftFirst = next(b, "user:left");
    const joinedSecond = next(c, "user:joined");
    const users = await join(a, "f-second", { userName: "Ann" });
    assert.deepEqual(await leftFirst, { userId: "second-a", socketId: a.id, userName: "Ann" });
    assert.equal((await joinedSecond).socketId, a.id);
    assert.deepEqual(users.map((s) => s.socketId).sort(), [a.id, c.id].sort());
    // Now a's events reach c, not b.
    const atB = recordAll(b);
    const got = next(c, "pod:moved");
    await emitAck(a, "pod:move", { podId: "p", position: { x: 1, y: 1 } });
    await got;
    await emitAck(b, "pod:lock", { podId: "barrier" });
    await sleep(50);
    assert.deepEqual(atB.filter(([n]) => n === "pod:moved"), [], "the first flow no longer gets a's events");
    const presence = await api(url, "GET", "/v1/flows/f-first/presence", { bearer: SERVICE });
    assert.deepEqual(presence.body.map((s) => s.socketId), [b.id]);
  });

  test("events before flow:join: NOT_IN_FLOW, and the connection stays open", async () => {
    const a = await user(url, "early-a");
    for (const [event, payload] of [TABLE[0], TABLE[3], TABLE[8]]) {
      const { ack, error } = await refused(a, event, payload);
      assert.deepEqual(Object.keys(ack).sort(), ["code", "message", "ok"]);
      assert.equal(ack.ok, false);
      assert.equal(ack.code, "NOT_IN_FLOW", event);
      assert.equal(typeof ack.message, "string");
      assert.equal(error.code, "NOT_IN_FLOW");
      assert.equal(typeof error.message, "string");
    }
    const { ack } = await refused(a, "flow:leave");
    assert.equal(ack.code, "NOT_IN_FLOW");
    assert.ok(a.connected);
  });

  test("a bad flowId is INVALID_FLOW_ID", async () => {
    const a = await user(url, "badflow-a");
    for (const payload of [{}, { flowId: "" }, { flowId: "a b" }, { flowId: "{x}" }, { flowId: "x".repeat(129) },
      { flowId: { id: 1 } }, { flowId: null }, "f1"]) {
      const { ack, error } = await refused(a, "flow:join", payload);
      assert.equal(ack.ok, false, JSON.stringify(payload));
      assert.equal(ack.code, "INVALID_FLOW_ID", JSON.stringify(payload));
      assert.equal(error.code, "INVALID_FLOW_ID");
    }
    assert.ok(a.connected);
    await join(a, "ok-after-bad"); // still usable
  });

  test("a missing or mistyped field is INVALID_PAYLOAD, an unknown event UNKNOWN_EVENT, and neither is relayed", async () => {
    const { a, b } = await pair(url, "f-invalid", "invalid");
    const atB = recordAll(b);
    for (const [event, payload] of [
      ["pod:move", { podId: "p" }],
      ["pod:move", { position: { x: 1, y: 1 } }],
      ["pod:update", { podId: "p" }],
      ["pod:create", {}],
      ["pod:move", { podId: "p", position: { x: "a", y: 1 } }],
      ["selection:change", { selectedPodIds: "p1" }],
      ["pod:update", { podId: { id: "p" }, updates: {} }],
      ["edge:delete", "e1"],
      ["cursor:move", undefined],
      ["no:such:event", { podId: "p" }],
    ]) {
      const { ack, error } = await refused(a, event, payload);
      assert.equal(ack.ok, false, `${event} ${JSON.stringify(payload)}`);
      const code = event === "no:such:event" ? "UNKNOWN_EVENT" : "INVALID_PAYLOAD";
      assert.equal(ack.code, code, `${event} ${JSON.stringify(payload)}`);
      assert.equal(error.code, code);
    }
    // Ordered after the refusals: once b has this, anything relayed before it would be recorded.
    const got = next(b, "pod:moved");
    await emitAck(a, "pod:move", { podId: "ok", position: { x: 0, y: 0 } });
    assert.equal((await got).podId, "ok");
    const relayed = atB.filter(([n]) => n !== "user:joined");
    assert.deepEqual(relayed.map(([n, d]) => [n, d.podId]), [["pod:moved", "ok"]]);
    assert.ok(a.connected);
  });

  test("a string cut in the middle of an emoji is relayed, not a reason to close", async () => {
    // JSON.stringify writes the lone half as "\ud83d": valid JSON the Node
    // gateway accepted. It arrives as U+FFFD, what a browser shows for it.
    const { a, b } = await pair(url, "f-surrogate", "surrogate");
    const got = next(b, "pod:updated");
    const cut = "hi" + "\u{1F600}".slice(0, 1);
    assert.deepEqual(await emitAck(a, "pod:update", { podId: "p", updates: { name: cut, whole: "\u{1F600}" } }), { ok: true });
    const d = await got;
    assert.equal(d.updates.name, "hi\uFFFD");
    assert.equal(d.updates.whole, "\u{1F600}", "a whole pair is kept");
    assert.ok(a.connected && b.connected);
  });

  describe("server API", () => {
    test("POST /v1/flows/{flowId}/events reaches every member of the room", async () => {
      const { a, b } = await pair(url, "f-api", "api");
      const outsider = await user(url, "api-out");
      await join(outsider, "f-api-other");
      const atOutsider = recordAll(outsider);
      const gotA = next(a, "execution:started");
      const gotB = next(b, "execution:started");
      const data = { executionId: "x1", podId: "p1", nested: { n: [1, 2, 3] } };
      const res = await api(url, "POST", "/v1/flows/f-api/events", { bearer: SERVICE, body: { event: "execution:started", data } });
      assert.equal(res.status, 202, JSON.stringify(res.body));
      assert.equal(res.body.ok, true);
      assert.ok("offset" in res.body, "the answer has an offset");
      assert.deepEqual(await gotA, data);
      assert.deepEqual(await gotB, data);
      const res2 = await api(url, "POST", "/v1/flows/f-api-other/events", {
        bearer: SERVICE, body: { event: "execution:token", data: { t: "x" } },
      });
      assert.equal(res2.status, 202);
      await sleep(50);
      assert.deepEqual(atOutsider.map(([n]) => n), ["execution:token"], "only its own flow's events");
    });

    test("POST /v1/flows/{flowId}/events refuses the gateway's own event names and control characters", async () => {
      const { a } = await pair(url, "f-api-names", "names");
      const seen = recordAll(a);
      for (const event of ["user:left", "user:joined", "flow:users", "flow:locks", "pod:unlocked", "pod:locked", "connected", "error", "a\u0000b", "e v\n", ""]) {
        const res = await api(url, "POST", "/v1/flows/f-api-names/events", { bearer: SERVICE, body: { event, data: {} } });
        assert.equal(res.status, 400, `${JSON.stringify(event)}: ${res.status} ${JSON.stringify(res.body)}`);
        assert.equal(res.body?.error?.code, "INVALID_EVENT");
      }
      await sleep(100);
      assert.deepEqual(seen.map(([n]) => n), [], "nothing was relayed");
    });

    test("GET /v1/flows/{flowId}/presence lists the sessions", async () => {
      const { a, b } = await pair(url, "f-presence", "presence");
      const res = await api(url, "GET", "/v1/flows/f-presence/presence", { bearer: SERVICE });
      assert.equal(res.status, 200);
      assert.ok(Array.isArray(res.body), JSON.stringify(res.body));
      assert.equal(res.body.length, 2);
      const bySocket = Object.fromEntries(res.body.map((s) => [s.socketId, s]));
      assertSession(bySocket[a.id], { userId: "presence-a", socketId: a.id, flowId: "f-presence", userName: "Ann", userColor: "#ff0000" });
      assertSession(bySocket[b.id], { userId: "presence-b", socketId: b.id, flowId: "f-presence", userName: "Ben", userColor: "#00ff00" });
      const left = next(a, "user:left");
      b.disconnect();
      await left;
      const after = await api(url, "GET", "/v1/flows/f-presence/presence", { bearer: SERVICE });
      assert.deepEqual(after.body.map((s) => s.socketId), [a.id]);
      const empty = await api(url, "GET", "/v1/flows/f-nobody/presence", { bearer: SERVICE });
      assert.equal(empty.status, 200);
      assert.deepEqual(empty.body, []);
    });

    test("a missing or wrong service token is a 401/403 JSON error", async () => {
      const cases = [
        ["no token", undefined, [401]],
        ["wrong token", "not-the-token", [401, 403]],
        ["a user JWT", token("api-user"), [401, 403]],
        ["token with a suffix", SERVICE + "x", [401, 403]],
      ];
      for (const [what, bearer, statuses] of cases) {
        for (const [method, path, body] of [
          ["POST", "/v1/flows/f-api/events", { event: "execution:started", data: {} }],
          ["GET", "/v1/flows/f-api/presence", undefined],
        ]) {
          const res = await api(url, method, path, { bearer, body });
          assert.ok(statuses.includes(res.status), `${what} ${method} ${path}: ${res.status}`);
          assert.equal(typeof res.body?.error?.code, "string", `${what}: ${JSON.stringify(res.body)}`);
          assert.equal(typeof res.body.error.message, "string");
        }
      }
    });

    test("bad requests are 4xx JSON errors", async () => {
      for (const [path, body] of [
        ["/v1/flows/f-api/events", { data: {} }],
        ["/v1/flows/f-api/events", { event: "flow:join", data: {} }],
        ["/v1/flows/bad%20flow/events", { event: "execution:started", data: {} }],
      ]) {
        const res = await api(url, "POST", path, { bearer: SERVICE, body });
        assert.ok(res.status >= 400 && res.status < 500, `${path} ${JSON.stringify(body)}: ${res.status}`);
        assert.equal(typeof res.body?.error?.code, "string", JSON.stringify(res.body));
      }
    });
  });
});

describe("claims access policy", () => {
  let url;
  before(async () => {
    url = (await node({ FLOWGATE_ACCESS_POLICY: "claims" })).url;
  });
  const withFlows = (userId, flows) =>
    client(url, { auth: { token: token(userId, { extra: flows === undefined ? {} : { flows } }) } });

  test("a flow listed in the claim may be joined, another is FORBIDDEN", async () => {
    const s = await withFlows("claims-a", ["f-allowed", "f-also"]);
    await join(s, "f-allowed");
    const { ack, error } = await refused(s, "flow:join", { flowId: "f-denied" });
    assert.equal(ack.ok, false);
    assert.equal(ack.code, "FORBIDDEN");
    assert.equal(error.code, "FORBIDDEN");
    assert.ok(s.connected);
    await join(s, "f-also");
  });

  test('"*" allows every flow; no claim allows none', async () => {
    const star = await withFlows("claims-star", "*");
    await join(star, "f-anything");
    const starList = await withFlows("claims-star2", ["*"]);
    await join(starList, "f-anything-else");
    const none = await withFlows("claims-none", undefined);
    const { ack } = await refused(none, "flow:join", { flowId: "f-allowed" });
    assert.equal(ack.code, "FORBIDDEN");
  });

  test("a FORBIDDEN join is not announced to the room", async () => {
    const member = await withFlows("claims-m", ["f-guarded"]);
    await join(member, "f-guarded");
    const atMember = recordAll(member);
    const intruder = await withFlows("claims-i", ["f-elsewhere"]);
    const { ack } = await refused(intruder, "flow:join", { flowId: "f-guarded" });
    assert.equal(ack.code, "FORBIDDEN");
    const friend = await withFlows("claims-f", ["f-guarded"]);
    const joined = next(member, "user:joined");
    const users = await join(friend, "f-guarded");
    await joined;
    assert.deepEqual(atMember.map(([n, d]) => [n, d.userId]), [["user:joined", "claims-f"]]);
    assert.deepEqual(users.map((u) => u.userId).sort(), ["claims-f", "claims-m"]);
  });
});

describe("FLOWGATE_EVENTS_FILE", () => {
  let url;
  before(async () => {
    const file = tempFile(
      "events.json",
      JSON.stringify({
        events: [
          {
            event: "note:add",
            emit: "note:added",
            fields: ["text", "color"],
            stamp: ["userId", "socketId", "timestamp"],
            rateLimited: true,
            persist: false,
            volatile: false,
          },
        ],
      }),
    );
    url = (await node({ FLOWGATE_EVENTS_FILE: file })).url;
  });

  test("a configured event is relayed with its fields and stamps", async () => {
    const { a, b } = await pair(url, "f-notes", "notes");
    const got = next(b, "note:added");
    const ack = await emitAck(a, "note:add", { text: "hello", color: "yellow", ...FORGED });
    assert.deepEqual(ack, { ok: true });
    const data = await got;
    assert.equal(data.text, "hello");
    assert.equal(data.color, "yellow");
    assert.equal(data.userId, "notes-a");
    assert.equal(data.socketId, a.id);
    assert.match(data.timestamp, ISO);
    assert.notEqual(data.timestamp, FORGED.timestamp);
    const { ack: bad } = await refused(a, "note:add", { text: "no color" });
    assert.equal(bad.code, "INVALID_PAYLOAD");
  });
});
