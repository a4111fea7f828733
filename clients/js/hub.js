// hub.js: the browser and Node client of hub (docs/protocol.md is the wire contract).
//
// One dependency-free ES module. It runs wherever a WHATWG-style WebSocket constructor exists:
// browsers (globalThis.WebSocket), Node 22+ (globalThis.WebSocket), Node 20 with the `ws`
// package passed as `options.WebSocket`.
//
//   import { HubClient, HubError } from "./hub.js";
//   const client = new HubClient("wss://hub.example.com/ws", { getToken: fetchToken });
//   const sub = client.subscribe("chat:room1", { last: 20, onMessage: (m) => show(m) });
//   await sub.ready;
//   await client.publish("chat:room1", { text: "hi" });
//
// What it does for the application: in-band authentication (the token is the first frame,
// never in the URL), reconnect with capped exponential backoff and full jitter, every
// subscription resubscribed after a reconnect (history channels with `since`, duplicates
// dropped by offset, positions kept in sessionStorage across page reloads), token refresh
// before `exp`, the close-code policy of docs/clients.md, failover over a list of URLs.

/** Error codes of the protocol (docs/protocol.md section 3, "Errors"). */
export const PROTOCOL_ERROR_CODES = Object.freeze([
  "bad_request", "bad_channel", "forbidden", "limit_exceeded", "rate_limited", "unavailable",
  "unauthorized", "no_history", "no_presence",
]);

/**
 * Error codes the client itself gives, besides the protocol's:
 * - "disconnected": the connection was lost after the command was sent and before its reply
 *   (a publish may or may not have been applied: retry it with an idempotency key);
 * - "timeout": no reply within `requestTimeout` ms (waiting for a connection included);
 * - "closed": the client is closed (`close()`, or a close code that stops it: `closeCode`);
 * - "token_expired": close 4001 and no `getToken` to get a fresh token;
 * - "unsubscribed": the subscription ended before its first ack;
 * - "gap": messages of a subscription were lost (`gap` holds the details).
 */
export const CLIENT_ERROR_CODES = Object.freeze([
  "disconnected", "timeout", "closed", "token_expired", "unsubscribed", "gap",
]);

/**
 * An error of the hub or of the client. `code` is one of PROTOCOL_ERROR_CODES (an error frame
 * of the hub) or CLIENT_ERROR_CODES; `closeCode` and `reason` are set when a WebSocket close
 * caused it.
 */
export class HubError extends Error {
  /**
   * @param {string} code
   * @param {string} message
   * @param {{closeCode?: number, reason?: string, channel?: string, gap?: object}} [extra]
   */
  constructor(code, message, extra = {}) {
    super(message || code);
    this.name = "HubError";
    this.code = code;
    if (extra.closeCode !== undefined) this.closeCode = extra.closeCode;
    if (extra.reason !== undefined) this.reason = extra.reason;
    if (extra.channel !== undefined) this.channel = extra.channel;
    if (extra.gap !== undefined) this.gap = extra.gap;
  }
}

// Close-code policy (docs/clients.md). Anything not listed: 1000-3999 reconnect, 4000-4999 stop.
const STOP_CODES = new Set([1002, 1007, 1008, 1009, 4002, 4003, 4006]);
const RECONNECT_CODES = new Set([1000, 1001, 1005, 1006, 1011, 1012, 1013, 4005, 4008]);
const SLOW_CODES = new Set([4009, 4029]); // reconnect after a longer backoff (x4, capped)
const TOKEN_EXPIRED = 4001;
const SLOW_FACTOR = 4;
const STABLE_MS = 10000; // a connection up this long resets the backoff
// Subscribe errors worth retrying (nothing was done; retry later).
const TRANSIENT = new Set(["unavailable", "rate_limited"]);

/**
 * What the client does after a close: "reconnect", "slow" (longer backoff), "token" (4001) or
 * "stop".
 * @param {number} code
 * @returns {"reconnect"|"slow"|"token"|"stop"}
 */
export function closeAction(code) {
  if (code === TOKEN_EXPIRED) return "token";
  if (SLOW_CODES.has(code)) return "slow";
  if (STOP_CODES.has(code)) return "stop";
  if (RECONNECT_CODES.has(code)) return "reconnect";
  if (code >= 4000 && code <= 4999) return "stop";
  return "reconnect";
}

