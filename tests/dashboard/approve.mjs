// Approves a held tool call from the dashboard's humans page, in Debian's
// chromium (headless, through playwright-core). Run by test_approvals.py:
//
//   node approve.mjs --url http://127.0.0.1:PORT --token T
//
// It signs in, opens /humans, prints {"step": "ready"} (the test then starts
// a run whose tool call needs approval), waits for the approval to be pushed
// to the open page, reads what it shows, clicks Approve, waits until it is
// gone, and prints one JSON summary line before it exits 0. Any failure exits
// 1 with the reason on stderr.

import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { parseArgs } from "node:util";

import { chromium } from "playwright-core";

const { values: opts } = parseArgs({
  options: {
    url: { type: "string" },
    token: { type: "string" },
    reason: { type: "string", default: "" },
  },
});

const WAIT = 60_000;

function emit(value) {
  process.stdout.write(JSON.stringify(value) + "\n");
}

async function live(page) {
  await page.waitForFunction(
    () => document.getElementById("connection")?.dataset.state === "live",
    null,
    { timeout: WAIT },
  );
}

async function approve(context) {
  const page = await context.newPage();
  await page.goto(`${opts.url}/login`);
  await page.fill('input[name="token"]', opts.token);
  await Promise.all([page.waitForURL(`${opts.url}/`), page.click('button[type="submit"]')]);
  await page.goto(`${opts.url}/humans`);
  await live(page);
  emit({ step: "ready" });

  // Pushed to the open page, not reloaded.
  await page.evaluate(() => {
    window.__notReloaded = true;
  });
  const held = page.locator("section.approval");
  await held.waitFor({ timeout: WAIT });
  const field = async (name) => (await held.locator(`[data-field="${name}"]`).textContent()) ?? "";
  const shown = {
    call: await field("call"),
    args: await field("args"),
    approvers: await field("approvers"),
    agent: await field("agent"),
    not_reloaded: await page.evaluate(() => window.__notReloaded === true),
  };
  if (opts.reason) {
    await page.fill('section.approval input[name="reason"]', opts.reason);
  }
  await Promise.all([
    page.waitForURL(`${opts.url}/humans`),
    page.click('section.approval button[value="approve"]'),
  ]);
  await page.locator("section.approval").waitFor({ state: "detached", timeout: WAIT });
  shown.pending_after = (await page.locator('nav [data-key="humans"]').textContent()) ?? "";
  return shown;
}

const profile = mkdtempSync(path.join(tmpdir(), "legion-chromium-"));
let context;
try {
  context = await chromium.launchPersistentContext(profile, {
    executablePath: "/usr/bin/chromium",
    headless: true,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
  emit({ step: "done", summary: await approve(context) });
} catch (error) {
  process.stderr.write(`approve.mjs: ${error.stack || error}\n`);
  process.exitCode = 1;
} finally {
  await context?.close();
  rmSync(profile, { recursive: true, force: true });
}
