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

/** Resolves with the payload of the next `event` on `socket`. */
export function next(socket, event, ms = 3000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      socket.off(event, on);
      reject(new Error(`no ${event} within ${ms} ms`));
    }, ms);
    const on = (...args) => {
      clearTimeout(timer);
      resolve(args.length > 1 ? args : args[0]);
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
