// A local cluster for the interop tests: a real redis-server, N flowgate
// nodes on fixed loopback ports (so a node can be killed and restarted in
// place) and HAProxy with the project's deploy/haproxy.cfg in front of
// three of them. Everything runs in temp dirs on free ports and is stopped
// by PID in `stopCluster()`.
import { spawn, execFileSync } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { startNode, sleep } from "./harness.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));
const REPO = path.resolve(here, "../../../..");

/** A free loopback TCP port. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

async function waitForPort(port, ms = 10000) {
  const until = Date.now() + ms;
  while (Date.now() < until) {
    const ok = await new Promise((r) => {
      const s = net.connect(port, "127.0.0.1", () => { s.end(); r(true); });
      s.once("error", () => r(false));
    });
    if (ok) return;
    await sleep(50);
  }
  throw new Error(`nothing listens on ${port}`);
}

function which(prog) {
  for (const d of (process.env.PATH ?? "").split(":").concat(["/usr/sbin", "/usr/bin", "/usr/local/bin"])) {
    const p = path.join(d, prog);
    if (fs.existsSync(p)) return p;
  }
  throw new Error(`${prog} not found (run scripts/deps.sh)`);
}

/** redis-server without persistence on a free port. */
export async function startRedis() {
  const port = await freePort();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "flowgate-redis-"));
  const proc = spawn(which("redis-server"), [
    "--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", dir,
  ], { stdio: "ignore" });
  await waitForPort(port);
  return {
    port,
    url: `redis://127.0.0.1:${port}`,
    stop() {
      proc.kill("SIGKILL");
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

/**
 * HAProxy with deploy/haproxy.cfg in front of three node ports; `env` picks
 * a variant (`{ LB_ROUNDROBIN: "1" }`: every request to the next node).
 */
export async function startHaproxy(ports, env = {}) {
  const port = await freePort();
  const proc = spawn(which("haproxy"), ["-db", "-f", path.join(REPO, "deploy/haproxy.cfg")], {
    env: {
      PATH: process.env.PATH,
      LB_PORT: String(port),
      STATS_PORT: String(await freePort()),
      NODE1_PORT: String(ports[0]),
      NODE2_PORT: String(ports[1]),
      NODE3_PORT: String(ports[2]),
      ...env,
    },
    stdio: "ignore",
  });
  await waitForPort(port);
  return { port, url: `http://127.0.0.1:${port}`, stop: () => proc.kill("SIGKILL") };
}

/**
 * Redis, three nodes and HAProxy. `env` goes to every node, `lbEnv` to
 * HAProxy (see startHaproxy). Returns
 * { redis, lb, nodes: [{id, port, url, proc, kill(), term(), restart()}] }.
 */
export async function startCluster(env = {}, lbEnv = {}) {
  const redis = await startRedis();
  const nodes = [];
  for (let i = 1; i <= 3; i++) {
    const port = await freePort();
    const id = `n${i}`;
    const nodeEnv = {
      REDIS_URL: redis.url,
      PORT: String(port),
      FLOWGATE_NODE_ID: id,
      FLOWGATE_NODE_HEARTBEAT_MS: "300",
      FLOWGATE_NODE_DEAD_AFTER_MS: "1500",
      FLOWGATE_PRESENCE_REFRESH_MS: "1000",
      FLOWGATE_SESSION_TTL_MS: "4000",
      ...env,
    };
    const entry = { id, port, url: `http://127.0.0.1:${port}` };
    entry.start = async () => {
      const n = await startNode(nodeEnv);
      entry.proc = n.proc;
      entry.logs = n.logs;
      entry.stopGracefully = n.stop;
    };
    entry.kill = async () => {
      if (entry.proc.exitCode !== null || entry.proc.signalCode !== null) return;
      const exited = new Promise((r) => entry.proc.once("exit", r));
      entry.proc.kill("SIGKILL");
      await exited;
    };
    entry.term = async () => {
      if (entry.proc.exitCode !== null || entry.proc.signalCode !== null) return;
      await entry.stopGracefully();
    };
    await entry.start();
    nodes.push(entry);
  }
  const lb = await startHaproxy(nodes.map((n) => n.port), lbEnv);
  return {
    redis,
    lb,
    nodes,
    async stop() {
      lb.stop();
      await Promise.all(nodes.map((n) => n.kill()));
      redis.stop();
    },
  };
}

/** The node (of `nodes`) whose /metrics shows `count` open connections. */
export async function connectionsPerNode(nodes) {
  const out = [];
  for (const n of nodes) {
    try {
      const text = await (await fetch(`${n.url}/metrics`)).text();
      const m = /^flowgate_connections (\d+)/m.exec(text);
      out.push(m ? Number(m[1]) : 0);
    } catch {
      out.push(-1);
    }
  }
  return out;
}


