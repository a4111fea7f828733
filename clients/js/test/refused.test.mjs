// Refused handshakes (a browser sees them only as close 1006), failover, close() and exit.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { fileURLToPath } from "node:url";
import { HubClient } from "../hub.js";
import { WebSocket, startHub, freePort, until, stateRecorder } from "./helpers.mjs";

const clients = [];
function client(url, opts = {}) {
  const c = new HubClient(url, { WebSocket, storage: null, minDelay: 10, maxDelay: 60, ...opts });
  clients.push(c);
  return c;
}
after(() => {
  for (const c of clients) c.close();
});

test("Origin refused (HTTP 403 seen as 1006): cannot_connect after N attempts, keeps trying", async () => {
  const hub = await startHub({ args: ["--allowed-origin", "https://good.example"] });
  class EvilOrigin extends WebSocket {
    constructor(url) { super(url, { origin: "https://evil.example" }); }
  }
  const rec = stateRecorder();
  const c = client(hub.url, { WebSocket: EvilOrigin, cannotConnectAfter: 3, onState: rec.onState });
  await until(() => rec.count("cannot_connect") >= 3, "cannot_connect, then more attempts");
  const first = rec.states.findIndex(([s]) => s === "cannot_connect");
  assert.deepEqual(rec.states.slice(0, first).map(([s]) => s), ["connecting", "connecting", "connecting"]);
  assert.equal(rec.states[first][1].failures, 3);
  assert.equal(rec.states[first][1].code, 1006);
  assert.ok(rec.states.slice(1).every(([, info]) => info.delay >= 0 && info.delay <= 60));
  assert.equal(c.state, "cannot_connect");
  // the same client with an allowed Origin connects
  class GoodOrigin extends WebSocket {
    constructor(url) { super(url, { origin: "https://good.example" }); }
  }
  const ok = client(hub.url, { WebSocket: GoodOrigin });
  await ok.connect();
  c.close();
  assert.equal(c.state, "closed");
  await hub.kill();
});

test("nothing listens: cannot_connect; a list of URLs fails over to the next", async () => {
  const dead = `ws://127.0.0.1:${await freePort()}/ws`;
  const rec = stateRecorder();
  const c = client(dead, { cannotConnectAfter: 2, onState: rec.onState });
  await until(() => rec.seen("cannot_connect"), "cannot_connect");
  c.close();

  const hub = await startHub();
  const urls = [];
  class Spy extends WebSocket {
    constructor(url) { urls.push(url); super(url); }
  }
  const f = client([dead, hub.url + "?user=x"], { WebSocket: Spy });
  await f.connect();
  assert.deepEqual(urls, [dead, hub.url + "?user=x"]);
  await hub.kill();
});

test("close() stops everything, the node process exits", async () => {
  const hub = await startHub();
  const dead = `ws://127.0.0.1:${await freePort()}/ws`;
  const script = `
    import WebSocket from "ws";
    import { HubClient } from ${JSON.stringify(fileURLToPath(new URL("../hub.js", import.meta.url)))};
    const c = new HubClient(${JSON.stringify(hub.url + "?user=x")}, { WebSocket, storage: null });
    c.subscribe("news", { onMessage() {} });
    c.subscribe("chat:exit", { last: 5 });
    await c.connect();
    await c.publish("news", 1);
    const pending = c.publish("news", 2);
    c.close();
    await pending.catch((e) => { if (e.code !== "closed") throw e; });
    // a client stuck reconnecting, closed
    const d = new HubClient(${JSON.stringify(dead)}, { WebSocket, storage: null, minDelay: 5 });
    setTimeout(() => d.close(), 200);
    console.log("done");
  `;
  const child = spawn(process.execPath, ["--input-type=module", "-e", script], {
    cwd: fileURLToPath(new URL("..", import.meta.url)), stdio: ["ignore", "pipe", "pipe"] });
  let out = "";
  child.stdout.on("data", (d) => { out += d; });
  child.stderr.on("data", (d) => { out += d; });
  // the client's own timers run 5 s (ping check) and 10 s (connect timeout): a process alive
  // after 4 s kept one of them
  const timer = setTimeout(() => child.kill("SIGKILL"), 4000);
  const [code, signal] = await new Promise((r) => child.once("exit", (c, s) => r([c, s])));
  clearTimeout(timer);
  assert.equal(signal, null, `the process did not exit by itself:\n${out}`);
  assert.equal(code, 0, out);
  assert.match(out, /done/);
  await hub.kill();
});
