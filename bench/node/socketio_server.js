"use strict";
// The node-socketio stack: Socket.IO 4 with @socket.io/redis-adapter (ioredis clients).
//
// Websocket transport only (no polling, no upgrade), no permessage-deflate (the default).
// Every client joins the room "bench" in the "connection" handler. Backends publish the way
// @socket.io/redis-emitter does: PUBLISH "socket.io#/#bench#" with the msgpack (notepack.io)
// encoding of ["emitter", {type: 2, data: ["msg", payload], nsp: "/"},
// {rooms: ["bench"], flags: {}, except: []}]; the adapter PSUBSCRIBEs "socket.io#/#*".
//
//   node bench/node/socketio_server.js --port P --redis-url redis://127.0.0.1:R/0
const http = require("http");
const { Server } = require("socket.io");
const { createAdapter } = require("@socket.io/redis-adapter");
const Redis = require("ioredis");
const parseArgs = require("./args");

const args = parseArgs(process.argv.slice(2), { port: undefined, "redis-url": undefined });
const pub = new Redis(args["redis-url"]);
const sub = pub.duplicate();
for (const client of [pub, sub]) client.on("error", (err) => console.error("redis:", err.message));

const server = http.createServer();
const io = new Server(server, { transports: ["websocket"], serveClient: false,
  adapter: createAdapter(pub, sub) });
io.on("connection", (socket) => {
  socket.join("bench");
});
server.listen(Number(args.port), "127.0.0.1");

function shutdown() {
  io.close();
  pub.disconnect();
  sub.disconnect();
  setTimeout(() => process.exit(0), 200).unref();
}
process.on("SIGTERM", shutdown);
process.on("SIGINT", shutdown);
