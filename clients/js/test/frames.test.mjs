// The frames this session adds to the protocol (`from`, `subscribed`, `unsubscribed`, close
// 4003) and the close-code policy, against a scripted WebSocket server (the `ws` package):
// these need exact frames and close codes on cue, which a real hub gives only through APIs
// that are not all there yet. Everything else is tested against real hubs.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { WebSocketServer } from "ws";
import { HubClient, HubError, closeAction, backoffDelay } from "../hub.js";
import { WebSocket, MemoryStorage, until, sleep, stateRecorder } from "./helpers.mjs";

const servers = [];
const clients = [];
after(() => {
  for (const c of clients) c.close();
  for (const s of servers) s.close();
});

/** A scripted hub: acks subscribes (history on "h:" channels, epoch "E"), records frames. */
async function fakeHub({ onFrame } = {}) {
  const wss = new WebSocketServer({ port: 0, host: "127.0.0.1" });
  servers.push(wss);
  await new Promise((r) => wss.once("listening", r));
  const hub = { wss, conns: [], frames: [], url: `ws://127.0.0.1:${wss.address().port}/ws` };
  wss.on("connection", (ws) => {
    hub.conns.push(ws);
    ws.on("message", (raw) => {
      const f = JSON.parse(String(raw));
      hub.frames.push(f);
      if (onFrame && onFrame(ws, f) !== undefined) return;
      if (f.op === "subscribe") {
        const ack = { type: "ack", id: f.id };
        if (f.channel.startsWith("h:")) Object.assign(ack, { offset: 10, epoch: "E" },
          f.since ? { recovered: f.since.epoch === "E" } : {});
        ws.send(JSON.stringify(ack));
      } else if (f.op === "ping") ws.send(JSON.stringify({ type: "pong", id: f.id }));
      else ws.send(JSON.stringify({ type: "ack", id: f.id ?? null }));
    });
  });
  hub.last = () => hub.conns.at(-1);
  hub.push = (frame) => hub.last().send(JSON.stringify(frame));
  return hub;
}

function client(url, opts = {}) {
  const c = new HubClient(url, { WebSocket, storage: null, minDelay: 10, maxDelay: 40, ...opts });
  clients.push(c);
  return c;
}

test("the close-code policy and the backoff figures", () => {
  for (const code of [1000, 1001, 1006, 1011, 1012, 1013, 4005, 4008]) assert.equal(closeAction(code), "reconnect", code);
  for (const code of [4009, 4029]) assert.equal(closeAction(code), "slow", code);
  assert.equal(closeAction(4001), "token");
  for (const code of [4002, 4003, 4006, 4000, 4100, 4999, 1002, 1007, 1008, 1009]) assert.equal(closeAction(code), "stop", code);
  assert.equal(backoffDelay(0, { random: () => 1 }), 250);
  assert.equal(backoffDelay(3, { random: () => 1 }), 2000);
  assert.equal(backoffDelay(10, { random: () => 1 }), 10000);
  assert.equal(backoffDelay(1, { random: () => 1, factor: 4 }), 2000);
  assert.equal(backoffDelay(5, { random: () => 0 }), 0);
});

test("message `from` is passed on; duplicates by offset are dropped", async () => {
  const hub = await fakeHub();
  const got = [];
  const c = client(hub.url);
  await c.subscribe("h:1", { onMessage: (m) => got.push(m) }).ready;
  const from = { user: "alice", client: "c-1" };
  for (const offset of [11, 12, 11, 12, 13]) {
    hub.push({ type: "message", channel: "h:1", data: { offset }, offset, from });
  }
  hub.push({ type: "message", channel: "h:1", data: "plain" });
  await until(() => got.length === 4, "4 messages");
  assert.deepEqual(got.map((m) => m.offset), [11, 12, 13, undefined]);
  assert.deepEqual(got[0], { channel: "h:1", data: { offset: 11 }, offset: 11, from });
});

test("subscribed frame: onSubscribed gets a subscription kept across reconnects", async () => {
  const hub = await fakeHub();
  const storage = new MemoryStorage();
  const subs = [];
  const c = client(hub.url, { storage, onSubscribed: (s) => subs.push(s) });
  await c.connect();
  hub.push({ type: "subscribed", channel: "h:srv", offset: 41, epoch: "E" });
  await until(() => subs.length === 1, "onSubscribed");
  const sub = subs[0];
  assert.equal(sub.channel, "h:srv");
  assert.equal(sub.serverSide, true);
  assert.deepEqual(await sub.ready, { offset: 41, epoch: "E" });
  const got = [];
  sub.onMessage = (m) => got.push(m);
  hub.push({ type: "message", channel: "h:srv", data: 1, offset: 42 });
  await until(() => got.length === 1, "the message");
  assert.deepEqual(JSON.parse(storage.getItem("hub:pos:h:srv")), { offset: 42, epoch: "E" });
  hub.last().close(1012, "restart");
  await until(() => hub.frames.some((f) => f.op === "subscribe" && f.channel === "h:srv"), "the resubscribe");
  const resub = hub.frames.find((f) => f.op === "subscribe" && f.channel === "h:srv");
  assert.deepEqual(resub.since, { offset: 42, epoch: "E" });
  assert.equal(subs.length, 1);
});

