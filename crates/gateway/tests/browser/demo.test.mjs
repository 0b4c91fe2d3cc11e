// Real-browser test of the demo canvas (issue 13): a real flowgate binary
// with FLOWGATE_DEMO=1, Debian's chromium driven headless by puppeteer-core,
// two users in two isolated browser contexts. Everything is asserted on the
// pages' DOM state (data attributes the page keeps in step with its state),
// never on pixels. A screenshot is written for people to look at:
// docs/demo.png when FLOWGATE_UPDATE_SCREENSHOT=1, else a temp file.
//
// Environment:
//   FLOWGATE_BIN     the binary (default: the workspace's target/debug/flowgate)
//   CHROMIUM_BIN     the browser (default: /usr/bin/chromium)
//   DEMO_TRANSPORTS  the page's ?transports= (default "default": the page is
//                    opened without it, so the client polls, then upgrades;
//                    e.g. "websocket" or "polling" to force one)
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import crypto from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import puppeteer from "puppeteer-core";

const here = path.dirname(fileURLToPath(import.meta.url));
const BIN = process.env.FLOWGATE_BIN ?? path.resolve(here, "../../../../target/debug/flowgate");
const CHROMIUM = process.env.CHROMIUM_BIN ?? "/usr/bin/chromium";
const SECRET = "browser-test-secret";
// "default" exercises the client's default options: HTTP long-polling
// first, then the upgrade to WebSocket.
const TRANSPORTS = process.env.DEMO_TRANSPORTS ?? "default";
const FLOW = "browser-test";
const SCREENSHOT =
  process.env.FLOWGATE_UPDATE_SCREENSHOT === "1"
    ? path.resolve(here, "../../../../docs/demo.png")
    : path.join(fs.mkdtempSync(path.join(os.tmpdir(), "flowgate-browser-")), "demo.png");

// --- the gateway -------------------------------------------------------------

const nodes = new Set();
process.on("exit", () => {
  for (const n of nodes) if (n.proc.exitCode === null) n.proc.kill("SIGKILL");
});

/** Starts a node on a free loopback port; resolves to { url, proc, logs, stop() }. */
async function startNode(env = {}) {
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
    proc.stdout.setEncoding("utf8").on("data", (chunk) => {
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
    });
    proc.stderr.setEncoding("utf8").on("data", (c) => logs.push(...c.split("\n")));
  });
  const node = {
    url,
    proc,
    logs,
    async stop() {
      nodes.delete(node);
      if (proc.exitCode !== null || proc.signalCode !== null) return;
      const exited = new Promise((r) => proc.once("exit", r));
      const killer = setTimeout(() => proc.kill("SIGKILL"), 8000);
      proc.kill("SIGTERM");
      await exited;
      clearTimeout(killer);
    },
  };
  nodes.add(node);
  return node;
}

// --- the browser ---------------------------------------------------------------

let browser;
let gateway;

before(async () => {
  assert.ok(fs.existsSync(BIN), `no flowgate binary at ${BIN} (cargo build -p flowgate-gateway, or set FLOWGATE_BIN)`);
  assert.ok(fs.existsSync(CHROMIUM), `no browser at ${CHROMIUM} (scripts/deps.sh installs Debian's chromium)`);
  gateway = await startNode({ FLOWGATE_DEMO: "1" });
  browser = await puppeteer.launch({
    executablePath: CHROMIUM,
    headless: true,
    // --no-sandbox: the tests run as root, where chromium's sandbox refuses
    // to start. The pages are our own, served on loopback.
    args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"],
    defaultViewport: { width: 1280, height: 760 },
  });
});

after(async () => {
  await browser?.close();
  await Promise.all([...nodes].map((n) => n.stop()));
});

/**
 * Opens the demo as `name` in a fresh browser context (no shared storage),
 * joins, and resolves with the page once it is connected and in the flow.
 * Uncaught page errors and every toast code are recorded on the page object.
 */
async function openDemo(name, color) {
  const context = await browser.createBrowserContext();
  const page = await context.newPage();
  page.errors = [];
  page.on("pageerror", (e) => page.errors.push(String(e)));
  page.on("console", (m) => {
    if (m.type() === "error") page.errors.push(`console: ${m.text()}`);
  });
  page.on("response", (r) => {
    if (r.status() >= 400) page.errors.push(`HTTP ${r.status()} ${r.url()}`);
  });
  // Toasts vanish after a few seconds; keep every code that was shown.
  await page.evaluateOnNewDocument(() => {
    window.__toasts = [];
    document.addEventListener("DOMContentLoaded", () => {
      new MutationObserver((records) => {
        for (const r of records) for (const n of r.addedNodes) window.__toasts.push(n.dataset?.code ?? "info");
      }).observe(document.getElementById("toasts"), { childList: true });
    });
  });
  const q = new URLSearchParams({ flow: FLOW, name, color });
  if (TRANSPORTS !== "default") q.set("transports", TRANSPORTS);
  await page.goto(`${gateway.url}/demo/?${q}`, { waitUntil: "load" });
  await page.click("#join-button");
  await page.waitForSelector('#conn-state[data-state="connected"]', { timeout: 10000 });
  await page.waitForSelector(`#presence li[data-user-id="${name}"]`, { timeout: 5000 });
  return page;
}

