// Test harness for the interop tests: starts a real `flowgate` binary on a
// free loopback port, mints JWTs, and wraps socket.io-client in promises.
import { spawn } from "node:child_process";
import { fileURLToPath } from "node:url";
import path from "node:path";
import jwt from "jsonwebtoken";
import { io } from "socket.io-client";

const here = path.dirname(fileURLToPath(import.meta.url));
export const BIN =
  process.env.FLOWGATE_BIN ?? path.resolve(here, "../../../../target/debug/flowgate");
export const SECRET = "interop-secret";

/** Starts a node; resolves to { url, proc, logs, stop() }. */
export async function startNode(env = {}) {
  const proc = spawn(BIN, ["serve"], {
    env: {
      PATH: process.env.PATH,
      HOST: "127.0.0.1",
      PORT: "0",
      JWT_ACCESS_TOKEN_SECRET: SECRET,
      JWT_LEEWAY_SECS: "0",
      FLOWGATE_LOG_FORMAT: "json",
      FLOWGATE_DRAIN_NOTICE_MS: "0",
      FLOWGATE_DRAIN_WINDOW_MS: "200",
      FLOWGATE_SHUTDOWN_DEADLINE_MS: "5000",
      RUST_LOG: "info",
      ...env,
    },
    stdio: ["ignore", "pipe", "pipe"],
  });
  const logs = [];
  let buf = "";
  const url = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("flowgate did not start:\n" + logs.join("\n"))), 15000);
    proc.on("exit", (code) => reject(new Error(`flowgate exited ${code}:\n${logs.join("\n")}`)));
    const onData = (chunk) => {
      buf += chunk;
      let nl;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        logs.push(line);
        const m = /"message":"listening".*?"addr":"([^"]+)"/.exec(line);
        if (m) {
          clearTimeout(timer);
          resolve(`http://${m[1]}`);
        }
      }
    };
    proc.stdout.setEncoding("utf8").on("data", onData);
    proc.stderr.setEncoding("utf8").on("data", (c) => logs.push(...c.split("\n")));
  });
  return {
    url,
    proc,
    logs,
    async stop() {
      if (proc.exitCode !== null) return;
      const exited = new Promise((r) => proc.once("exit", r));
      proc.kill("SIGTERM");
      await exited;
    },
  };
}

/** A token for `userId`, valid for `ttl` seconds. */
export function token(userId, { ttl = 3600, secret = SECRET, extra = {} } = {}) {
  const now = Math.floor(Date.now() / 1000);
  return jwt.sign({ userId, exp: now + ttl, ...extra }, secret, { algorithm: "HS256" });
}

/** Connects to /flows; resolves with the socket once `connected` arrived. */
export function connect(url, opts = {}) {
  const socket = io(url + "/flows", {
    transports: ["websocket"],
    reconnection: false,
    forceNew: true,
    ...opts,
  });
  return new Promise((resolve, reject) => {
    socket.once("connected", (info) => {
      socket.connectedInfo = info;
      resolve(socket);
    });
    socket.once("connect_error", (err) => {
      socket.close();
      reject(err);
    });
  });
}

/**
 * Resolves with the payload of the next `event` on `socket` (its first
 * argument: room events carry their room offset as a trailing argument,
 * which `nextArgs` shows).
 */
export function next(socket, event, ms = 3000) {
  return nextArgs(socket, event, ms).then((args) => args[0]);
}

/** Resolves with every argument of the next `event` on `socket`. */
export function nextArgs(socket, event, ms = 3000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      socket.off(event, on);
      reject(new Error(`no ${event} within ${ms} ms`));
    }, ms);
    const on = (...args) => {
      clearTimeout(timer);
      resolve(args);
    };
    socket.once(event, on);
  });
}

/** Emits with an ack; resolves with the ack payload. */
export function emitAck(socket, event, data, ms = 3000) {
  return socket.timeout(ms).emitWithAck(event, data);
}