test("unsubscribed frame: onUnsubscribed, the subscription ends, no resubscribe", async () => {
  const hub = await fakeHub();
  const ends = [];
  const c = client(hub.url);
  const sub = c.subscribe("private:a", { onUnsubscribed: (u) => ends.push(u) });
  await sub.ready;
  hub.push({ type: "unsubscribed", channel: "private:a", reason: "revoked" });
  await until(() => ends.length === 1, "onUnsubscribed");
  assert.deepEqual(ends, [{ channel: "private:a", reason: "revoked" }]);
  assert.equal(sub.state, "unsubscribed");
  hub.frames.length = 0;
  hub.last().close(1001, "bye");
  await until(() => c.state === "connected" && hub.conns.length === 2, "the reconnect");
  await sleep(50);
  assert.ok(!hub.frames.some((f) => f.op === "subscribe"), JSON.stringify(hub.frames));
});

test("gap frames and recovered:false call onGap; without onGap console.error and an error event", async () => {
  const hub = await fakeHub();
  const gaps = [];
  const rec = stateRecorder();
  const c = client(hub.url, { onState: rec.onState });
  const got = [];
  await c.subscribe("h:g", { onGap: (g) => gaps.push(g), onMessage: (m) => got.push(m) }).ready;
  hub.push({ type: "gap", channels: ["h:g", "other"], from: 11, to: 15, epoch: "E" });
  hub.push({ type: "message", channel: "h:g", data: 0, offset: 16 });
  await until(() => got.length === 1, "the message after the gap");
  assert.deepEqual(gaps, [{ channel: "h:g", from: 11, to: 15, epoch: "E", reason: "gap" }]);
  // a new epoch: offsets start again, and are not taken for duplicates
  hub.push({ type: "gap", channels: ["h:g"], from: null, to: null, epoch: "F" });
  hub.push({ type: "message", channel: "h:g", data: 0, offset: 1 });
  await until(() => got.length === 2, "the message of the new epoch");
  assert.equal(c._subs.get("h:g").position.epoch, "F");

  await c.subscribe("plain").ready;
  const errors = [];
  const original = console.error;
  console.error = (...args) => errors.push(args.join(" "));
  try {
    hub.push({ type: "gap", channels: ["plain"] });
    await until(() => rec.seen("error"), "the error event");
  } finally {
    console.error = original;
  }
  assert.match(errors[0], /plain/);
  const [, info] = rec.states.find(([s]) => s === "error");
  assert.equal(info.channel, "plain");
  assert.ok(info.error instanceof HubError && info.error.code === "gap");
  assert.equal(c.state, "connected"); // an event, not a state
});

test("close 4003: stop, state closed with {code, reason}, no reconnect", async () => {
  const hub = await fakeHub({ onFrame: (ws, f) => (f.op === "history" ? true : undefined) });
  const rec = stateRecorder();
  const c = client(hub.url, { onState: rec.onState });
  await c.connect();
  const rejected = assert.rejects(c.history("h:x"), (e) => e instanceof HubError);
  await until(() => hub.frames.some((f) => f.op === "history"), "the history request");
  hub.last().close(4003, "kicked");
  await until(() => c.state === "closed", "closed");
  const [, info] = rec.states.at(-1);
  assert.equal(info.code, 4003);
  assert.equal(info.reason, "kicked");
  await rejected;
  await sleep(100);
  assert.equal(hub.conns.length, 1);
});

for (const [code, action] of [[1008, "stop"], [4006, "stop"], [4042, "stop"], [4008, "reconnect"], [4029, "slow"]]) {
  test(`close ${code}: ${action}`, async () => {
    const hub = await fakeHub();
    const rec = stateRecorder();
    const c = client(hub.url, { onState: rec.onState, random: () => 1 });
    await c.connect();
    hub.last().close(code, "x");
    await until(() => rec.states.length >= 3, "the next state");
    const [state, info] = rec.states[2];
    if (action === "stop") {
      assert.equal(state, "closed");
      assert.equal(info.code, code);
    } else {
      assert.equal(state, "reconnecting");
      assert.equal(info.delay, action === "slow" ? 40 : 10); // x4, capped at maxDelay 40
      await until(() => c.state === "connected", "reconnected");
    }
  });
}

test("requests: in-flight ones reject 'disconnected', queued ones wait for the connection", async () => {
  let drop = true;
  const hub = await fakeHub({
    onFrame: (ws, f) => {
      if (f.op === "publish" && drop) { drop = false; ws.close(1011, "oops"); return true; }
      return undefined;
    },
  });
  const c = client(hub.url);
  await c.connect();
  await assert.rejects(c.publish("news", 1), (e) => e.code === "disconnected" && e.closeCode === 1011);
  const queued = c.publish("news", 2); // sent once connected again
  assert.equal(await queued, undefined);
  const t = client(hub.url, { requestTimeout: 50 });
  hub.wss.removeAllListeners("connection");
  hub.wss.on("connection", () => {}); // never answers
  const late = t.publish("news", 3);
  await assert.rejects(late, (e) => e.code === "timeout");
});