/** The state of one pod as the page shows it, or null if it is not there. */
function podState(page, podId) {
  return page.evaluate((id) => {
    const n = document.querySelector(`.pod[data-pod-id="${id}"]`);
    if (!n) return null;
    return {
      x: Number(n.dataset.x),
      y: Number(n.dataset.y),
      title: n.querySelector(".pod-title")?.textContent ?? null,
      lockedBy: n.dataset.lockedBy ?? null,
      lockedClass: n.classList.contains("locked"),
    };
  }, podId);
}

/** Waits until `predicate(podState)` holds on `page`; fails with the last state seen. */
async function waitPod(page, podId, predicate, what, ms = 5000) {
  const deadline = Date.now() + ms;
  let last;
  while (Date.now() < deadline) {
    last = await podState(page, podId);
    if (predicate(last)) return last;
    await new Promise((r) => setTimeout(r, 50));
  }
  assert.fail(`${what}: pod ${podId} never got there; last seen ${JSON.stringify(last)}`);
}

/** The ids of the pods on a page, in creation order. */
const podIds = (page) => page.$$eval(".pod", (ns) => ns.map((n) => n.dataset.podId));

/** The centre of a pod's title bar, in viewport coordinates. */
async function podGrip(page, podId) {
  const box = await (await page.$(`.pod[data-pod-id="${podId}"] .pod-header`)).boundingBox();
  return { x: box.x + box.width / 3, y: box.y + box.height / 2 };
}

async function createPod(page) {
  const before = await podIds(page);
  await page.click("#new-pod");
  await page.waitForFunction((n) => document.querySelectorAll(".pod").length > n, { timeout: 3000 }, before.length);
  return (await podIds(page)).find((id) => !before.includes(id));
}

// --- the test --------------------------------------------------------------------------