/** Collects every `event` on `socket` into an array. */
export function collect(socket, event) {
  const seen = [];
  socket.on(event, (d) => seen.push(d));
  return seen;
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Joins `flowId`; resolves with the `flow:users` list. */
export async function join(socket, flowId, extra = {}) {
  const users = next(socket, "flow:users");
  const ack = await emitAck(socket, "flow:join", { flowId, ...extra });
  if (!ack.ok) throw new Error(`join refused: ${JSON.stringify(ack)}`);
  return users;
}

// ---------------------------------------------------------------------------
// Extensions used by the *.test.mjs files.

import crypto from "node:crypto";
import fs from "node:fs";
import os from "node:os";

const liveNodes = new Set();
const liveSockets = new Set();
// Never leave a node behind if the test process dies.
process.on("exit", () => {
  for (const n of liveNodes) if (n.proc.exitCode === null) n.proc.kill("SIGKILL");
});

/** startNode, remembered so that `cleanup()` stops it. */
export async function node(env = {}) {
  const n = await startNode(env);
  liveNodes.add(n);
  n.port = Number(new URL(n.url).port);
  return n;
}

/** Remembers a socket so that `cleanup()` closes it. */
export function track(socket) {
  liveSockets.add(socket);
  return socket;
}

/** connect(), remembered for `cleanup()`. */
export async function client(url, opts = {}) {
  const s = await connect(url, opts);
  return track(s);
}

/** connect() for user `userId` with a fresh token in the auth payload. */
export function user(url, userId, opts = {}) {
  return client(url, { auth: { token: token(userId) }, ...opts });
}

/** Closes every tracked socket, SIGTERMs every node (bounded), removes temp files. */
export async function cleanup() {
  for (const s of liveSockets) s.close();
  liveSockets.clear();
  await Promise.all(
    [...liveNodes].map(async (n) => {
      liveNodes.delete(n);
      if (n.proc.exitCode !== null || n.proc.signalCode !== null) return;
      const killer = setTimeout(() => n.proc.kill("SIGKILL"), 8000);
      await n.stop();
      clearTimeout(killer);
    }),
  );
  for (const dir of tempDirs) fs.rmSync(dir, { recursive: true, force: true });
  tempDirs.clear();
}

/**
 * Opens a socket that is expected to be refused; resolves with the
 * connect_error, rejects if `connected` arrives or nothing within `ms`.
 */
export function connectError(url, opts = {}, { nsp = "/flows", ms = 3000 } = {}) {
  const socket = io(url + nsp, {
    transports: ["websocket"],
    reconnection: false,
    forceNew: true,
    ...opts,
  });
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      socket.close();
      reject(new Error(`neither connect_error nor connected within ${ms} ms`));
    }, ms);
    socket.once("connect_error", (err) => {
      clearTimeout(timer);
      socket.close();
      resolve(err);
    });
    socket.once("connected", (info) => {
      clearTimeout(timer);
      socket.close();
      reject(new Error(`connected although it should be refused: ${JSON.stringify(info)}`));
    });
  });
}

const b64url = (x) => Buffer.from(typeof x === "string" ? x : JSON.stringify(x)).toString("base64url");

/** A JWT built by hand: any header, HMAC-SHA256 with `secret`, or no signature when secret is null. */
export function rawJwt(header, payload, secret) {
  const input = `${b64url(header)}.${b64url(payload)}`;
  if (secret == null) return `${input}.`;
  const sig = crypto.createHmac("sha256", secret).update(input).digest("base64url");
  return `${input}.${sig}`;
}

export const nowSecs = () => Math.floor(Date.now() / 1000);

const tempDirs = new Set();

/** A temp file holding `text`; `cleanup()` removes it. */
export function tempFile(name, text) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "flowgate-interop-"));
  tempDirs.add(dir);
  const file = path.join(dir, name);
  fs.writeFileSync(file, text);
  return file;
}

/** Calls the server API; resolves with { status, body } (body parsed as JSON when possible). */
export async function api(url, method, pathname, { body, bearer } = {}) {
  const headers = {};
  if (bearer !== undefined) headers.authorization = `Bearer ${bearer}`;
  if (body !== undefined) headers["content-type"] = "application/json";
  const res = await fetch(url + pathname, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    signal: AbortSignal.timeout(3000),
  });
  const text = await res.text();
  let parsed = text;
  try {
    parsed = JSON.parse(text);
  } catch {}
  return { status: res.status, body: parsed };
}

/** Records every incoming event on `socket` as [name, ...args]. */
export function recordAll(socket) {
  const seen = [];
  socket.onAny((...args) => seen.push(args));
  return seen;
}

/** Emits with an ack and resolves with a refusal's `error` event and the ack together. */
export async function refused(socket, event, data, ms = 3000) {
  const err = next(socket, "error", ms);
  err.catch(() => {}); // surfaced below if the ack succeeds
  const ack = await emitAck(socket, event, data, ms);
  return { ack, error: await err };
}

export const ISO = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$/;
