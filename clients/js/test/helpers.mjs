// Test helpers: real `python -m hub serve` processes (and, when HUB_TEST_REDIS_URL is not
// set, a real redis-server) on free loopback ports, killed at the end even on failure.
import { spawn } from "node:child_process";
import { createHmac, randomBytes } from "node:crypto";
import { mkdtempSync, writeFileSync, readFileSync, openSync, closeSync } from "node:fs";
import * as net from "node:net";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { after } from "node:test";
import WebSocket from "ws";

export { WebSocket };
export const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..", "..");
export const PYTHON = process.env.HUB_PYTHON || "python3";
export const SECRET = "test-secret-test-secret-test-secret-0123";

const children = new Set();
const workdir = mkdtempSync(join(tmpdir(), "hub-js-test-"));

function killAll() {
  for (const child of children) {
    try {
      child.kill("SIGKILL");
    } catch {
      // already gone
    }
  }
  children.clear();
}
process.on("exit", killAll);
after(killAll);

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** A TCP port nothing listens on right now. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

/** Polls `check` (sync or async, truthy = done) every 50 ms, at most `timeout` ms. */
export async function until(check, what, timeout = 10000) {
  const end = Date.now() + timeout;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(50);
  }
}

let redisUrl = process.env.HUB_TEST_REDIS_URL || null;

/** The Redis URL of the tests: HUB_TEST_REDIS_URL, else a redis-server started here. */
export async function redis() {
  if (redisUrl) return redisUrl;
  const port = await freePort();
  const child = spawn("redis-server", ["--port", String(port), "--bind", "127.0.0.1",
    "--save", "", "--appendonly", "no", "--dir", workdir], { stdio: "ignore" });
  children.add(child);
  redisUrl = `redis://127.0.0.1:${port}/0`;
  await until(() => new Promise((res) => {
    const s = new net.Socket();
    s.once("error", () => res(false));
    s.connect(port, "127.0.0.1", () => { s.destroy(); res(true); });
  }), "redis-server");
  return redisUrl;
}

export const CONFIG = `client_publish = ["chat:*", "news", "private:*"]

[namespaces.chat]
history_size = 100
history_ttl = 600
presence = true
join_leave = true

[namespaces.user]
history_size = 50
history_ttl = 600
`;

/**
 * Starts `python -m hub serve --port <port> --redis-url <redis> --config <CONFIG> ...args`
 * and waits for GET /readyz 200. Returns {port, url, proc, log(), kill(signal), stopped}.
 */
export async function startHub({ args = [], port = null, config = CONFIG, ready = true } = {}) {
  port = port || await freePort();
  const cfg = join(workdir, `hub-${port}-${randomBytes(3).toString("hex")}.toml`);
  writeFileSync(cfg, config);
  const logPath = join(workdir, `hub-${port}-${Date.now()}.log`);
  const fd = openSync(logPath, "w");
  const env = { ...process.env };
  for (const k of Object.keys(env)) if (k.startsWith("HUB_")) delete env[k];
  env.PYTHONPATH = ROOT + (process.env.PYTHONPATH ? `:${process.env.PYTHONPATH}` : "");
  const proc = spawn(PYTHON, ["-m", "hub", "serve", "--port", String(port), "--redis-url",
    await redis(), "--config", cfg, ...args], { cwd: ROOT, env, stdio: ["ignore", fd, fd] });
  closeSync(fd);
  children.add(proc);
  const hub = {
    port, proc,
    url: `ws://127.0.0.1:${port}/ws`,
    log: () => readFileSync(logPath, "utf8"),
    exited: new Promise((res) => proc.once("exit", (code, signal) => {
      children.delete(proc);
      res({ code, signal });
    })),
    async kill(signal = "SIGTERM") {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill(signal);
      return hub.exited;
    },
  };
  if (ready) {
    try {
      await until(async () => {
        if (proc.exitCode !== null) throw new Error(`hub exited ${proc.exitCode}:\n${hub.log()}`);
        try {
          return (await fetch(`http://127.0.0.1:${port}/readyz`)).status === 200;
        } catch {
          return false;
        }
      }, `hub /readyz on ${port}`, 20000);
    } catch (e) {
      await hub.kill("SIGKILL");
      throw e;
    }
  }
  return hub;
}

/** An HS256 JWT for `sub`, with `exp` `ttl` seconds from now (null: none). */
export function token(sub, { ttl = 3600, channels } = {}) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  const claims = { sub };
  if (ttl !== null) claims.exp = Math.floor(Date.now() / 1000) + ttl;
  if (channels) claims.channels = channels;
  const head = `${b64({ alg: "HS256", typ: "JWT" })}.${b64(claims)}`;
  return `${head}.${createHmac("sha256", SECRET).update(head).digest("base64url")}`;
}

/** A unique channel name in a namespace. */
export function channel(ns) {
  return `${ns}${randomBytes(6).toString("hex")}`;
}

/** A Map-backed Storage (getItem/setItem/removeItem), as sessionStorage. */
export class MemoryStorage {
  constructor() { this.map = new Map(); }
  getItem(k) { return this.map.has(k) ? this.map.get(k) : null; }
  setItem(k, v) { this.map.set(k, String(v)); }
  removeItem(k) { this.map.delete(k); }
}

/** Records onState calls: {states: [[state, info]...], seen(state)}. */
export function stateRecorder() {
  const states = [];
  return {
    states,
    onState: (s, info) => states.push([s, info]),
    seen: (s) => states.some(([x]) => x === s),
    count: (s) => states.filter(([x]) => x === s).length,
  };
}

/** A WebSocket class that records every frame received (parsed) in `frames`. */
export function spyWebSocket(frames, extra = {}) {
  return class Spy extends WebSocket {
    constructor(url) {
      super(url, extra);
      this.addEventListener("message", (e) => frames.push(JSON.parse(String(e.data))));
    }
  };
}
