// Real-browser test of HTTP long-polling with CORS (issue 12): a page served
// from another origin loads the stock socket.io-client bundle from npm and
// connects with the client's default options, so the browser polls across
// origins with credentials, then upgrades to WebSocket. Two such pages relay
// to each other when their origin is in FRONTEND_URL; a page from an origin
// that is not cannot connect at all.
//
// Environment: FLOWGATE_BIN, CHROMIUM_BIN, as demo.test.mjs.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import crypto from "node:crypto";
import fs from "node:fs";
import http from "node:http";
import path from "node:path";
import { fileURLToPath } from "node:url";
import puppeteer from "puppeteer-core";

const here = path.dirname(fileURLToPath(import.meta.url));
const BIN = process.env.FLOWGATE_BIN ?? path.resolve(here, "../../../../target/debug/flowgate");
const CHROMIUM = process.env.CHROMIUM_BIN ?? "/usr/bin/chromium";
const SECRET = "cors-test-secret";
const BUNDLE = path.resolve(here, "node_modules/socket.io-client/dist/socket.io.min.js");

const procs = new Set();
process.on("exit", () => {
  for (const p of procs) if (p.exitCode === null) p.kill("SIGKILL");
});

/** Starts a node; resolves with its URL once it listens. */
function startNode(env) {
  const proc = spawn(BIN, ["serve"], {
    env: {
      PATH: process.env.PATH,
      HOST: "127.0.0.1",
      PORT: "0",
      JWT_ACCESS_TOKEN_SECRET: SECRET,
      FLOWGATE_LOG_FORMAT: "json",
      FLOWGATE_DRAIN_NOTICE_MS: "0",
      FLOWGATE_DRAIN_WINDOW_MS: "200",
      FLOWGATE_SHUTDOWN_DEADLINE_MS: "5000",
      ...env,
    },
    stdio: ["ignore", "pipe", "pipe"],
  });
  procs.add(proc);
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("flowgate did not start")), 15000);
    proc.on("exit", (code) => reject(new Error(`flowgate exited ${code}`)));
    let buf = "";
    proc.stdout.setEncoding("utf8").on("data", (c) => {
      buf += c;
      const m = /"message":"listening".*?"addr":"([^"]+)"/.exec(buf);
      if (m) {
        clearTimeout(timer);
        resolve(`http://${m[1]}`);
      }
    });
  });
}

const b64url = (x) => Buffer.from(JSON.stringify(x)).toString("base64url");
function token(userId) {
  const input = `${b64url({ alg: "HS256", typ: "JWT" })}.${b64url({ userId, exp: Math.floor(Date.now() / 1000) + 600 })}`;
  return `${input}.${crypto.createHmac("sha256", SECRET).update(input).digest("base64url")}`;
}

// The page: the stock bundle, default options plus credentials, and a
// record of what happened on `window.result`.
const PAGE = `<!doctype html><meta charset="utf-8"><title>cors</title>
<script src="/socket.io.min.js"></script>
<script>
  const p = new URLSearchParams(location.search);
  const result = (window.result = { events: [] });
  const s = io(p.get("gw") + "/flows", { auth: { token: p.get("token") }, withCredentials: true, reconnection: false });
  result.first = s.io.engine.transport.name;
  s.io.engine.on("upgrade", (t) => (result.upgraded = t.name));
  s.on("connect_error", (e) => (result.error = e.message));
  s.on("connected", () => {
    result.connected = true;
    s.emit("flow:join", { flowId: p.get("flow") }, (ack) => (result.joined = ack.ok));
  });
  s.on("pod:updated", (d) => result.events.push(d.updates.n));
  window.send = (n) => s.emit("pod:update", { podId: "p", updates: { n } });
</script>`;

let browser, site, siteOrigin;

before(async () => {
  assert.ok(fs.existsSync(BIN), `no flowgate binary at ${BIN}`);
  assert.ok(fs.existsSync(CHROMIUM), `no browser at ${CHROMIUM}`);
  assert.ok(fs.existsSync(BUNDLE), "npm ci here installs socket.io-client");
  site = http.createServer((req, res) => {
    if (req.url.startsWith("/socket.io.min.js")) {
      res.writeHead(200, { "content-type": "text/javascript" });
      return res.end(fs.readFileSync(BUNDLE));
    }
    res.writeHead(200, { "content-type": "text/html" });
    res.end(PAGE);
  });
  await new Promise((r) => site.listen(0, "127.0.0.1", r));
  siteOrigin = `http://127.0.0.1:${site.address().port}`;
  browser = await puppeteer.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"],
  });
});

after(async () => {
  await browser?.close();
  site?.close();
  for (const p of procs) p.kill("SIGTERM");
});

async function openPage(gw, user, flow) {
  const context = await browser.createBrowserContext();
  const page = await context.newPage();
  const q = new URLSearchParams({ gw, token: token(user), flow });
  await page.goto(`${siteOrigin}/?${q}`, { waitUntil: "load" });
  return page;
}

const result = (page) => page.evaluate(() => window.result);

test("a page on an allowed origin connects by polling, upgrades and relays", { timeout: 60000 }, async () => {
  const gw = await startNode({ FRONTEND_URL: siteOrigin });
  const a = await openPage(gw, "alice", "cors");
  const b = await openPage(gw, "bob", "cors");
  for (const page of [a, b]) {
    await page.waitForFunction(() => window.result.joined === true && window.result.upgraded, { timeout: 10000 });
    const r = await result(page);
    assert.equal(r.first, "polling", "the default options start with polling");
    assert.equal(r.upgraded, "websocket");
  }
  for (let n = 1; n <= 5; n++) await a.evaluate((n) => window.send(n), n);
  for (let n = 11; n <= 15; n++) await b.evaluate((n) => window.send(n), n);
  await b.waitForFunction(() => window.result.events.length >= 5, { timeout: 5000 });
  await a.waitForFunction(() => window.result.events.length >= 5, { timeout: 5000 });
  assert.deepEqual((await result(b)).events, [1, 2, 3, 4, 5]);
  assert.deepEqual((await result(a)).events, [11, 12, 13, 14, 15]);
});

test("a page on an origin outside FRONTEND_URL cannot connect", { timeout: 60000 }, async () => {
  const gw = await startNode({ FRONTEND_URL: "https://app.example" });
  const page = await openPage(gw, "mallory", "cors");
  await page.waitForFunction(() => window.result.error !== undefined, { timeout: 10000 });
  const r = await result(page);
  assert.equal(r.connected, undefined);
  assert.match(r.error, /poll error/);
});
