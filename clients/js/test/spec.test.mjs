// The golden frames of spec/frames/ (docs/protocol.md as JSON files): the client builds every
// client frame's shape for the op it sends, and handles every server frame with the effect
// the protocol gives it. A frame file without a case here fails the test.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readdirSync, readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { HubClient, HubError } from "../hub.js";
import { MemoryStorage, until } from "./helpers.mjs";

const SPEC = fileURLToPath(new URL("../../../spec/frames/", import.meta.url));
const load = (side) => Object.fromEntries(readdirSync(SPEC + side).filter((f) => f.endsWith(".json"))
  .map((f) => [f.slice(0, -5), JSON.parse(readFileSync(SPEC + side + "/" + f, "utf8")).frame]));
const CLIENT = load("client");
const SERVER = load("server");

/** A scripted WebSocket: `sent` holds the parsed frames, `deliver(frame)` a server frame. */
function harness(options = {}) {
  const sockets = [];
  class FakeWebSocket {
    constructor(url) {
      this.url = url;
      this.readyState = 0;
      this.sent = [];
      sockets.push(this);
      queueMicrotask(() => { this.readyState = 1; this.onopen?.({}); });
    }
    send(data) { this.sent.push(JSON.parse(data)); }
    close() { this.readyState = 3; }
  }
  const states = [];
  const client = new HubClient("ws://hub.test/ws", { WebSocket: FakeWebSocket, storage: null,
    onState: (s, i) => states.push([s, i]), ...options });
  const h = {
    client, states, sockets,
    get ws() { return sockets.at(-1); },
    get sent() { return sockets.at(-1).sent; },
    lastSent: () => sockets.at(-1).sent.at(-1),
    deliver: (frame) => sockets.at(-1).onmessage({ data: JSON.stringify(frame) }),
    /** `frame` as the reply to the last frame sent (its id replaced) */
    reply: (frame) => h.deliver({ ...frame, id: h.lastSent().id }),
    ready: () => until(() => sockets.length && client.state === "connected", "connected", 2000),
  };
  return h;
}

/** The shape of a client frame: what it must equal, its id (any) and token (any) aside. */
function assertShape(sent, golden) {
  const strip = ({ id, token, ...rest }) => rest;
  assert.deepEqual(strip(sent), strip(golden));
  assert.equal(typeof sent.id, "number");
  assert.deepEqual(Object.keys(sent).sort(), Object.keys(golden).sort());
}

const SINCE = { offset: 30, epoch: "6b11474a05518e5195d9" };
const storageWith = (channel, pos) => {
  const s = new MemoryStorage();
  s.setItem(`hub:pos:${channel}`, JSON.stringify(pos));
  return s;
};

const CLIENT_CASES = {
  async connect(h) { /* made in the harness with a token */ return h.sent[0]; },
  async subscribe(h) { h.client.subscribe("news"); return h.lastSent(); },
  async subscribe_last(h) { h.client.subscribe("chat:room1", { last: 20 }); return h.lastSent(); },
  async subscribe_since(h) { return h.lastSent(); }, // storage-made, see below
  async subscribe_since_last(h) { return h.lastSent(); },
  async unsubscribe(h) {
    const sub = h.client.subscribe("news");
    h.reply(SERVER.ack);
    await sub.ready;
    sub.unsubscribe();
    return h.lastSent();
  },
  async publish(h) { h.client.publish("chat:room1", { text: "hi" }).catch(() => {}); return h.lastSent(); },
  async publish_idempotency_key(h) {
    h.client.publish("chat:room1", { text: "hi" }, { idempotencyKey: "k-1" }).catch(() => {});
    return h.lastSent();
  },
  async history(h) { h.client.history("chat:room1", { limit: 50 }).catch(() => {}); return h.lastSent(); },
  async history_since(h) {
    h.client.history("chat:room1", { limit: 50, since: SINCE }).catch(() => {});
    return h.lastSent();
  },
  async presence(h) { h.client.presence("chat:room1").catch(() => {}); return h.lastSent(); },
  async presence_stats(h) { h.client.presenceStats("chat:room1").catch(() => {}); return h.lastSent(); },
  async ping(h) {
    await until(() => h.sent.some((f) => f.op === "ping"), "a ping", 2000);
    return h.sent.find((f) => f.op === "ping");
  },
  async refresh(h) {
    await until(() => h.sent.some((f) => f.op === "refresh"), "a refresh", 4000);
    return h.sent.find((f) => f.op === "refresh");
  },
};

test("every client frame of spec/frames/client has a case", () => {
  assert.deepEqual(Object.keys(CLIENT).sort(), Object.keys(CLIENT_CASES).sort());
});