/**
 * The backoff delay in ms before reconnect attempt `attempt` (0 for the first): a random
 * value in [0, d] with d = min(maxDelay, minDelay * 2^attempt * factor) ("full jitter").
 */
export function backoffDelay(attempt, { minDelay = 250, maxDelay = 10000, factor = 1,
  random = Math.random } = {}) {
  const d = Math.min(maxDelay, minDelay * 2 ** Math.min(attempt, 30) * factor);
  return Math.floor(random() * d);
}

/** The `exp` claim of a JWT in seconds, or null (no verification: the hub verifies). */
function tokenExp(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const exp = JSON.parse(atob(part + "=".repeat((4 - (part.length % 4)) % 4))).exp;
    return typeof exp === "number" && Number.isFinite(exp) ? exp : null;
  } catch {
    return null;
  }
}

function defaultStorage() {
  try {
    const s = globalThis.sessionStorage;
    return s && typeof s.getItem === "function" ? s : null;
  } catch {
    return null; // a sandboxed iframe may throw on access
  }
}

const noop = () => {};

/** One subscription: made by `client.subscribe()` or by the server (`subscribed` frame). */
export class Subscription {
  constructor(client, channel, opts, serverSide) {
    this.client = client;
    /** @type {string} */
    this.channel = channel;
    /** "subscribing" | "subscribed" | "unsubscribed" */
    this.state = "subscribing";
    /** true when the server made it (a `subscribed` frame) */
    this.serverSide = serverSide;
    this.last = opts.last;
    this.onMessage = opts.onMessage || null;
    this.onGap = opts.onGap || null;
    this.onJoin = opts.onJoin || null;
    this.onLeave = opts.onLeave || null;
    this.onUnsubscribed = opts.onUnsubscribed || null;
    this.onError = opts.onError || null;
    /** {offset, epoch} of the last message delivered (history channels), else null */
    this.position = null;
    this._acked = false;
    this.ready = new Promise((resolve, reject) => {
      this._resolve = resolve;
      this._reject = reject;
    });
    this.ready.catch(noop); // an unawaited failed subscribe is no unhandled rejection
  }

  /** Ends the subscription (the position kept in storage is dropped). */
  unsubscribe() {
    return this.client._unsubscribe(this);
  }
}

/**
 * A connection to hub that reconnects by itself. See README.md for the whole behaviour.
 */
export class HubClient {
  /**
   * @param {string|string[]} urls ws:// or wss:// URL of /ws, or a list to fail over
   * @param {object} [options] see hub.d.ts (HubClientOptions)
   */
  constructor(urls, options = {}) {
    this._urls = (Array.isArray(urls) ? urls : [urls]).map(String);
    if (this._urls.length === 0) throw new TypeError("HubClient: no URL given");
    for (const u of this._urls) {
      let parsed;
      try {
        parsed = new URL(u);
      } catch {
        throw new TypeError(`HubClient: invalid URL ${u}`);
      }
      if (parsed.protocol !== "ws:" && parsed.protocol !== "wss:") {
        throw new TypeError(`HubClient: the URL must be ws:// or wss://, got ${u}`);
      }
    }
    this._WS = options.WebSocket || globalThis.WebSocket;
    if (typeof this._WS !== "function") {
      throw new TypeError("HubClient: no WebSocket: pass options.WebSocket " +
        "(in Node 20: import WebSocket from \"ws\")");
    }
    this._token = options.token ?? null;
    this._getToken = options.getToken || null;
    this._storage = options.storage === undefined ? defaultStorage() : options.storage;
    this._minDelay = options.minDelay ?? 250;
    this._maxDelay = options.maxDelay ?? 10000;
    this._cannotConnectAfter = options.cannotConnectAfter ?? 5;
    this._requestTimeout = options.requestTimeout ?? 15000;
    this._connectTimeout = options.connectTimeout ?? 10000;
    this._pingInterval = options.pingInterval ?? 25000;
    this._onState = options.onState || noop;
    this._onSubscribed = options.onSubscribed || null;
    this._onMessage = options.onMessage || null;
    this._random = options.random || Math.random;

    /** "connecting" | "connected" | "reconnecting" | "cannot_connect" | "closed" */
    this.state = "connecting";
    /** the connection id of the connect ack (null until then, or without authentication) */
    this.clientId = null;
    /** the user id of the connect ack (null until then, or without authentication) */
    this.user = null;

    this._subs = new Map(); // channel -> Subscription
    this._subAcks = new Map(); // subscribe id -> Subscription, this connection's
    this._pending = new Map(); // id -> {resolve, reject, timer, frame, sent, onReply}
    this._queue = []; // ids of requests waiting for a connection
    this._nextId = 1;
    this._ws = null;
    this._urlIndex = 0;
    this._attempt = 0; // backoff exponent
    this._failures = 0; // failed attempts in a row
    this._slow = false;
    this._connectedAt = 0;
    this._everConnected = false;
    this._timers = new Set();
    this._refreshTimer = null;
    this._pingTimer = null;
    this._waiters = [];
    this._closed = false;
    this._timer(() => this._open(), 0);
  }

