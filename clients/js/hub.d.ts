// Type declarations of hub.js, the browser and Node client of hub (docs/protocol.md).

/** Error codes of the protocol's error frames (docs/protocol.md section 3, "Errors"). */
export type ProtocolErrorCode =
  | "bad_request" | "bad_channel" | "forbidden" | "limit_exceeded" | "rate_limited"
  | "unavailable" | "unauthorized" | "no_history" | "no_presence";

/**
 * Error codes of the client itself:
 * "disconnected" (the connection was lost before the reply: a publish may have been applied),
 * "timeout" (no reply within requestTimeout), "closed" (the client is closed; closeCode set
 * when a close code stopped it), "token_expired" (close 4001 and no getToken),
 * "unsubscribed" (the subscription ended before its first ack), "gap" (messages were lost).
 */
export type ClientErrorCode =
  | "disconnected" | "timeout" | "closed" | "token_expired" | "unsubscribed" | "gap";

export declare const PROTOCOL_ERROR_CODES: readonly ProtocolErrorCode[];
export declare const CLIENT_ERROR_CODES: readonly ClientErrorCode[];

/** Rejects publish/history/presence promises and sub.ready; given in state events. */
export declare class HubError extends Error {
  constructor(code: ProtocolErrorCode | ClientErrorCode | string, message?: string,
    extra?: { closeCode?: number; reason?: string; channel?: string; gap?: Gap });
  readonly name: "HubError";
  /** a ProtocolErrorCode (an error frame of the hub) or a ClientErrorCode */
  readonly code: ProtocolErrorCode | ClientErrorCode | string;
  /** the WebSocket close code when a close caused the error */
  readonly closeCode?: number;
  /** the close reason when a close caused the error */
  readonly reason?: string;
  /** the channel, for subscription errors and gaps */
  readonly channel?: string;
  /** for code "gap": what was lost */
  readonly gap?: Gap;
}

/** A position in a history channel: offset (1, 2, 3 ...) within an epoch. */
export interface Position {
  offset: number;
  epoch: string;
}

/** Who sent a client publish (absent for backend publishes). */
export interface From {
  /** null for an anonymous connection */
  user: string | null;
  /** the sender's connection id */
  client: string;
}

/** One delivery. */
export interface Message {
  channel: string;
  data: unknown;
  /** on history channels */
  offset?: number;
  /** on client publishes */
  from?: From;
}

/**
 * Messages were lost. reason "not_recovered": a resubscribe (after a reconnect or a reload)
 * got recovered:false (reload the state from the application); "gap": a gap frame of the hub.
 */
export interface Gap {
  channel: string;
  /** first lost offset, when known (null: unknown start) */
  from?: number | null;
  /** last lost offset, when known (null: unknown end) */
  to?: number | null;
  /** the channel's current epoch (history channels) */
  epoch?: string;
  reason: "not_recovered" | "gap";
}

/** A presence entry, a join or a leave. */
export interface PresenceEntry {
  client: string;
  user: string | null;
}

export interface JoinLeave extends PresenceEntry {
  channel: string;
}

export interface Unsubscribed {
  channel: string;
  /** "server" (HTTP API / Publisher.unsubscribe), "revoked" (a refresh took the grant away) */
  reason: string;
}

export type HubState = "connecting" | "connected" | "reconnecting" | "cannot_connect" | "closed";

/**
 * What comes with a state event. code/reason: the close that caused it; delay: ms until the
 * next attempt; failures: failed attempts in a row; error: why (a HubError for "closed" and
 * "error" events, or the socket's error); url/client/user on "connected"; channel/gap on an
 * "error" event for an unhandled gap.
 */
export interface StateInfo {
  code?: number;
  reason?: string;
  delay?: number;
  failures?: number;
  error?: HubError | unknown;
  url?: string;
  client?: string | null;
  user?: string | null;
  channel?: string;
  gap?: Gap;
}

/** A Storage-like object (sessionStorage, localStorage, or your own). */
export interface StorageLike {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
  removeItem(key: string): void;
}

