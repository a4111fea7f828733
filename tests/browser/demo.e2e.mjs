// The browser half of tests/system/test_demo_browser.py: drives Debian's chromium
// (/usr/bin/chromium, never a downloaded browser) with playwright-core, for pytest, which
// runs the hub processes and the scenarios.
//
//   node tests/browser/demo.e2e.mjs      (cwd anywhere; pytest starts it)
//
// It reads one JSON command per line on stdin and writes one JSON reply per line on stdout,
// {"id": <the command's id>, "ok": true, "value": ...} or {"id": ..., "ok": false, "error": "..."}:
//
//   {"op": "open", "page": "a", "url": "http://..."}   a new tab (its own sessionStorage)
//                                                       named "a", at url
//   {"op": "eval", "page": "a", "expr": "js"}          the value of a JS expression in the page
//   {"op": "wait", "page": "a", "expr": "js", "ms": 10000}   until it is truthy; its value
//   {"op": "fill", "page": "a", "selector": "#text", "value": "hi"}
//   {"op": "click", "page": "a", "selector": "#send-button"}
//   {"op": "reload", "page": "a"}
//   {"op": "screenshot", "page": "a", "path": "/tmp/x.png"}
//   {"op": "log", "page": "a"}                         the page's console lines and errors
//   {"op": "quit"}                                     closes the browser and exits 0
//
// The browser runs headless with a fresh user-data-dir that is removed on quit; stdin
// closing also quits.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

const ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync"];

const profile = mkdtempSync(join(tmpdir(), "hub-demo-chromium-"));
// a persistent context is playwright's way to give chromium a user-data-dir of our own
// (--user-data-dir in args is refused); every page is a tab of it
const root = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.HUB_CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ARGS,
  viewport: { width: 1000, height: 640 },
});
const pages = new Map();   // name -> {page, log: []}

function entry(name) {
  const e = pages.get(name);
  if (!e) throw new Error(`no page ${name}`);
  return e;
}

async function open(name, url) {
  const page = await root.newPage();
  const log = [];
  page.on("console", (m) => log.push(`${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => log.push(`pageerror: ${e.message}`));
  pages.set(name, { page, log });
  await page.goto(url);
}

async function run(cmd) {
  switch (cmd.op) {
    case "open": return open(cmd.page, cmd.url);
    case "eval": return entry(cmd.page).page.evaluate(cmd.expr);
    case "wait": {
      const handle = await entry(cmd.page).page.waitForFunction(cmd.expr, null,
        { timeout: cmd.ms ?? 10000, polling: 50 });
      return handle.jsonValue();
    }
    case "fill": return entry(cmd.page).page.fill(cmd.selector, cmd.value);
    case "click": return entry(cmd.page).page.click(cmd.selector);
    case "reload": return entry(cmd.page).page.reload();
    case "screenshot": return entry(cmd.page).page.screenshot({ path: cmd.path });
    case "log": return entry(cmd.page).log;
    case "quit": return null;
    default: throw new Error(`unknown op ${cmd.op}`);
  }
}

async function quit(code) {
  try { await root.close(); } catch { /* already gone */ }
  rmSync(profile, { recursive: true, force: true });
  process.exit(code);
}

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  let cmd = {};
  try {
    cmd = JSON.parse(line);
    const value = await run(cmd);
    process.stdout.write(JSON.stringify({ id: cmd.id, ok: true, value: value ?? null }) + "\n");
  } catch (e) {
    process.stdout.write(JSON.stringify({ id: cmd.id, ok: false, error: String(e && e.stack || e) }) + "\n");
  }
  if (cmd.op === "quit") break;
}
await quit(0);
