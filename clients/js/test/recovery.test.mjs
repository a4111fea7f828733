// Recovery: a hub killed (SIGKILL) and restarted under a subscribed client, and a page
// "reload" (a new HubClient with the same storage), against real hub processes.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { HubClient } from "../hub.js";
import { WebSocket, MemoryStorage, startHub, channel, until, sleep, spyWebSocket,
  stateRecorder } from "./helpers.mjs";

const clients = [];
function client(url, opts = {}) {
  const c = new HubClient(url, { WebSocket, storage: null, minDelay: 50, maxDelay: 500, ...opts });
  clients.push(c);
  return c;
}
after(() => {
  for (const c of clients) c.close();
});

test("hub SIGKILLed and restarted on the same port: every message once, in order, recovered", async () => {
  const [a, b] = await Promise.all([startHub(), startHub()]);
  const ch = channel("chat:");
  const frames = [];
  const rec = stateRecorder();
  const gaps = [];
  const got = [];
  const sub = client(a.url + "?user=sub", { WebSocket: spyWebSocket(frames), onState: rec.onState })
    .subscribe(ch, { onMessage: (m) => got.push(m), onGap: (g) => gaps.push(g) });
  await sub.ready;
  const pub = client(b.url + "?user=pub");
  const total = 30;
  let n = 0;
  const publishing = (async () => {
    while (n < total) {
      n += 1;
      await pub.publish(ch, { n });
      await sleep(40);
    }
  })();
  await until(() => got.length >= 5, "the first deliveries");
  await a.kill("SIGKILL");
  await until(() => rec.seen("reconnecting"), "reconnecting");
  await sleep(300);
  const [gotBeforeRestart, publishedBeforeRestart] = [got.length, n];
  const a2 = await startHub({ port: a.port });
  await publishing;
  await until(() => got.length >= total, `all ${total} messages (got ${got.length})`, 20000);
  await sleep(200); // nothing more (no duplicate) arrives
  assert.deepEqual(got.map((m) => m.data.n), Array.from({ length: total }, (_, i) => i + 1));
  assert.deepEqual(got.map((m) => m.offset), Array.from({ length: total }, (_, i) => i + 1));
  assert.deepEqual(gaps, []);
  const acks = frames.filter((f) => f.type === "ack" && f.recovered !== undefined);
  assert.equal(acks.length, 1, JSON.stringify(acks));
  assert.equal(acks[0].recovered, true);
  // messages were published while the subscriber was away: the test needed the recovery
  assert.ok(publishedBeforeRestart > gotBeforeRestart, `${publishedBeforeRestart} ${gotBeforeRestart}`);
  assert.equal(sub.state, "subscribed");
  await a2.kill();
  await b.kill();
});

test("storage: a new HubClient with the same storage (a reload) recovers what was missed", async () => {
  const hub = await startHub();
  const ch = channel("chat:");
  const storage = new MemoryStorage();
  const pub = client(hub.url + "?user=pub");
  await pub.publish(ch, { n: 1 });
  const got1 = [];
  const c1 = client(hub.url + "?user=reader", { storage });
  await c1.subscribe(ch, { last: 10, onMessage: (m) => got1.push(m) }).ready;
  await until(() => got1.length === 1, "the backlog");
  await pub.publish(ch, { n: 2 });
  await until(() => got1.length === 2, "the live message");
  const { epoch } = JSON.parse(storage.getItem(`hub:pos:${ch}`));
  assert.deepEqual(JSON.parse(storage.getItem(`hub:pos:${ch}`)), { offset: 2, epoch });
  c1.close(); // the page goes away; its position stays
  for (let n = 3; n <= 5; n++) await pub.publish(ch, { n });
  const frames = [];
  const got2 = [];
  const c2 = client(hub.url + "?user=reader", { storage, WebSocket: spyWebSocket(frames) });
  const ready = await c2.subscribe(ch, { last: 10, onMessage: (m) => got2.push(m) }).ready;
  assert.deepEqual(ready, { offset: 5, epoch, recovered: true });
  await until(() => got2.length === 3, "the missed messages");
  await sleep(100);
  assert.deepEqual(got2.map((m) => m.data.n), [3, 4, 5]);
  const subscribe = frames.find((f) => f.type === "ack" && f.recovered === true);
  assert.ok(subscribe);
  assert.deepEqual(JSON.parse(storage.getItem(`hub:pos:${ch}`)), { offset: 5, epoch });
  // a deliberate unsubscribe forgets the position
  c2._subs.get(ch).unsubscribe();
  assert.equal(storage.getItem(`hub:pos:${ch}`), null);
  await hub.kill();
});

test("a wrong stored epoch: recovered false -> onGap, then live from the ack's position", async () => {
  const hub = await startHub();
  const ch = channel("chat:");
  const storage = new MemoryStorage();
  const pub = client(hub.url + "?user=pub");
  await pub.publish(ch, { n: 1 });
  storage.setItem(`hub:pos:${ch}`, JSON.stringify({ offset: 1, epoch: "0".repeat(20) }));
  const gaps = [];
  const got = [];
  const c = client(hub.url + "?user=reader", { storage });
  const ready = await c.subscribe(ch, { onMessage: (m) => got.push(m), onGap: (g) => gaps.push(g) }).ready;
  assert.equal(ready.recovered, false);
  assert.deepEqual(gaps, [{ channel: ch, epoch: ready.epoch, reason: "not_recovered" }]);
  await pub.publish(ch, { n: 2 });
  await until(() => got.length === 1, "the live message");
  assert.equal(got[0].offset, 2);
  await hub.kill();
});
