// Authentication as socket.io-client sees it (CONTRACT.md, "Authentication").
import { test, describe, before, after } from "node:test";
import assert from "node:assert/strict";
import crypto from "node:crypto";
import jwt from "jsonwebtoken";
import { io } from "socket.io-client";
import {
  node, client, cleanup, connectError, token, rawJwt, nowSecs, tempFile, ISO, SECRET,
} from "./harness.mjs";

after(cleanup);

/** Asserts a refusal with the contract's CONNECT_ERROR shape and code. */
function assertRefused(err, code) {
  assert.ok(err instanceof Error, "connect_error carries an Error");
  assert.equal(err.data?.code, code, `data.code (message: ${err.message})`);
  assert.equal(typeof err.message, "string");
  assert.ok(err.message.length > 0, "a non-empty message");
}

describe("HS256 (JWT_ACCESS_TOKEN_SECRET)", () => {
  let url;
  before(async () => {
    url = (await node()).url;
  });

  test("token in the auth payload; `connected` payload", async () => {
    const before = Date.now();
    const s = await client(url, { auth: { token: token("alice") } });
    const info = s.connectedInfo;
    assert.equal(info.message, "Connected to flows");
    assert.equal(info.userId, "alice");
    assert.match(info.serverTime, ISO);
    const t = Date.parse(info.serverTime);
    assert.ok(Math.abs(t - before) < 5000, `serverTime ${info.serverTime} is about now`);
    assert.ok(s.connected);
    assert.equal(typeof s.id, "string");
  });

  test("token in the Authorization: Bearer header", async () => {
    const s = await client(url, { extraHeaders: { Authorization: `Bearer ${token("bob")}` } });
    assert.equal(s.connectedInfo.userId, "bob");
  });

  test("token in the `token` query parameter", async () => {
    const s = await client(url, { query: { token: token("carol") } });
    assert.equal(s.connectedInfo.userId, "carol");
  });

  test("the auth payload wins over the header, the header over the query", async () => {
    const s = await client(url, {
      auth: { token: token("from-auth") },
      extraHeaders: { Authorization: `Bearer ${token("from-header")}` },
      query: { token: token("from-query") },
    });
    assert.equal(s.connectedInfo.userId, "from-auth");
    const s2 = await client(url, {
      extraHeaders: { Authorization: `Bearer ${token("from-header")}` },
      query: { token: token("from-query") },
    });
    assert.equal(s2.connectedInfo.userId, "from-header");
  });

  test("no token: NO_TOKEN", async () => {
    assertRefused(await connectError(url, {}), "NO_TOKEN");
    assertRefused(await connectError(url, { auth: {} }), "NO_TOKEN");
  });

  test("bad signature: INVALID_TOKEN", async () => {
    const err = await connectError(url, { auth: { token: token("eve", { secret: "not-the-secret" }) } });
    assertRefused(err, "INVALID_TOKEN");
  });

  test("expired token: INVALID_TOKEN", async () => {
    const err = await connectError(url, { auth: { token: token("eve", { ttl: -60 }) } });
    assertRefused(err, "INVALID_TOKEN");
  });

  test("token not yet valid (nbf in the future): INVALID_TOKEN", async () => {
    const err = await connectError(url, {
      auth: { token: token("eve", { extra: { nbf: nowSecs() + 600 } }) },
    });
    assertRefused(err, "INVALID_TOKEN");
  });

  test("alg none: INVALID_TOKEN", async () => {
    const claims = { userId: "eve", exp: nowSecs() + 600 };
    for (const alg of ["none", "None", "NONE"]) {
      const unsigned = rawJwt({ alg, typ: "JWT" }, claims, null);
      assertRefused(await connectError(url, { auth: { token: unsigned } }), "INVALID_TOKEN");
    }
    // An `alg: none` header with a valid HMAC appended is still not HS256.
    const withSig = rawJwt({ alg: "none", typ: "JWT" }, claims, SECRET);
    assertRefused(await connectError(url, { auth: { token: withSig } }), "INVALID_TOKEN");
  });

  for (const transport of ["websocket", "polling"]) test(`a token over the size allowed before authentication (${transport}): INVALID_TOKEN, and the client stops`, async () => {
    // Over FLOWGATE_MAX_PAYLOAD_BEFORE_CONNECT (64 KiB): the node refuses
    // to read the CONNECT, but answers it with a CONNECT_ERROR before its
    // close, so the client does not reconnect and send it again forever
    // (over long-polling the POST is not refused with 413, which the client
    // takes for a broken transport and reconnects).
    const big = token("eve", { extra: { pad: "x".repeat(70_000) } });
    const socket = io(url + "/flows", {
      transports: [transport], forceNew: true, reconnectionDelay: 100, auth: { token: big },
    });
    let attempts = 0;
    socket.io.on("reconnect_attempt", () => attempts++);
    try {
      const err = await new Promise((resolve, reject) => {
        const t = setTimeout(() => reject(new Error("no connect_error")), 5000);
        socket.once("connect_error", (e) => { clearTimeout(t); resolve(e); });
      });
      assertRefused(err, "INVALID_TOKEN");
      await new Promise((r) => setTimeout(r, 1000));
      assert.equal(attempts, 0, "no reconnection after the refusal");
    } finally {
      socket.close();
    }
  });

  test("a token for another HMAC algorithm (HS512) is refused: the algorithm is pinned", async () => {
    const t = jwt.sign({ userId: "eve", exp: nowSecs() + 600 }, SECRET, { algorithm: "HS512" });
    assertRefused(await connectError(url, { auth: { token: t } }), "INVALID_TOKEN");
  });

  test("garbage: INVALID_TOKEN", async () => {
    for (const garbage of ["garbage", "a.b.c", "not a jwt at all", "e30.e30.e30"]) {
      assertRefused(await connectError(url, { auth: { token: garbage } }), "INVALID_TOKEN");
    }
    const viaHeader = await connectError(url, { extraHeaders: { Authorization: "Bearer garbage" } });
    assertRefused(viaHeader, "INVALID_TOKEN");
  });

  test("valid token without userId or sub: AUTH_ERROR", async () => {
    const t = jwt.sign({ exp: nowSecs() + 600, name: "nobody" }, SECRET, { algorithm: "HS256" });
    assertRefused(await connectError(url, { auth: { token: t } }), "AUTH_ERROR");
  });

  test("`sub` is the user id when there is no userId; userId wins over sub", async () => {
    const onlySub = jwt.sign({ sub: "subject-1", exp: nowSecs() + 600 }, SECRET, { algorithm: "HS256" });
    const s = await client(url, { auth: { token: onlySub } });
    assert.equal(s.connectedInfo.userId, "subject-1");
    const both = jwt.sign({ userId: "uid-1", sub: "subject-1", exp: nowSecs() + 600 }, SECRET, {
      algorithm: "HS256",
    });
    const s2 = await client(url, { auth: { token: both } });
    assert.equal(s2.connectedInfo.userId, "uid-1");
  });

  test('another namespace gets connect_error "Invalid namespace"', async () => {
    const err = await connectError(url, { auth: { token: token("alice") } }, { nsp: "/other" });
    assert.equal(err.message, "Invalid namespace");
  });
});