  // ---- public API -------------------------------------------------------------------------

  /** Resolves once connected (and authenticated); rejects with a HubError once closed. */
  connect() {
    if (this.state === "connected") return Promise.resolve();
    if (this._closed) return Promise.reject(this._closeError || new HubError("closed", "client closed"));
    return new Promise((resolve, reject) => this._waiters.push({ resolve, reject }));
  }

  /**
   * Subscribes; resubscribed after every reconnect until unsubscribed.
   * @param {string} channel
   * @param {object} [opts] {last, onMessage, onGap, onJoin, onLeave, onUnsubscribed, onError}
   * @returns {Subscription}
   */
  subscribe(channel, opts = {}) {
    if (this._closed) throw new HubError("closed", "client closed");
    const old = this._subs.get(channel);
    if (old) {
      throw new HubError("bad_request", `already subscribed to ${channel}: unsubscribe first`);
    }
    const sub = new Subscription(this, channel, opts, false);
    const stored = this._loadPosition(channel);
    if (stored) sub.position = stored;
    this._subs.set(channel, sub);
    if (this.state === "connected") this._sendSubscribe(sub);
    return sub;
  }

  /**
   * Publishes; resolves on the ack: {offset, epoch} on a history channel, else undefined.
   * @param {string} channel
   * @param {*} data any JSON value
   * @param {{idempotencyKey?: string}} [opts]
   */
  publish(channel, data, opts = {}) {
    const frame = { op: "publish", channel, data };
    if (opts.idempotencyKey !== undefined) frame.idempotency_key = opts.idempotencyKey;
    return this._request(frame, (reply) =>
      reply.offset !== undefined ? { offset: reply.offset, epoch: reply.epoch } : undefined);
  }

  /**
   * Reads a history channel: {offset, epoch, messages: [{offset, data, from?}]}.
   * @param {string} channel
   * @param {{limit?: number, since?: {offset: number, epoch: string}}} [opts]
   */
  history(channel, opts = {}) {
    const frame = { op: "history", channel };
    if (opts.limit !== undefined) frame.limit = opts.limit;
    if (opts.since !== undefined) frame.since = opts.since;
    return this._request(frame, (r) => ({ offset: r.offset, epoch: r.epoch, messages: r.messages }));
  }

  /** The connections subscribed to a presence channel: [{client, user}]. */
  presence(channel) {
    return this._request({ op: "presence", channel }, (r) => r.clients);
  }

  /** Counts of a presence channel: {clients, users}. */
  presenceStats(channel) {
    return this._request({ op: "presence_stats", channel },
      (r) => ({ clients: r.clients, users: r.users }));
  }

  /** Stops for good: closes the socket, clears every timer, rejects what is pending. */
  close() {
    if (this._closed) return;
    this._stop(new HubError("closed", "client closed"), { code: 1000, reason: "client closed" });
  }

  // ---- connection -------------------------------------------------------------------------

  _timer(fn, ms) {
    const t = setTimeout(() => {
      this._timers.delete(t);
      fn();
    }, ms);
    this._timers.add(t);
    return t;
  }