for (const [kind, golden] of Object.entries(CLIENT)) {
  test(`client frame ${kind}`, async () => {
    const opts = {};
    if (kind === "connect") opts.token = golden.token;
    if (kind === "ping") opts.pingInterval = 40;
    if (kind === "refresh") opts.getToken = async () => golden.token;
    if (kind.startsWith("subscribe_since")) opts.storage = storageWith("chat:room1", SINCE);
    const h = harness(opts);
    try {
      await until(() => h.sockets.length && h.ws.readyState === 1, "open", 2000);
      if (kind === "refresh") {
        await until(() => h.sent.length, "the connect frame", 2000);
        h.reply({ ...SERVER.ack_connect, exp: Date.now() / 1000 + 2.2 }); // refresh at ~1.1 s
      }
      if (kind !== "connect") await h.ready();
      if (kind === "subscribe_since") h.client.subscribe("chat:room1");
      if (kind === "subscribe_since_last") h.client.subscribe("chat:room1", { last: 20 });
      const sent = await CLIENT_CASES[kind](h);
      assertShape(sent, golden);
    } finally {
      h.client.close();
    }
  });
}

// Each server case: (harness, golden frame) -> asserts the effect.
const SERVER_CASES = {
  async ack_connect(h, f) { h.reply(f); await h.ready(); assert.equal(h.client.user, "alice"); assert.equal(h.client.clientId, f.client); },
  async ack_connect_no_exp(h, f) { h.reply(f); await h.ready(); assert.equal(h.client.user, "alice"); },
  async ack(h, f) { const sub = h.client.subscribe("news"); h.reply(f); assert.deepEqual(await sub.ready, {}); },
  async ack_subscribe_history(h, f) {
    const sub = h.client.subscribe("chat:room1");
    h.reply(f);
    assert.deepEqual(await sub.ready, { offset: 41, epoch: f.epoch, recovered: undefined });
    assert.deepEqual(sub.position, { offset: 41, epoch: f.epoch });
  },
  async ack_subscribe_recovered(h, f) {
    const sub = h.client.subscribe("chat:room1");
    h.reply(f);
    assert.equal((await sub.ready).recovered, true);
    assert.deepEqual(sub.position, SINCE); // the replay from 31 follows
  },
  async ack_subscribe_not_recovered(h, f) {
    const gaps = [];
    const sub = h.client.subscribe("chat:room1", { onGap: (g) => gaps.push(g) });
    h.reply(f);
    assert.equal((await sub.ready).recovered, false);
    assert.deepEqual(gaps, [{ channel: "chat:room1", from: 31, epoch: f.epoch, reason: "not_recovered" }]);
  },
  async ack_publish_history(h, f) {
    const p = h.client.publish("chat:room1", 1);
    h.reply(f);
    assert.deepEqual(await p, { offset: 42, epoch: f.epoch });
  },
  async error(h, f) {
    const sub = h.client.subscribe("private:team-a");
    h.reply(f);
    await assert.rejects(sub.ready, (e) => e instanceof HubError && e.code === "forbidden" && e.message === f.message);
  },
  async error_no_id(h, f) {
    const warn = console.warn;
    console.warn = () => {};
    try { h.deliver(f); } finally { console.warn = warn; }
    const [, info] = h.states.find(([s]) => s === "error");
    assert.equal(info.error.code, "bad_request");
  },
  async gap(h, f) {
    const gaps = [];
    h.client.subscribe("news", { onGap: (g) => gaps.push(g) });
    h.reply(SERVER.ack);
    h.deliver(f);
    assert.deepEqual(gaps, [{ channel: "news", reason: "gap" }]);
  },
  async gap_history(h, f) {
    const gaps = [];
    const sub = h.client.subscribe("chat:room1", { onGap: (g) => gaps.push(g) });
    h.reply({ ...SERVER.ack_subscribe_history, offset: 30 });
    h.deliver(f);
    assert.deepEqual(gaps, [{ channel: "chat:room1", from: 31, to: 35, epoch: f.epoch, reason: "gap" }]);
    assert.deepEqual(sub.position, { offset: 35, epoch: f.epoch });
  },
  async gap_history_new_epoch(h, f) {
    const got = [];
    const sub = h.client.subscribe("chat:room1", { onGap: () => {}, onMessage: (m) => got.push(m) });
    h.reply(SERVER.ack_subscribe_history);
    h.deliver(f);
    assert.equal(sub.position.epoch, f.epoch);
    h.deliver({ ...SERVER.message_history, offset: 1 }); // the new epoch's offsets are not duplicates
    assert.equal(got.length, 1);
  },
  async history(h, f) {
    const p = h.client.history("chat:room1");
    h.reply(f);
    assert.deepEqual(await p, { offset: 41, epoch: f.epoch, messages: f.messages });
  },
  async history_from(h, f) {
    const p = h.client.history("chat:room1");
    h.reply(f);
    assert.deepEqual((await p).messages.map((m) => m.from), f.messages.map((m) => m.from));
  },
  async join(h, f) {
    const joins = [];
    h.client.subscribe("chat:room1", { onJoin: (p) => joins.push(p) });
    h.reply(SERVER.ack_subscribe_history);
    h.deliver(f);
    assert.deepEqual(joins, [{ channel: f.channel, client: f.client, user: "alice" }]);
  },
  async leave(h, f) {
    const leaves = [];
    h.client.subscribe("chat:room1", { onLeave: (p) => leaves.push(p) });
    h.reply(SERVER.ack_subscribe_history);
    h.deliver(f);
    assert.deepEqual(leaves, [{ channel: f.channel, client: f.client, user: null }]);
  },
  async message(h, f) {
    const got = [];
    h.client.subscribe("news", { onMessage: (m) => got.push(m) });
    h.reply(SERVER.ack);
    h.deliver(f);
    assert.deepEqual(got, [{ channel: "news", data: f.data }]);
  },
  async message_from(h, f) { await SERVER_CASES._from(h, f, "news", SERVER.ack); },
  async message_from_anonymous(h, f) { await SERVER_CASES._from(h, f, "news", SERVER.ack); },
  async message_history(h, f) {
    const got = [];
    const sub = h.client.subscribe("chat:room1", { onMessage: (m) => got.push(m) });
    h.reply(SERVER.ack_subscribe_history);
    h.deliver(f);
    h.deliver(f); // a duplicate: dropped
    assert.deepEqual(got, [{ channel: f.channel, data: f.data, offset: 42 }]);
    assert.deepEqual(sub.position, { offset: 42, epoch: SERVER.ack_subscribe_history.epoch });
  },
  async message_history_from(h, f) { await SERVER_CASES._from(h, f, "chat:room1", SERVER.ack_subscribe_history); },
  async _from(h, f, channel, ack) {
    const got = [];
    h.client.subscribe(channel, { onMessage: (m) => got.push(m) });
    h.reply(ack);
    h.deliver(f);
    assert.equal(got.length, 1);
    assert.deepEqual(got[0].from, f.from);
    assert.deepEqual(got[0].data, f.data);
  },
  async pong(h, f) { h.deliver(f); assert.equal(h.client.state, "connected"); },
  async presence(h, f) {
    const p = h.client.presence("chat:room1");
    h.reply(f);
    assert.deepEqual(await p, f.clients);
  },
  async presence_stats(h, f) {
    const p = h.client.presenceStats("chat:room1");
    h.reply(f);
    assert.deepEqual(await p, { clients: 3, users: 2 });
  },
  async subscribed(h, f) {
    const subs = [];
    h.client._onSubscribed = (s) => subs.push(s);
    h.deliver(f);
    assert.equal(subs.length, 1);
    assert.equal(subs[0].channel, "news");
    assert.deepEqual(await subs[0].ready, {});
  },
  async subscribed_history(h, f) {
    const subs = [];
    h.client._onSubscribed = (s) => subs.push(s);
    h.deliver(f);
    assert.deepEqual(subs[0].position, { offset: 41, epoch: f.epoch });
    h.deliver({ ...SERVER.message_history, offset: 41 }); // at the position: a duplicate
    const got = [];
    subs[0].onMessage = (m) => got.push(m);
    h.deliver(SERVER.message_history);
    assert.equal(got.length, 1);
  },
  async unsubscribed_revoked(h, f) { await SERVER_CASES._unsub(h, f); },
  async unsubscribed_server(h, f) { await SERVER_CASES._unsub(h, f); },
  async _unsub(h, f) {
    const ends = [];
    const sub = h.client.subscribe(f.channel, { onUnsubscribed: (u) => ends.push(u) });
    h.reply(SERVER.ack);
    await sub.ready;
    h.deliver(f);
    assert.deepEqual(ends, [{ channel: f.channel, reason: f.reason }]);
    assert.equal(sub.state, "unsubscribed");
  },
};

test("every server frame of spec/frames/server has a case", () => {
  const cases = Object.keys(SERVER_CASES).filter((k) => !k.startsWith("_")).sort();
  assert.deepEqual(Object.keys(SERVER).sort(), cases);
});

for (const [kind, golden] of Object.entries(SERVER)) {
  test(`server frame ${kind}`, async () => {
    const auth = kind.startsWith("ack_connect");
    const opts = auth ? { token: "t" } : {};
    if (kind === "ack_subscribe_recovered" || kind === "ack_subscribe_not_recovered") {
      opts.storage = storageWith("chat:room1", SINCE);
    }
    const h = harness(opts);
    try {
      await until(() => h.sockets.length && h.ws.readyState === 1, "open", 2000);
      if (auth) await until(() => h.sent.length, "the connect frame", 2000);
      else await h.ready();
      const handle = h.client._handleFrame.bind(h.client);
      const unknown = [];
      h.client._handleFrame = (frame) => {
        const known = handle(frame);
        if (known === false) unknown.push(frame);
        return known;
      };
      await SERVER_CASES[kind](h, structuredClone(golden));
      assert.deepEqual(unknown, [], `the frame handler does not know ${kind}`);
    } finally {
      h.client.close();
    }
  });
}
