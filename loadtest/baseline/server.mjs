// The benchmark baseline: what flowgate replaces, reduced to the subset of
// the flow-room contract (shared/CONTRACT.md) that the load generator
// exercises. Node Socket.IO 4 with the classic @socket.io/redis-adapter
// (one pub/sub pair per process, every process receives every room
// broadcast), HS256 JWTs checked in a namespace middleware, `flow:join`,
// `pod:move` -> `pod:moved`, acks, and a per-process, per-user token-bucket
// rate limit like the old single-process gateway had.
//
// Environment:
//   HOST, PORT                  listen address (default 127.0.0.1:8080)
//   JWT_ACCESS_TOKEN_SECRET     HS256 secret (required)
//   REDIS_URL                   enables the Redis adapter (unset: one process)
//   RATE_LIMIT_PER_SEC          per-user budget in this process (default 20)
//   RATE_LIMIT_BURST            bucket size (default 20)
//
// Prints one JSON line {"message":"listening","addr":"HOST:PORT"} when ready.

import { createServer } from "node:http";
import { Server } from "socket.io";
import { createAdapter } from "@socket.io/redis-adapter";
import { createClient } from "redis";
import jwt from "jsonwebtoken";

const host = process.env.HOST || "127.0.0.1";
const port = Number(process.env.PORT || 8080);
const secret = process.env.JWT_ACCESS_TOKEN_SECRET;
if (!secret) {
  console.error("baseline: JWT_ACCESS_TOKEN_SECRET is not set");
  process.exit(78);
}
const ratePerSec = Number(process.env.RATE_LIMIT_PER_SEC || 20);
const rateBurst = Number(process.env.RATE_LIMIT_BURST || 20);

const httpServer = createServer((req, res) => {
  if (req.url === "/health") {
    res.writeHead(200, { "content-type": "application/json" });
    res.end('{"status":"ok"}');
    return;
  }
  res.writeHead(404);
  res.end();
});

const io = new Server(httpServer, {
  path: "/socket.io/",
  transports: ["websocket"],
  pingInterval: 25000,
  pingTimeout: 60000,
  maxHttpBufferSize: 1e6,
  serveClient: false,
  cors: { origin: true },
});

if (process.env.REDIS_URL) {
  const pub = createClient({ url: process.env.REDIS_URL });
  const sub = pub.duplicate();
  pub.on("error", (e) => console.error("baseline: redis pub", e.message));
  sub.on("error", (e) => console.error("baseline: redis sub", e.message));
  await Promise.all([pub.connect(), sub.connect()]);
  io.adapter(createAdapter(pub, sub));
}

// Per-user token buckets, in this process only (the old gateway's limiter
// did not share budgets between processes).
const buckets = new Map();
function allow(userId) {
  const now = Date.now();
  let b = buckets.get(userId);
  if (!b) {
    b = { tokens: rateBurst, at: now };
    buckets.set(userId, b);
  }
  b.tokens = Math.min(rateBurst, b.tokens + ((now - b.at) / 1000) * ratePerSec);
  b.at = now;
  if (b.tokens >= 1) {
    b.tokens -= 1;
    return true;
  }
  return false;
}

function authError(message, code) {
  const e = new Error(message);
  e.data = { code };
  return e;
}

const flows = io.of("/flows");

flows.use((socket, next) => {
  const hs = socket.handshake;
  const header = hs.headers.authorization || "";
  const token =
    (hs.auth && hs.auth.token) ||
    (header.startsWith("Bearer ") ? header.slice(7) : null) ||
    hs.query.token;
  if (!token) return next(authError("Authentication token required", "NO_TOKEN"));
  try {
    const claims = jwt.verify(token, secret, { algorithms: ["HS256"] });
    const userId = claims.userId ?? claims.sub;
    if (!userId) return next(authError("Token has no user id", "INVALID_TOKEN"));
    socket.data.userId = String(userId);
    next();
  } catch (e) {
    next(authError("Invalid token", "INVALID_TOKEN"));
  }
});

flows.on("connection", (socket) => {
  const userId = socket.data.userId;
  socket.emit("connected", {
    message: "Connected to flows",
    userId,
    serverTime: new Date().toISOString(),
  });

  const refuse = (ack, code, message) => {
    socket.emit("error", { message, code });
    if (typeof ack === "function") ack({ ok: false, code, message });
  };

  const leave = () => {
    const s = socket.data.session;
    if (!s) return;
    const room = "flow:" + s.flowId;
    socket.to(room).emit("user:left", {
      userId,
      socketId: socket.id,
      userName: s.userName,
    });
    socket.leave(room);
    socket.data.session = undefined;
  };

  socket.on("flow:join", async (data, ack) => {
    if (!allow(userId)) return refuse(ack, "RATE_LIMIT", "Rate limit exceeded");
    const flowId = data && data.flowId;
    if (typeof flowId !== "string" || flowId.length === 0) {
      return refuse(ack, "INVALID_FLOW_ID", "Invalid flow id");
    }
    leave();
    const room = "flow:" + flowId;
    const session = {
      userId,
      socketId: socket.id,
      flowId,
      userName: data.userName ?? null,
      userColor: data.userColor ?? null,
      joinedAt: new Date().toISOString(),
    };
    socket.data.session = session;
    socket.join(room);
    let users;
    try {
      // Every node's sockets in the room, through the adapter.
      const sockets = await flows.in(room).fetchSockets();
      users = sockets.map((s) => s.data.session).filter(Boolean);
    } catch (e) {
      return refuse(ack, "JOIN_ERROR", "Could not list the flow's users: " + e.message);
    }
    socket.emit("flow:users", users);
    socket.to(room).emit("user:joined", session);
    if (typeof ack === "function") ack({ ok: true });
  });

  socket.on("flow:leave", (_data, ack) => {
    if (!socket.data.session) return refuse(ack, "NOT_IN_FLOW", "Not in a flow");
    leave();
    if (typeof ack === "function") ack({ ok: true });
  });

  socket.on("pod:move", (data, ack) => {
    if (!allow(userId)) return refuse(ack, "RATE_LIMIT", "Rate limit exceeded");
    const s = socket.data.session;
    if (!s) return refuse(ack, "NOT_IN_FLOW", "Join a flow first");
    if (!data || data.podId === undefined || data.position === undefined) {
      return refuse(ack, "INVALID_PAYLOAD", "pod:move requires podId and position");
    }
    socket
      .to("flow:" + s.flowId)
      .emit("pod:moved", { podId: data.podId, position: data.position, userId });
    if (typeof ack === "function") ack({ ok: true });
  });

  socket.on("disconnect", () => leave());
});

httpServer.listen(port, host, () => {
  const a = httpServer.address();
  console.log(JSON.stringify({ message: "listening", addr: `${a.address}:${a.port}` }));
});

const stop = () => {
  io.close();
  process.exit(0);
};
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
