// Connect, subscribe, publish, typed errors, history, presence, in-band auth and refresh,
// against real hub processes.
import { test, after, before } from "node:test";
import assert from "node:assert/strict";
import { HubClient, HubError } from "../hub.js";
import { WebSocket, startHub, channel, token, until, sleep, stateRecorder } from "./helpers.mjs";

let hub; // auth off
let authHub; // --jwt-secret
const clients = [];
function client(url, opts = {}) {
  const c = new HubClient(url, { WebSocket, storage: null, ...opts });
  clients.push(c);
  return c;
}

before(async () => {
  [hub, authHub] = await Promise.all([
    startHub(),
    startHub({ args: ["--jwt-secret", "test-secret-test-secret-test-secret-0123"] }),
  ]);
});
after(() => {
  for (const c of clients) c.close();
});

test("connect, subscribe, publish, ack", async () => {
  const a = client(hub.url + "?user=alice");
  const b = client(hub.url + "?user=bob");
  const ch = channel("news");
  const got = [];
  const sub = a.subscribe("news", { onMessage: (m) => got.push(m) });
  assert.deepEqual(await sub.ready, {});
  await b.connect();
  assert.equal(b.state, "connected");
  assert.equal(await b.publish("news", { text: ch }), undefined);
  await until(() => got.some((m) => m.data.text === ch), "the message");
  const m = got.find((x) => x.data.text === ch);
  assert.equal(m.channel, "news");
  assert.equal(m.offset, undefined);
  sub.unsubscribe();
  a.close();
  assert.equal(a.state, "closed");
});

test("typed errors reject promises: forbidden, no_history, bad_channel", async () => {
  const a = client(hub.url + "?user=alice");
  const sub = a.subscribe("private:x");
  await assert.rejects(sub.ready, (e) => e instanceof HubError && e.code === "forbidden");
  assert.equal(sub.state, "unsubscribed");
  await assert.rejects(a.history("news"), (e) => e instanceof HubError && e.code === "no_history");
  await assert.rejects(a.publish("nope", 1), (e) => e.code === "forbidden");
  await assert.rejects(a.publish("bad channel", 1), (e) => e.code === "bad_channel");
  await assert.rejects(a.presence("news"), (e) => e.code === "no_presence");
  const bad = a.subscribe("news", { last: 5 });
  await assert.rejects(bad.ready, (e) => e.code === "no_history");
  assert.equal(a.state, "connected"); // errors never close the connection
});

test("history channel: publish positions, subscribe with last, history()", async () => {
  const a = client(hub.url + "?user=alice");
  const ch = channel("chat:");
  const positions = [];
  for (let i = 1; i <= 5; i++) positions.push(await a.publish(ch, { n: i }));
  assert.deepEqual(positions.map((p) => p.offset), [1, 2, 3, 4, 5]);
  const epoch = positions[0].epoch;
  const got = [];
  const sub = a.subscribe(ch, { last: 3, onMessage: (m) => got.push(m) });
  assert.deepEqual(await sub.ready, { offset: 5, epoch, recovered: undefined });
  await until(() => got.length === 3, "the backlog");
  assert.deepEqual(got.map((m) => [m.offset, m.data.n]), [[3, 3], [4, 4], [5, 5]]);
  await a.publish(ch, { n: 6 });
  await until(() => got.length === 4, "the live message");
  assert.equal(got[3].offset, 6);
  assert.deepEqual(sub.position, { offset: 6, epoch });
  const h = await a.history(ch, { limit: 2 });
  assert.equal(h.offset, 6);
  assert.equal(h.epoch, epoch);
  assert.deepEqual(h.messages.map((m) => [m.offset, m.data]), [[5, { n: 5 }], [6, { n: 6 }]]);
  const h2 = await a.history(ch, { since: { offset: 4, epoch } });
  assert.deepEqual(h2.messages.map((m) => m.offset), [5, 6]);
  // idempotent publish: the same key gives the first position and no second delivery
  const p1 = await a.publish(ch, { n: 7 }, { idempotencyKey: "k1" });
  const p2 = await a.publish(ch, { n: 7 }, { idempotencyKey: "k1" });
  assert.deepEqual(p1, p2);
});

test("presence, presenceStats, join and leave", async () => {
  const ch = channel("chat:");
  const a = client(hub.url + "?user=alice");
  const b = client(hub.url + "?user=bob");
  const joins = [];
  const leaves = [];
  await a.subscribe(ch, { onJoin: (p) => joins.push(p), onLeave: (p) => leaves.push(p) }).ready;
  const sb = b.subscribe(ch);
  await sb.ready;
  await until(() => joins.some((p) => p.user === "bob"), "bob's join");
  const clientsOf = await a.presence(ch);
  assert.deepEqual(clientsOf.map((c) => c.user).sort(), ["alice", "bob"]);
  assert.deepEqual(await a.presenceStats(ch), { clients: 2, users: 2 });
  await sb.unsubscribe();
  await until(() => leaves.some((p) => p.user === "bob"), "bob's leave");
  assert.equal(leaves[0].channel, ch);
});

test("in-band auth: connect ack sets user and clientId; no token in the URL", async () => {
  const seen = [];
  class Spy extends WebSocket {
    constructor(url, ...rest) {
      seen.push(url);
      super(url, ...rest);
      const send = this.send.bind(this);
      this.send = (data) => { seen.push(JSON.parse(data)); send(data); };
    }
  }
  const t = token("carol", { channels: ["private:team"] });
  const c = client(authHub.url, { token: t, WebSocket: Spy });
  await c.connect();
  assert.equal(c.user, "carol");
  assert.match(c.clientId, /\S+/);
  assert.equal(seen[0], authHub.url);
  assert.deepEqual(seen[1], { op: "connect", token: t, id: seen[1].id });
  await c.subscribe("private:team").ready; // granted by the token
});

test("token refresh before exp keeps the connection; 4001 without getToken stops", async () => {
  let calls = 0;
  const rec = stateRecorder();
  const c = client(authHub.url, {
    getToken: async () => { calls += 1; return token("dave", { ttl: 4 }); },
    onState: rec.onState,
  });
  await c.connect();
  const id = c.clientId;
  await sleep(6000); // past the first token's exp: refreshed at about 2 s, then 4 s
  assert.equal(c.state, "connected");
  assert.equal(c.clientId, id); // the same connection
  assert.ok(calls >= 2, `getToken called ${calls} times`);
  assert.ok(!rec.seen("reconnecting"), JSON.stringify(rec.states));

  const rec2 = stateRecorder();
  const d = client(authHub.url, { token: token("erin", { ttl: 2 }), onState: rec2.onState });
  await d.connect();
  await until(() => d.state === "closed", "4001", 8000);
  const [, info] = rec2.states.at(-1);
  assert.equal(info.code, 4001);
  assert.equal(info.error.code, "token_expired");
  await assert.rejects(d.publish("news", 1), (e) => e.code === "token_expired");
});

test("4001 at connect: reconnect with a fresh token from getToken", async () => {
  let calls = 0;
  const c = client(authHub.url, {
    getToken: async () => { calls += 1; return calls === 1 ? token("fay", { ttl: -10 }) : token("fay"); },
    minDelay: 50,
  });
  await c.connect();
  assert.equal(c.user, "fay");
  assert.equal(calls, 2);
});

test("4002 (invalid token) stops with an error", async () => {
  const rec = stateRecorder();
  const c = client(authHub.url, { token: "not-a-jwt", onState: rec.onState });
  await assert.rejects(c.connect(), (e) => e.code === "closed" && e.closeCode === 4002);
  assert.equal(c.state, "closed");
});