test("two browsers share pods, edges, drags with locks, cursors and presence", { timeout: 90000 }, async () => {
  const a = await openDemo("Alice", "#e11d48");
  const b = await openDemo("Bob", "#2563eb");

  // Presence: both pages list both users, each exactly once.
  for (const page of [a, b]) {
    await page.waitForFunction(() => document.querySelectorAll("#presence li").length === 2, { timeout: 5000 });
    const users = await page.$$eval("#presence li", (ns) => ns.map((n) => n.dataset.userId).sort());
    assert.deepEqual(users, ["Alice", "Bob"]);
  }
  // The transport the page shows is the engine's.
  // With the defaults the client starts on polling and must upgrade.
  if (TRANSPORTS === "default") {
    await a.waitForFunction(() => document.querySelector("#transport").dataset.transport === "websocket", {
      timeout: 5000,
    });
  }
  const transport = await a.$eval("#transport", (n) => n.dataset.transport);
  if (TRANSPORTS === "default" || TRANSPORTS === "websocket") assert.equal(transport, "websocket");
  else assert.match(transport, /^(polling|websocket)$/);

  // Pods created in A appear in B with the same title and position.
  const p1 = await createPod(a);
  const p2 = await createPod(a);
  const p3 = await createPod(a);
  for (const id of [p1, p2, p3]) {
    const mine = await podState(a, id);
    await waitPod(b, id, (s) => s && s.x === mine.x && s.y === mine.y && s.title === mine.title, "created pod in B");
  }
  // And the other way round; B places its pod where A has none.
  const q1 = await createPod(b);
  const bobs = await podState(b, q1);
  await waitPod(a, q1, (s) => s && s.x === bobs.x && s.y === bobs.y && s.title === bobs.title, "B's pod in A");
  for (const id of [p1, p2, p3]) {
    const other = await podState(b, id);
    assert.ok(Math.abs(other.x - bobs.x) >= 168 || Math.abs(other.y - bobs.y) >= 76, "B's new pod overlaps one of A's");
  }

  // Edges: connect mode, source, target; the other page draws the same edge.
  for (const [page, from, to] of [[a, p1, p2], [a, p2, p3], [b, p3, q1]]) {
    await page.click("#connect-mode");
    await page.click(`.pod[data-pod-id="${from}"] .pod-meta`);
    await page.click(`.pod[data-pod-id="${to}"] .pod-meta`);
  }
  for (const page of [a, b]) {
    await page.waitForFunction(() => document.querySelectorAll("#edges .edge").length === 3, { timeout: 5000 });
  }
  const edgesA = await a.$$eval("#edges .edge", (ns) => ns.map((n) => n.dataset.edgeId).sort());
  const edgesB = await b.$$eval("#edges .edge", (ns) => ns.map((n) => n.dataset.edgeId).sort());
  assert.deepEqual(edgesB, edgesA);

  // Rename in B: A sees the new title.
  await b.click(`.pod[data-pod-id="${p1}"] .pod-title`, { count: 2 });
  await b.waitForSelector(".pod-title-input");
  await b.keyboard.down("Control");
  await b.keyboard.press("a");
  await b.keyboard.up("Control");
  await b.keyboard.type("Fetch orders");
  await b.keyboard.press("Enter");
  await waitPod(a, p1, (s) => s?.title === "Fetch orders", "renamed pod in A");

  // Bob's pointer over the canvas: A shows his cursor, labelled.
  await b.mouse.move(700, 500);
  await b.mouse.move(720, 520, { steps: 4 });
  await a.waitForSelector('.cursor[data-user-id="Bob"]', { timeout: 5000 });
  assert.equal(await a.$eval('.cursor[data-user-id="Bob"] .cursor-label', (n) => n.textContent), "Bob");

  // Drag p2 in A, holding the button: B shows it locked by Alice, moving.
  const start = await podState(a, p2);
  const grip = await podGrip(a, p2);
  await a.mouse.move(grip.x, grip.y);
  await a.mouse.down();
  for (let i = 1; i <= 8; i++) {
    await a.mouse.move(grip.x + i * 25, grip.y + i * 20);
    await new Promise((r) => setTimeout(r, 60));
  }
  const during = await waitPod(
    b,
    p2,
    (s) => s?.lockedBy === "Alice" && s.lockedClass && (s.x !== start.x || s.y !== start.y),
    "B shows the pod locked by Alice and moving during the drag",
  );
  assert.ok(during.x > start.x && during.y > start.y, `moved the right way: ${JSON.stringify({ start, during })}`);
  // A's own view: locked by itself, so not shown as locked.
  assert.equal((await podState(a, p2)).lockedClass, false);
  // And Alice's cursor is in B, labelled.
  await b.waitForSelector('.cursor[data-user-id="Alice"]', { timeout: 5000 });

  // The picture for the README: B's view while Alice drags.
  fs.mkdirSync(path.dirname(SCREENSHOT), { recursive: true });
  await b.screenshot({ path: SCREENSHOT });
  console.log(`screenshot: ${SCREENSHOT}`);

  // Bob tries to drag the pod Alice holds: refused on his page, nothing moves.
  const bGrip = await podGrip(b, p2);
  await b.mouse.move(bGrip.x, bGrip.y);
  await b.mouse.down();
  await b.mouse.move(bGrip.x - 80, bGrip.y - 80, { steps: 5 });
  await b.mouse.up();
  await b.waitForFunction(() => window.__toasts.includes("LOCKED"), { timeout: 3000 });
  const aHeld = await podState(a, p2);
  assert.ok(aHeld.x >= during.x && aHeld.y >= during.y, `Bob moved Alice's pod: ${JSON.stringify(aHeld)}`);

  // A finishes the drag and drops: B shows the final position, unlocked.
  for (let i = 9; i <= 12; i++) {
    await a.mouse.move(grip.x + i * 25, grip.y + i * 20);
    await new Promise((r) => setTimeout(r, 60));
  }
  await a.mouse.up();
  const end = await podState(a, p2);
  assert.ok(end.x > during.x && end.y > during.y, `A moved the pod further: ${JSON.stringify({ during, end })}`);
  await waitPod(
    b,
    p2,
    (s) => s && s.lockedBy === null && !s.lockedClass && s.x === end.x && s.y === end.y,
    "B shows the pod at its final position and unlocked after the drop",
  );

  // Once unlocked, Bob may drag it: A follows.
  const bGrip2 = await podGrip(b, p2);
  await b.mouse.move(bGrip2.x, bGrip2.y);
  await b.mouse.down();
  await b.mouse.move(bGrip2.x - 60, bGrip2.y + 30, { steps: 6 });
  await b.mouse.up();
  const bEnd = await podState(b, p2);
  assert.notDeepEqual([bEnd.x, bEnd.y], [end.x, end.y]);
  await waitPod(a, p2, (s) => s && s.lockedBy === null && s.x === bEnd.x && s.y === bEnd.y, "A follows Bob's drag");

  // Delete p3 in A: B drops it and its two edges (p2 -> p3, p3 -> q1).
  await a.click(`.pod[data-pod-id="${p3}"] .pod-delete`);
  await waitPod(b, p3, (s) => s === null, "deleted pod gone from B");
  await b.waitForFunction(() => document.querySelectorAll("#edges .edge").length === 1, { timeout: 3000 });
  assert.equal(await a.$$eval("#edges .edge", (ns) => ns.length), 1);

  // A network blip in A: the client reconnects by itself. A session the
  // gateway does not recover re-joins (recovered false); a recovered one is
  // still in the flow (recovered true). Either way B lists A's current
  // session, once, and A's new pods reach B.
  await a.click("#blip");
  await a.waitForFunction(
    () => document.getElementById("reconnects").textContent === "1" && document.getElementById("conn-state").dataset.state === "connected",
    { timeout: 10000 },
  );
  assert.match(await a.$eval("#recovered", (n) => n.dataset.recovered), /^(true|false)$/);
  const sid = await a.$eval("#socket-id", (n) => n.textContent);
  await b.waitForSelector(`#presence li[data-socket-id="${sid}"]`, { timeout: 5000 });
  await b.waitForFunction(() => document.querySelectorAll('#presence li[data-user-id="Alice"]').length === 1, { timeout: 5000 });
  const p4 = await createPod(a);
  await waitPod(b, p4, (s) => s !== null, "a pod created after the reconnect reaches B");

  // The ops view: this node, both sessions of the flow, live counters.
  const ops = await (await fetch(`${gateway.url}/demo/ops.json?flow=${FLOW}`)).json();
  assert.deepEqual(ops.flow.presence.sessions.map((s) => s.userId).sort(), ["Alice", "Bob"]);
  assert.ok(ops.connections >= 2, `connections ${ops.connections}`);
  assert.ok(ops.eventsInTotal > 0 && ops.deliveriesTotal > 0);
  const opsPage = await a.browserContext().newPage();
  await opsPage.goto(`${gateway.url}/demo/ops?flow=${FLOW}`);
  await opsPage.waitForFunction(() => document.getElementById("presence-count").textContent === "2", { timeout: 5000 });
  assert.equal(await opsPage.$eval("#node", (n) => n.textContent), ops.node);
  // Rates need two samples a second apart.
  await opsPage.waitForFunction(() => /^\d/.test(document.getElementById("deliveries").textContent), { timeout: 5000 });
  await opsPage.close();

  // Bob leaves (closes his tab): A's presence and cursors drop him.
  await b.browserContext().close();
  await a.waitForFunction(() => document.querySelectorAll("#presence li").length === 1, { timeout: 5000 });
  await a.waitForFunction(() => !document.querySelector('.cursor[data-user-id="Bob"]'), { timeout: 3000 });

  // Nothing went wrong on the way: no uncaught errors, and the only refusal
  // anyone saw is Bob's LOCKED (no RATE_LIMIT: the page keeps its budget).
  assert.deepEqual(a.errors, []);
  assert.deepEqual(b.errors, []);
  const toastsA = await a.evaluate(() => window.__toasts);
  assert.deepEqual(toastsA, [], `toasts on A: ${toastsA}`);
});