/** A node verifying with a public key; returns what the tests need. */
async function asymmetricNode(kind) {
  const pair =
    kind === "RS256"
      ? crypto.generateKeyPairSync("rsa", { modulusLength: 2048 })
      : crypto.generateKeyPairSync("ec", { namedCurve: "P-256" });
  const publicPem = pair.publicKey.export({ type: "spki", format: "pem" });
  const privatePem = pair.privateKey.export({ type: "pkcs8", format: "pem" });
  const file = tempFile("jwt-public.pem", publicPem);
  const n = await node({
    JWT_ACCESS_TOKEN_SECRET: undefined,
    JWT_PUBLIC_KEY_FILE: file,
    JWT_ALGORITHM: kind,
  });
  return { url: n.url, publicPem, privatePem };
}

for (const kind of ["RS256", "ES256"]) {
  describe(`${kind} (JWT_PUBLIC_KEY_FILE)`, () => {
    let ctx;
    before(async () => {
      ctx = await asymmetricNode(kind);
    });

    test("a token signed with the private key connects", async () => {
      const t = jwt.sign({ userId: `${kind}-user`, exp: nowSecs() + 600 }, ctx.privatePem, { algorithm: kind });
      const s = await client(ctx.url, { auth: { token: t } });
      assert.equal(s.connectedInfo.userId, `${kind}-user`);
    });

    test("algorithm confusion: HS256 signed with the public key PEM as secret is refused", async () => {
      const claims = { userId: "mallory", exp: nowSecs() + 600 };
      const t = rawJwt({ alg: "HS256", typ: "JWT" }, claims, ctx.publicPem);
      assertRefused(await connectError(ctx.url, { auth: { token: t } }), "INVALID_TOKEN");
      // Same, with the PEM stripped of its trailing newline.
      const t2 = rawJwt({ alg: "HS256", typ: "JWT" }, claims, ctx.publicPem.trim());
      assertRefused(await connectError(ctx.url, { auth: { token: t2 } }), "INVALID_TOKEN");
    });

    test("alg none and a token signed by another key are refused", async () => {
      const claims = { userId: "mallory", exp: nowSecs() + 600 };
      assertRefused(
        await connectError(ctx.url, { auth: { token: rawJwt({ alg: "none" }, claims, null) } }),
        "INVALID_TOKEN",
      );
      const other =
        kind === "RS256"
          ? crypto.generateKeyPairSync("rsa", { modulusLength: 2048 })
          : crypto.generateKeyPairSync("ec", { namedCurve: "P-256" });
      const t = jwt.sign(claims, other.privateKey.export({ type: "pkcs8", format: "pem" }), { algorithm: kind });
      assertRefused(await connectError(ctx.url, { auth: { token: t } }), "INVALID_TOKEN");
    });
  });
}

