// Soak, not a test (npm test runs only *.test.mjs): long-polling senders
// through the local cluster's round-robin HAProxy (no sticky sessions, so
// their requests are forwarded between nodes) while `scripts/cluster.sh
// scale 2` drains one of three nodes. Two receivers, one over WebSocket and
// one over long-polling, both through the load balancer. Prints, per sender,
// acknowledged events a receiver never got and events a receiver got twice
// (must be none: the script exits 1), and emits
// that got no ack (the transport closed under a POST in flight; the
// stock client does not resend those), with the disconnect reasons.
//
//   FLOWGATE_BIN=target/release/flowgate node crates/gateway/tests/interop/drain-soak.mjs
//   env: SENDERS (12), NOTICE (1000 ms), WINDOW (2000 ms)
import { execFile } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { io } from "socket.io-client";
import { SECRET, token, sleep } from "./harness.mjs";
const SCRIPT = path.resolve(path.dirname(new URL(import.meta.url).pathname), "../../../../scripts/cluster.sh");
const top = fs.mkdtempSync(path.join(os.tmpdir(), "flowgate-drain-soak-"));
const dir = path.join(top, "c");
const env = { ...process.env, FLOWGATE_CLUSTER_DIR: dir, FLOWGATE_BIN: process.env.FLOWGATE_BIN, FLOWGATE_CLUSTER_SKIP_DEPS: "1",
  FLOWGATE_CLUSTER_NO_DB: "1", FLOWGATE_ACCESS_POLICY: "open", JWT_ACCESS_TOKEN_SECRET: SECRET,
  FLOWGATE_DRAIN_NOTICE_MS: process.env.NOTICE ?? "1000", FLOWGATE_DRAIN_WINDOW_MS: process.env.WINDOW ?? "2000", RUST_LOG: "info" };
const cluster = (...a) => new Promise((res, rej) => execFile("bash", [SCRIPT, ...a], { env, timeout: 120000 }, (e, o, s) => e ? rej(new Error(o + s)) : res(o + s)));
function lb() { const t = fs.readFileSync(path.join(dir, "cluster.env"), "utf8"); return /LB_URL=(.*)/.exec(t)[1]; }
await cluster("up");
const N = Number(process.env.SENDERS ?? 12);
const log = [];
try {
  const receivers = [];
  for (const transport of ["websocket", "polling"]) {
    const recv = io(lb() + "/flows", { transports: [transport], forceNew: true, reconnectionDelay: 200, reconnectionDelayMax: 1000, auth: { token: token("r-" + transport) } });
    const got = new Map();
    recv.on("pod:moved", (p) => { const k = p.podId; got.set(k, (got.get(k) ?? []).concat(p.position.x)); });
    recv.on("connect", () => { if (!recv.recovered) recv.emit("flow:join", { flowId: "d" }); });
    recv.on("disconnect", (why) => log.push(`${Date.now()} r-${transport} disconnect ${why}`));
    await new Promise((r) => recv.once("connected", r));
    await recv.emitWithAck("flow:join", { flowId: "d" });
    receivers.push({ transport, recv, got });
  }
  const senders = [];
  for (let i = 0; i < N; i++) {
    const s = io(lb() + "/flows", { transports: ["polling"], forceNew: true, reconnectionDelay: 200, reconnectionDelayMax: 1000, auth: { token: token("s" + i) } });
    await new Promise((r) => s.once("connected", r));
    await s.emitWithAck("flow:join", { flowId: "d" });
    s.on("connect", () => { log.push(`${Date.now()} s${i} connect recovered=${s.recovered}`); if (!s.recovered) s.emit("flow:join", { flowId: "d" }); });
    s.on("disconnect", (why) => log.push(`${Date.now()} s${i} disconnect ${why}`));
    senders.push({ s, acked: [], failed: [], refused: [], next: 1 });
  }
  let stop = false;
  const pumps = senders.map(async (st, i) => {
    while (!stop) {
      const x = st.next++;
      const t0 = Date.now();
      st.s.timeout(8000).emitWithAck("pod:move", { podId: "p" + i, position: { x, y: 0 } })
        .then((a) => { if (a?.ok) st.acked.push(x); else st.refused.push([x, a?.code]); })
        .catch((e) => st.failed.push([x, t0]));
      await sleep(100);
    }
  });
  await sleep(2000);
  const t = Date.now();
  log.push(`${t} scale 2`);
  console.log(await cluster("scale", "2"));
  await sleep(4000);
  stop = true;
  await Promise.all(pumps);
  await sleep(9000);
  let lostAcked = 0, twice = 0, failed = 0, refused = 0, acked = 0;
  senders.forEach((st, i) => {
    failed += st.failed.length; refused += st.refused.length; acked += st.acked.length;
    for (const { transport, got } of receivers) {
      const seen = got.get("p" + i) ?? [];
      const g = new Set(seen);
      const miss = st.acked.filter((x) => !g.has(x));
      const dup = seen.filter((x, k) => seen.indexOf(x) !== k);
      lostAcked += miss.length; twice += dup.length;
      if (miss.length || dup.length) console.log(`s${i} → ${transport}: missing ${JSON.stringify(miss)} twice ${JSON.stringify(dup)}`);
    }
    if (st.failed.length || st.refused.length) console.log(`s${i}: acked ${st.acked.length} failed ${JSON.stringify(st.failed.map(f=>[f[0], f[1]-t]))} refused ${JSON.stringify(st.refused)}`);
  });
  console.log({ acked, lostAcked, twice, failed, refused });
  if (lostAcked > 0 || twice > 0) process.exitCode = 1;
  console.log(log.map((l) => { const [ts, ...r] = l.split(" "); return `${Number(ts) - t} ${r.join(" ")}`; }).join("\n"));
  for (const st of senders) st.s.close();
  for (const { recv } of receivers) recv.close();
} finally {
  await cluster("down").catch((e) => console.error(e.message));
  fs.rmSync(top, { recursive: true, force: true });
}