test("the demo is off by default, and refuses to mint tokens for a public-key node", { timeout: 30000 }, async () => {
  const off = await startNode({});
  try {
    for (const p of ["/demo/", "/demo/token?user=x", "/demo/ops.json"]) {
      const res = await fetch(off.url + p);
      assert.equal(res.status, 404, `${p} without FLOWGATE_DEMO`);
    }
  } finally {
    await off.stop();
  }

  const { publicKey } = crypto.generateKeyPairSync("rsa", { modulusLength: 2048 });
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "flowgate-browser-"));
  const pem = path.join(dir, "public.pem");
  fs.writeFileSync(pem, publicKey.export({ type: "spki", format: "pem" }));
  const rsa = await startNode({
    FLOWGATE_DEMO: "1",
    JWT_ACCESS_TOKEN_SECRET: "",
    JWT_PUBLIC_KEY_FILE: pem,
    JWT_ALGORITHM: "RS256",
  });
  try {
    const res = await fetch(rsa.url + "/demo/token?user=x");
    assert.equal(res.status, 501);
    const body = await res.json();
    assert.equal(body.error.code, "NO_SHARED_SECRET");
    assert.equal((await fetch(rsa.url + "/demo/")).status, 200, "the page itself is still served");
    assert.ok(
      rsa.logs.some((l) => l.includes('"level":"WARN"') && l.includes("FLOWGATE_DEMO is on")),
      "a warning at start says the demo is on",
    );
  } finally {
    await rsa.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
