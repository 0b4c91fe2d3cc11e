// Malformed packets close that one connection, never the node or another
// connection (CONTRACT.md, "Transport"). Driven with raw WebSocket frames
// (the `ws` package socket.io-client itself runs on), since the stock client
// never sends malformed packets.
import { test, describe, before, after } from "node:test";
import assert from "node:assert/strict";
import WebSocket from "ws";
import { node, user, cleanup, token, join, next, emitAck } from "./harness.mjs";

after(cleanup);

/** A raw Engine.IO / Socket.IO connection to /flows, past CONNECT. */
function rawConnect(url, userId, ms = 3000) {
  const ws = new WebSocket(url.replace(/^http/, "ws") + "/socket.io/?EIO=4&transport=websocket");
  const frames = [];
  const closed = new Promise((resolve) => ws.on("close", (code, reason) => resolve({ code, reason: reason.toString() })));
  ws.on("error", () => {});
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      ws.terminate();
      reject(new Error(`no CONNECT answer within ${ms} ms: ${JSON.stringify(frames)}`));
    }, ms);
    ws.on("message", (data, isBinary) => {
      const f = isBinary ? data : data.toString();
      frames.push(f);
      if (f === "2") ws.send("3");
      else if (typeof f === "string" && f.startsWith("0{")) ws.send(`40/flows,${JSON.stringify({ token: token(userId) })}`);
      else if (typeof f === "string" && f.startsWith("40/flows,")) {
        clearTimeout(timer);
        resolve({ ws, frames, closed });
      } else if (typeof f === "string" && f.startsWith("44/flows,")) {
        clearTimeout(timer);
        reject(new Error(`CONNECT_ERROR: ${f}`));
      }
    });
  });
}

/** Resolves with the close, or rejects if the server keeps the connection open for `ms`. */
function closedWithin(conn, ms = 3000) {
  return Promise.race([
    conn.closed,
    new Promise((_, reject) => setTimeout(() => reject(new Error(`still open after ${ms} ms`)), ms)),
  ]);
}

describe("malformed packets", () => {
  let n;
  let bystander;
  before(async () => {
    n = await node();
    bystander = await user(n.url, "mal-bystander");
    await join(bystander, "f-mal");
  });

  const cases = [
    ["unknown Engine.IO packet type", ["9"]],
    ["unknown Socket.IO packet type", ["49/flows,"]],
    ["bad JSON", ['42/flows,["pod:move",{']],
    ["EVENT payload not an array", ['42/flows,{"a":1}']],
    ["EVENT payload an empty array", ["42/flows,[]"]],
    ["EVENT name not a string", ["42/flows,[42,{}]"]],
    ["ACK for an id the server never issued", ['43/flows,99[{"ok":true}]']],
    ["binary frame with no BINARY_EVENT announced", [Buffer.from([1, 2, 3])]],
    ["placeholder pointing past the attachments", ['451-/flows,["pod:update",{"podId":"p","updates":{"_placeholder":true,"num":5}}]', Buffer.from([1])]],
    ["text frame while attachments are due", ['451-/flows,["pod:update",{"podId":"p","updates":{"_placeholder":true,"num":0}}]', '42/flows,["pod:lock",{"podId":"p"}]']],
  ];

  for (const [what, frames] of cases) {
    test(`${what}: that connection closes; the node and others carry on`, async () => {
      const conn = await rawConnect(n.url, "mal-raw");
      // The connection works before the bad frame.
      conn.ws.send('42/flows,["flow:join",{"flowId":"f-mal-raw"}]');
      for (const f of frames) conn.ws.send(f);
      const { code } = await closedWithin(conn);
      assert.ok(code === 1002 || code === 1003 || code === 1007 || code === 1008 || code === 1011,
        `closed with an error close code, got ${code}`);
      assert.equal(n.proc.exitCode, null, "the node is still running");
      assert.ok(bystander.connected, "the other connection is unaffected");
      assert.deepEqual(await emitAck(bystander, "pod:lock", { podId: "p" }), { ok: true });
    });
  }

  test("a well-formed raw client gets acks and relays (the raw driver itself works)", async () => {
    const conn = await rawConnect(n.url, "mal-good");
    const got = next(bystander, "pod:moved");
    conn.ws.send('42/flows,["flow:join",{"flowId":"f-mal"}]');
    conn.ws.send('42/flows,1["pod:move",{"podId":"raw","position":{"x":1,"y":2}}]');
    assert.deepEqual(await got, { podId: "raw", position: { x: 1, y: 2 }, userId: "mal-good" });
    const deadline = Date.now() + 2000;
    while (!conn.frames.some((f) => f === '43/flows,1[{"ok":true}]') && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 10));
    }
    assert.ok(conn.frames.includes('43/flows,1[{"ok":true}]'), JSON.stringify(conn.frames));
    conn.ws.close();
  });
});
