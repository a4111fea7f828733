"use strict";
// The node-ws stack: Node's equivalent of bench/ceiling_server.py.
//
// A `ws` WebSocketServer (no permessage-deflate) and one ioredis subscriber on one channel;
// every message goes to every open client with `client.send(data, {binary: false})`, the
// broadcast loop of the ws README. No protocol: connected = subscribed.
//
//   node bench/node/ws_server.js --port P --redis-url redis://127.0.0.1:R/0 [--channel hub:bench]
const { WebSocketServer, WebSocket } = require("ws");
const Redis = require("ioredis");
const parseArgs = require("./args");

const args = parseArgs(process.argv.slice(2), { port: undefined, "redis-url": undefined,
  channel: "hub:bench" });
const sub = new Redis(args["redis-url"]);
sub.on("error", (err) => console.error("redis:", err.message));

const wss = new WebSocketServer({ host: "127.0.0.1", port: Number(args.port),
  perMessageDeflate: false });
wss.on("connection", (ws) => {
  ws.on("error", () => {}); // a reset client must not take the server down
});

sub.on("messageBuffer", (_channel, message) => {
  for (const client of wss.clients) {
    if (client.readyState === WebSocket.OPEN) client.send(message, { binary: false });
  }
});
sub.subscribe(args.channel).catch((err) => {
  console.error("subscribe failed:", err.message);
  process.exit(1);
});

function shutdown() {
  wss.close();
  for (const client of wss.clients) client.terminate();
  sub.disconnect();
  setTimeout(() => process.exit(0), 200).unref();
}
process.on("SIGTERM", shutdown);
process.on("SIGINT", shutdown);