describe("a token without exp", () => {
  const noExp = () => jwt.sign({ userId: "forever" }, SECRET, { algorithm: "HS256" });

  test("connects by default, as with the old gateway's jsonwebtoken.verify", async () => {
    const { url } = await node();
    const s = await client(url, { auth: { token: noExp() } });
    assert.equal(s.connectedInfo.userId, "forever");
  });

  test("is INVALID_TOKEN with JWT_REQUIRE_EXP=true", async () => {
    const { url } = await node({ JWT_REQUIRE_EXP: "true" });
    assertRefused(await connectError(url, { auth: { token: noExp() } }), "INVALID_TOKEN");
    const s = await client(url, { auth: { token: token("timed") } });
    assert.equal(s.connectedInfo.userId, "timed");
  });
});

describe("JWT_ISSUER and JWT_AUDIENCE", () => {
  let url;
  before(async () => {
    url = (await node({ JWT_ISSUER: "https://issuer.test", JWT_AUDIENCE: "flows-web" })).url;
  });
  const sign = (claims) =>
    jwt.sign({ userId: "ia", exp: nowSecs() + 600, ...claims }, SECRET, { algorithm: "HS256" });

  test("the right iss and aud connect", async () => {
    const s = await client(url, { auth: { token: sign({ iss: "https://issuer.test", aud: "flows-web" }) } });
    assert.equal(s.connectedInfo.userId, "ia");
    const s2 = await client(url, {
      auth: { token: sign({ iss: "https://issuer.test", aud: ["other", "flows-web"] }) },
    });
    assert.equal(s2.connectedInfo.userId, "ia");
  });

  test("a wrong or missing iss or aud is INVALID_TOKEN", async () => {
    for (const claims of [
      { iss: "https://evil.test", aud: "flows-web" },
      { aud: "flows-web" },
      { iss: "https://issuer.test", aud: "other" },
      { iss: "https://issuer.test" },
    ]) {
      const err = await connectError(url, { auth: { token: sign(claims) } });
      assertRefused(err, "INVALID_TOKEN");
    }
  });
});