  _clearTimer(t) {
    if (t) {
      clearTimeout(t);
      this._timers.delete(t);
    }
  }

  _setState(state, info = {}) {
    this.state = state;
    try {
      this._onState(state, info);
    } catch (e) {
      console.error("hub: onState threw", e);
    }
  }

  _event(info) {
    // an "error" event through onState: not a state (client.state does not change)
    try {
      this._onState("error", info);
    } catch (e) {
      console.error("hub: onState threw", e);
    }
  }

  async _open() {
    if (this._closed) return;
    if (!this._started) {
      this._started = true;
      this._setState("connecting", { url: this._urls[this._urlIndex] });
    }
    let token = null;
    if (this._getToken && (this._everConnected || this._tokenUsed || this._token === null)) {
      try {
        token = await this._getToken();
      } catch (e) {
        if (this._closed) return;
        this._failed({ code: 1006, reason: "getToken failed", error: e });
        return;
      }
      if (this._closed) return;
    } else {
      token = this._token;
    }
    this._tokenUsed = true;
    this._currentToken = token;
    const url = this._urls[this._urlIndex];
    let ws;
    try {
      ws = new this._WS(url);
    } catch (e) {
      this._failed({ code: 1006, reason: "WebSocket constructor failed", error: e });
      return;
    }
    this._ws = ws;
    let authed = false;
    const openTimer = this._timer(() => {
      if (this._ws === ws) this._drop(ws, 1006, "connect timeout");
    }, this._connectTimeout);

    const connected = (ack) => {
      this._clearTimer(openTimer);
      authed = true;
      this._onConnected(ws, ack);
    };
    ws.onopen = () => {
      if (this._ws !== ws) return;
      if (token !== null && token !== undefined) {
        this._connectId = this._nextId++;
        this._rawSend(ws, { op: "connect", token, id: this._connectId });
      } else {
        connected(null);
      }
    };
    ws.onmessage = (event) => {
      if (this._ws !== ws) return;
      let frame;
      try {
        const text = typeof event.data === "string" ? event.data : new TextDecoder().decode(event.data);
        frame = JSON.parse(text);
      } catch {
        console.warn("hub: a frame that is not JSON was ignored");
        return;
      }
      if (!authed) {
        if (frame && frame.id === this._connectId && (frame.type === "ack" || frame.type === "error")) {
          if (frame.type === "error") {
            // "authentication is off" or "already authenticated": the connection is usable
            console.warn(`hub: connect refused (${frame.code}: ${frame.message}); going on ` +
              "without in-band authentication");
            connected(null);
          } else {
            connected(frame);
          }
        }
        return; // anything before the ack (an error frame before 1011) is not ours yet
      }
      this._lastFrameAt = Date.now();
      this._handleFrame(frame);
    };
    ws.onerror = (event) => {
      if (this._ws === ws) this._lastError = event && (event.error || event.message);
    };
    ws.onclose = (event) => {
      this._clearTimer(openTimer);
      if (this._ws !== ws) return;
      this._closedSocket(ws, event.code || 1006, event.reason || "", authed);
    };
  }

  _rawSend(ws, frame) {
    try {
      ws.send(JSON.stringify(frame));
      return true;
    } catch {
      return false;
    }
  }

  _drop(ws, code, reason) {
    // Give up on a socket ourselves (timeouts): as if it closed with `code`.
    try {
      ws.close(1000, reason);
    } catch {
      // closing a CONNECTING socket may throw in some implementations
    }
    this._closedSocket(ws, code, reason, this.state === "connected");
  }

  _onConnected(ws, ack) {
    this._connectedAt = Date.now();
    this._lastFrameAt = this._connectedAt;
    this._failures = 0;
    this._everConnected = true;
    this._slow = false;
    this.clientId = ack ? ack.client ?? null : null;
    this.user = ack ? ack.user ?? null : null;
    this._scheduleRefresh(ack && typeof ack.exp === "number" ? ack.exp : null);
    this._schedulePing(ws);
    this._setState("connected", { url: this._urls[this._urlIndex], client: this.clientId,
      user: this.user });
    for (const sub of this._subs.values()) {
      sub.state = "subscribing";
      this._sendSubscribe(sub);
    }
    const queued = this._queue;
    this._queue = [];
    for (const id of queued) this._sendPending(id);
    const waiters = this._waiters;
    this._waiters = [];
    for (const w of waiters) w.resolve();
  }