/** A WHATWG-style WebSocket constructor (the browser's, Node 22's, or the `ws` package's). */
export type WebSocketConstructor = new (url: string) => {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((event: unknown) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
  onerror: ((event: unknown) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
};

export interface HubClientOptions {
  /** sent in-band as {"op":"connect","token":...} (never in the URL) */
  token?: string;
  /** gives a token for each connect (after the first when `token` is given), for the
   *  refresh before exp, and after close 4001 */
  getToken?: () => string | Promise<string>;
  /** default globalThis.WebSocket (in Node 20: `import WebSocket from "ws"`) */
  WebSocket?: WebSocketConstructor;
  /** where history positions are kept (keys "hub:pos:<channel>"); default
   *  globalThis.sessionStorage when present; null disables */
  storage?: StorageLike | null;
  /** first backoff delay, ms (default 250) */
  minDelay?: number;
  /** backoff cap, ms (default 10000) */
  maxDelay?: number;
  /** failed attempts in a row before state "cannot_connect" (default 5); it keeps trying */
  cannotConnectAfter?: number;
  /** ms a publish/history/presence call may wait for its reply, connection included
   *  (default 15000; 0: no limit) */
  requestTimeout?: number;
  /** ms for the WebSocket handshake plus the connect ack (default 10000) */
  connectTimeout?: number;
  /** ms of silence after which the client sends a ping; no frame within connectTimeout
   *  more closes the connection and reconnects (default 25000; 0 disables) */
  pingInterval?: number;
  /** state changes, and "error" events (not a state: client.state does not change) */
  onState?: (state: HubState | "error", info: StateInfo) => void;
  /** the hub subscribed this connection (a `subscribed` frame): set the handlers on `sub` */
  onSubscribed?: (sub: Subscription) => void;
  /** messages of channels without a subscription (the personal channel user:<id>) */
  onMessage?: (m: Message) => void;
  /** a random number in [0, 1) for the jitter (default Math.random) */
  random?: () => number;
}

export interface SubscribeOptions {
  /** backlog of a history channel: the last N messages (1-1000) after the first ack */
  last?: number;
  onMessage?: (m: Message) => void;
  /** messages were lost; without it: console.error and an "error" state event */
  onGap?: (g: Gap) => void;
  onJoin?: (p: JoinLeave) => void;
  onLeave?: (p: JoinLeave) => void;
  /** the server ended the subscription */
  onUnsubscribed?: (u: Unsubscribed) => void;
  /** a resubscribe (or a subscribe) failed for good: forbidden, bad_channel, ... */
  onError?: (e: HubError) => void;
}

/** What sub.ready resolves to: the position on a history channel, else {}. */
export interface SubscribeResult {
  offset?: number;
  epoch?: string;
  /** on a subscribe with since: whether every missed message follows */
  recovered?: boolean;
}

export declare class Subscription {
  readonly channel: string;
  readonly state: "subscribing" | "subscribed" | "unsubscribed";
  /** true when the hub made it (a `subscribed` frame) */
  readonly serverSide: boolean;
  /** the position of the last message delivered (history channels), else null */
  readonly position: Position | null;
  /** resolves on the first ack; rejects with a HubError (forbidden, no_history, ...) */
  readonly ready: Promise<SubscribeResult>;
  onMessage: ((m: Message) => void) | null;
  onGap: ((g: Gap) => void) | null;
  onJoin: ((p: JoinLeave) => void) | null;
  onLeave: ((p: JoinLeave) => void) | null;
  onUnsubscribed: ((u: Unsubscribed) => void) | null;
  onError: ((e: HubError) => void) | null;
  /** ends it; resolves on the hub's ack (at once when not connected); never rejects */
  unsubscribe(): Promise<void>;
}

export interface HistoryMessage {
  offset: number;
  data: unknown;
  from?: From;
}

export interface HistoryResult {
  offset: number;
  epoch: string;
  messages: HistoryMessage[];
}

export declare class HubClient {
  /** starts connecting at once (on the next tick) */
  constructor(urlOrUrls: string | string[], options?: HubClientOptions);
  readonly state: HubState;
  /** the connection id of the connect ack; null before it or without authentication */
  readonly clientId: string | null;
  /** the user id of the connect ack; null before it or without authentication */
  readonly user: string | null;
  /** resolves once connected (and authenticated); rejects with a HubError once closed */
  connect(): Promise<void>;
  /** throws HubError "bad_request" when already subscribed to the channel, "closed" after close() */
  subscribe(channel: string, options?: SubscribeOptions): Subscription;
  /** resolves on the ack: the position on a history channel, else undefined */
  publish(channel: string, data: unknown, options?: { idempotencyKey?: string }): Promise<Position | undefined>;
  history(channel: string, options?: { limit?: number; since?: Position }): Promise<HistoryResult>;
  presence(channel: string): Promise<PresenceEntry[]>;
  presenceStats(channel: string): Promise<{ clients: number; users: number }>;
  /** stops for good: no reconnect, no timer left, pending calls rejected with "closed" */
  close(): void;
}

/** What the client does after a close code: the close-code policy. */
export declare function closeAction(code: number): "reconnect" | "slow" | "token" | "stop";

/** A backoff delay in ms: random in [0, min(maxDelay, minDelay * 2^attempt * factor)]. */
export declare function backoffDelay(attempt: number, options?: {
  minDelay?: number; maxDelay?: number; factor?: number; random?: () => number;
}): number;
