"use strict";
// Publish one event with the real @socket.io/redis-emitter, for the test that pins the
// Python publisher's Socket.IO wire format against it (tests/system/test_bench_smoke.py):
//   node bench/node/emit_once.js --redis-url URL --payload '{"r":1,...}'
const { Emitter } = require("@socket.io/redis-emitter");
const Redis = require("ioredis");
const parseArgs = require("./args");

const args = parseArgs(process.argv.slice(2), { "redis-url": undefined, payload: undefined });
const client = new Redis(args["redis-url"]);
const emitter = new Emitter(client);
client.once("ready", async () => {
  emitter.to("bench").emit("msg", JSON.parse(args.payload));
  await client.quit();
});