  _schedulePing(ws) {
    if (!this._pingInterval) return;
    this._clearTimer(this._pingTimer);
    this._pingTimer = this._timer(() => {
      this._pingTimer = null;
      if (this._ws !== ws || this.state !== "connected") return;
      if (Date.now() - this._lastFrameAt > this._pingInterval + this._connectTimeout) {
        this._drop(ws, 1006, "no answer to ping");
        return;
      }
      if (Date.now() - this._lastFrameAt >= this._pingInterval) {
        this._rawSend(ws, { op: "ping", id: this._nextId++ });
      }
      this._schedulePing(ws);
    }, Math.min(this._pingInterval, this._connectTimeout) / 2);
  }

  _scheduleRefresh(exp) {
    this._clearTimer(this._refreshTimer);
    this._refreshTimer = null;
    if (exp === null || !this._getToken) return;
    const remaining = exp * 1000 - Date.now();
    if (remaining <= 1000) return; // too late: 4001 then a reconnect with a fresh token
    // 30 s before exp, or half-way for short tokens (clocks of client and hub are assumed in sync)
    const delay = remaining > 60000 ? remaining - 30000 : remaining / 2;
    const ws = this._ws;
    this._refreshTimer = this._timer(() => this._refresh(ws, exp), delay);
  }

  async _refresh(ws, oldExp) {
    this._refreshTimer = null;
    let token;
    try {
      token = await this._getToken();
    } catch (e) {
      console.warn("hub: getToken failed for a refresh", e);
      if (this._ws === ws && !this._closed) this._scheduleRefresh(oldExp);
      return;
    }
    if (this._ws !== ws || this._closed || this.state !== "connected") return;
    try {
      await this._request({ op: "refresh", token }, noop);
      this._currentToken = token;
      if (this._ws === ws) this._scheduleRefresh(tokenExp(token));
    } catch (e) {
      if (this._closed) return;
      console.warn(`hub: refresh refused (${e.code}: ${e.message})`);
      if (this._ws === ws && !this._closed) this._scheduleRefresh(oldExp);
    }
  }

  _closedSocket(ws, code, reason, wasConnected) {
    if (this._ws !== ws) return;
    this._ws = null;
    ws.onopen = ws.onmessage = ws.onclose = noop;
    ws.onerror = noop; // `ws` throws on an "error" event without a listener
    this._clearTimer(this._refreshTimer);
    this._clearTimer(this._pingTimer);
    this._refreshTimer = this._pingTimer = null;
    this._subAcks.clear();
    // requests on the wire lost their reply
    for (const [id, p] of this._pending) {
      if (p.sent) {
        this._settle(id, new HubError("disconnected",
          `connection lost (close ${code}) before the reply`, { closeCode: code, reason }));
      }
    }
    const action = closeAction(code);
    const info = { code, reason };
    if (this._lastError) info.error = this._lastError;
    this._lastError = null;
    if (action === "stop") {
      this._stop(new HubError("closed", `closed by the hub: ${code} ${reason}`.trim(),
        { closeCode: code, reason }), info);
      return;
    }
    if (action === "token" && !this._getToken) {
      this._stop(new HubError("token_expired",
        "token expired (close 4001) and no getToken to get a fresh one",
        { closeCode: code, reason }), info);
      return;
    }
    if (wasConnected && Date.now() - this._connectedAt >= STABLE_MS) this._attempt = 0;
    this._slow = action === "slow";
    if (wasConnected) {
      this._reconnect("reconnecting", info);
    } else {
      this._failed(info);
    }
  }

  _failed(info) {
    this._failures += 1;
    const state = this._failures >= this._cannotConnectAfter ? "cannot_connect"
      : this._everConnected ? "reconnecting" : "connecting";
    this._reconnect(state, { ...info, failures: this._failures });
  }

  _reconnect(state, info) {
    if (this._closed) return;
    if (this._urls.length > 1) this._urlIndex = (this._urlIndex + 1) % this._urls.length;
    for (const sub of this._subs.values()) {
      if (sub.state === "subscribed") sub.state = "subscribing";
    }
    const capped = state === "cannot_connect";
    const delay = capped
      ? Math.floor(this._random() * this._maxDelay)
      : backoffDelay(this._attempt, { minDelay: this._minDelay, maxDelay: this._maxDelay,
        factor: this._slow ? SLOW_FACTOR : 1, random: this._random });
    this._attempt += 1;
    this._setState(state, { ...info, delay });
    this._timer(() => this._open(), delay);
  }

  _stop(error, info) {
    this._closed = true;
    this._closeError = error;
    for (const t of this._timers) clearTimeout(t);
    this._timers.clear();
    this._refreshTimer = this._pingTimer = null;
    const ws = this._ws;
    this._ws = null;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = noop;
      ws.onerror = noop;
      try {
        ws.close(1000, "client closed");
      } catch {
        // a CONNECTING socket in some implementations
      }
    }
    for (const id of [...this._pending.keys()]) this._settle(id, error);
    this._queue = [];
    for (const sub of this._subs.values()) {
      if (!sub._acked) sub._reject(error);
    }
    const waiters = this._waiters;
    this._waiters = [];
    for (const w of waiters) w.reject(error);
    this._setState("closed", { ...info, error });
  }

  // ---- requests ---------------------------------------------------------------------------

  _request(frame, onReply) {
    if (this._closed) return Promise.reject(this._closeError || new HubError("closed", "client closed"));
    const id = this._nextId++;
    frame.id = id;
    return new Promise((resolve, reject) => {
      const timer = this._requestTimeout ? this._timer(() => {
        this._settle(id, new HubError("timeout", `no reply to ${frame.op} within ` +
          `${this._requestTimeout} ms`));
      }, this._requestTimeout) : null;
      this._pending.set(id, { resolve, reject, timer, frame, sent: false, onReply });
      if (this.state === "connected") this._sendPending(id);
      else this._queue.push(id);
    });
  }

  _sendPending(id) {
    const p = this._pending.get(id);
    if (!p) return;
    if (this._ws && this.state === "connected" && this._rawSend(this._ws, p.frame)) p.sent = true;
    else this._queue.push(id);
  }

  _settle(id, error, reply) {
    const p = this._pending.get(id);
    if (!p) return false;
    this._pending.delete(id);
    this._clearTimer(p.timer);
    if (error) p.reject(error);
    else {
      try {
        p.resolve(p.onReply(reply));
      } catch (e) {
        p.reject(e);
      }
    }
    return true;
  }

  // ---- subscriptions ----------------------------------------------------------------------

  _sendSubscribe(sub) {
    const frame = { op: "subscribe", channel: sub.channel, id: this._nextId++ };
    if (sub.position) frame.since = { offset: sub.position.offset, epoch: sub.position.epoch };
    if (sub.last !== undefined) frame.last = sub.last;
    sub._subscribeId = frame.id;
    sub._sentSince = frame.since || null;
    this._subAcks.set(frame.id, sub);
    this._rawSend(this._ws, frame);
  }

  _unsubscribe(sub) {
    if (sub.state === "unsubscribed") return Promise.resolve();
    this._endSub(sub);
    if (!sub._acked) sub._reject(new HubError("unsubscribed", `unsubscribed from ${sub.channel}`));
    if (this.state !== "connected" || this._closed) return Promise.resolve();
    return this._request({ op: "unsubscribe", channel: sub.channel }, noop).catch(noop);
  }

  _endSub(sub) {
    sub.state = "unsubscribed";
    if (this._subs.get(sub.channel) === sub) this._subs.delete(sub.channel);
    this._removePosition(sub.channel);
  }

  _subAck(sub, frame) {
    if (sub.state === "unsubscribed" || this._subs.get(sub.channel) !== sub) return;
    sub.state = "subscribed";
    const first = !sub._acked;
    sub._acked = true;
    const hasPosition = typeof frame.offset === "number" && typeof frame.epoch === "string";
    if (hasPosition) {
      const since = sub._sentSince;
      if (since && frame.recovered === true) {
        // messages after since.offset follow: the position stays
      } else if (since && frame.epoch === since.epoch) {
        // not recovered, same epoch: what the history still holds after since follows
        this._gap(sub, { channel: sub.channel, from: since.offset + 1, epoch: frame.epoch,
          reason: "not_recovered" });
      } else if (since) {
        // another epoch: the history was lost; continue in the new one
        sub.position = { offset: sub.last ? Math.max(0, frame.offset - sub.last) : frame.offset,
          epoch: frame.epoch };
        this._gap(sub, { channel: sub.channel, epoch: frame.epoch, reason: "not_recovered" });
      } else {
        sub.position = { offset: sub.last ? Math.max(0, frame.offset - sub.last) : frame.offset,
          epoch: frame.epoch };
      }
      this._savePosition(sub);
    }
    if (first) {
      sub._resolve(hasPosition
        ? { offset: frame.offset, epoch: frame.epoch, recovered: frame.recovered }
        : {});
    }
  }

  _subError(sub, frame) {
    if (sub.state === "unsubscribed" || this._subs.get(sub.channel) !== sub) return;
    const error = new HubError(frame.code, frame.message, { channel: sub.channel });
    if (frame.code === "no_history" && sub._sentSince && sub.last === undefined) {
      // a stored position of a channel that no longer keeps history: plain subscribe
      sub.position = null;
      this._removePosition(sub.channel);
      if (this.state === "connected") this._sendSubscribe(sub);
      return;
    }
    if (TRANSIENT.has(frame.code)) {
      const t = this._timer(() => {
        if (this._subs.get(sub.channel) === sub && this.state === "connected" &&
            sub.state === "subscribing") this._sendSubscribe(sub);
      }, backoffDelay(2, { minDelay: this._minDelay, maxDelay: this._maxDelay,
        random: this._random }) + this._minDelay);
      void t;
      return;
    }
    this._endSub(sub);
    if (!sub._acked) sub._reject(error);
    if (sub.onError) this._call(sub.onError, error);
    else if (sub._acked) console.error(`hub: resubscribe to ${sub.channel} failed: ${frame.code}`);
  }

  _call(fn, arg) {
    try {
      fn(arg);
    } catch (e) {
      console.error("hub: a callback threw", e);
    }
  }

  _gap(sub, gap) {
    if (sub.onGap) {
      this._call(sub.onGap, gap);
      return;
    }
    console.error(`hub: messages of ${gap.channel} were lost (${gap.reason}` +
      `${gap.from != null ? ` from ${gap.from}` : ""}${gap.to != null ? ` to ${gap.to}` : ""}` +
      "); pass onGap to subscribe() to handle it");
    this._event({ channel: gap.channel, gap,
      error: new HubError("gap", `messages of ${gap.channel} were lost`, { channel: gap.channel, gap }) });
  }

  // ---- frames -----------------------------------------------------------------------------

  /**
   * Handles one server frame (a parsed JSON object). Returns false for a frame it does not
   * know (ignored: newer hubs may send more).
   */
  _handleFrame(frame) {
    if (!frame || typeof frame !== "object") return false;
    switch (frame.type) {
      case "message": return this._onMessageFrame(frame);
      case "ack":
      case "history":
      case "presence":
      case "presence_stats":
      case "pong":
      case "error": return this._onReply(frame);
      case "join":
      case "leave": {
        const sub = this._subs.get(frame.channel);
        const fn = sub && (frame.type === "join" ? sub.onJoin : sub.onLeave);
        if (fn) this._call(fn, { channel: frame.channel, client: frame.client, user: frame.user ?? null });
        return true;
      }
      case "gap": return this._onGapFrame(frame);
      case "subscribed": return this._onSubscribedFrame(frame);
      case "unsubscribed": {
        const sub = this._subs.get(frame.channel);
        if (!sub) return true;
        this._endSub(sub);
        if (!sub._acked) sub._reject(new HubError("unsubscribed", `unsubscribed by the hub: ${frame.reason}`));
        const info = { channel: frame.channel, reason: frame.reason };
        if (sub.onUnsubscribed) this._call(sub.onUnsubscribed, info);
        return true;
      }
      default: return false;
    }
  }

  _onMessageFrame(frame) {
    const sub = this._subs.get(frame.channel);
    const m = { channel: frame.channel, data: frame.data };
    if (typeof frame.offset === "number") m.offset = frame.offset;
    if (frame.from !== undefined) m.from = frame.from;
    if (sub && m.offset !== undefined && sub.position) {
      if (m.offset <= sub.position.offset) return true; // a duplicate (replay after a reconnect)
      sub.position = { offset: m.offset, epoch: sub.position.epoch };
      this._savePosition(sub);
    }
    const fn = sub ? sub.onMessage : this._onMessage;
    if (fn) this._call(fn, m);
    return true;
  }

  _onReply(frame) {
    const id = frame.id;
    if (id === null || id === undefined) {
      if (frame.type === "error") {
        const error = new HubError(frame.code, frame.message);
        console.warn(`hub: error from the hub: ${frame.code}: ${frame.message}`);
        this._event({ error });
      }
      return true;
    }
    const sub = this._subAcks.get(id);
    if (sub) {
      this._subAcks.delete(id);
      if (frame.type === "error") this._subError(sub, frame);
      else this._subAck(sub, frame);
      return true;
    }
    if (frame.type === "error") {
      this._settle(id, new HubError(frame.code, frame.message));
    } else {
      this._settle(id, null, frame);
    }
    return true;
  }

  _onGapFrame(frame) {
    const channels = Array.isArray(frame.channels) ? frame.channels : [];
    for (const channel of channels) {
      const sub = this._subs.get(channel);
      if (!sub) continue;
      const gap = { channel, reason: "gap" };
      if (frame.from !== undefined) gap.from = frame.from;
      if (frame.to !== undefined) gap.to = frame.to;
      if (frame.epoch !== undefined) gap.epoch = frame.epoch;
      if (sub.position && typeof frame.epoch === "string") {
        // messages after the lost range are delivered: move past it
        let offset = sub.position.epoch === frame.epoch ? sub.position.offset : 0;
        if (typeof frame.to === "number") offset = Math.max(offset, frame.to);
        else if (typeof frame.from === "number" && sub.position.epoch !== frame.epoch) {
          offset = frame.from - 1;
        }
        sub.position = { offset, epoch: frame.epoch };
        this._savePosition(sub);
      }
      this._gap(sub, gap);
    }
    return true;
  }

  _onSubscribedFrame(frame) {
    const channel = frame.channel;
    let sub = this._subs.get(channel);
    const created = !sub;
    if (!sub) {
      sub = new Subscription(this, channel, {}, true);
      this._subs.set(channel, sub);
    }
    sub.state = "subscribed";
    if (typeof frame.offset === "number" && typeof frame.epoch === "string" && !sub.position) {
      sub.position = { offset: frame.offset, epoch: frame.epoch };
      this._savePosition(sub);
    }
    if (!sub._acked) {
      sub._acked = true;
      sub._resolve(sub.position ? { offset: frame.offset, epoch: frame.epoch } : {});
    }
    if (created) {
      if (this._onSubscribed) this._call(this._onSubscribed, sub);
      else console.warn(`hub: the hub subscribed this connection to ${channel}; ` +
        "pass onSubscribed to handle its messages");
    }
    return true;
  }

  // ---- storage ----------------------------------------------------------------------------

  _loadPosition(channel) {
    if (!this._storage) return null;
    try {
      const raw = this._storage.getItem(`hub:pos:${channel}`);
      if (!raw) return null;
      const p = JSON.parse(raw);
      if (p && Number.isInteger(p.offset) && p.offset >= 0 && typeof p.epoch === "string") {
        return { offset: p.offset, epoch: p.epoch };
      }
    } catch {
      // unreadable or corrupt: start fresh
    }
    return null;
  }

  _savePosition(sub) {
    if (!this._storage || !sub.position) return;
    try {
      this._storage.setItem(`hub:pos:${sub.channel}`, JSON.stringify(sub.position));
    } catch {
      // a full or forbidden storage: recovery across reloads is lost, nothing else
    }
  }

  _removePosition(channel) {
    if (!this._storage) return;
    try {
      this._storage.removeItem(`hub:pos:${channel}`);
    } catch {
      // as above
    }
  }
}
