// Drives Debian's chromium (headless, through playwright-core) through the
// dashboard of a real `legion serve --dashboard`. Run by test_dashboard.py:
//
//   node browse.mjs --url http://127.0.0.1:PORT --token T --scenario live|hostile|streaming
//                   [--screenshots DIR] [--answer TEXT]
//
// It signs in, prints {"step": "ready"} once its pages are open and live (the
// test then starts a run through the gRPC API), follows what happens on the
// pages, and prints one JSON summary line before it exits 0. Any failure
// exits 1 with the reason on stderr.
//
// live:    a run of Editor (a sub-agent, then a human question) appears in the
//          tree without a reload, its sub-agent nested under it; the question
//          shows on /humans and is answered there; the tree sees the run
//          finish. Screenshots of every page go to --screenshots.
// hostile: a run whose model reply, code, output and question hold HTML and
//          script is shown as text on the live pages and the trace, and runs
//          nothing.
// streaming: a run's trace, opened while the model's reply streams in, shows
//          the reply growing until the model call is done.

import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { parseArgs } from "node:util";

import { chromium } from "playwright-core";

const { values: opts } = parseArgs({
  options: {
    url: { type: "string" },
    token: { type: "string" },
    scenario: { type: "string", default: "live" },
    screenshots: { type: "string", default: "" },
    answer: { type: "string", default: "yes, publish it" },
    payload: { type: "string", default: "" },
  },
});

const WAIT = 60_000;

function emit(value) {
  process.stdout.write(JSON.stringify(value) + "\n");
}

async function shoot(page, name) {
  if (opts.screenshots) {
    await page.screenshot({ path: path.join(opts.screenshots, `${name}.png`) });
  }
}

async function signIn(context) {
  const page = await context.newPage();
  await page.goto(`${opts.url}/login`);
  await page.fill('input[name="token"]', opts.token);
  await Promise.all([page.waitForURL(`${opts.url}/`), page.click('button[type="submit"]')]);
  await live(page);
  return page;
}

// The page's event stream is open: updates from here on reach it.
async function live(page) {
  await page.waitForFunction(
    () => document.getElementById("connection")?.dataset.state === "live",
    null,
    { timeout: WAIT },
  );
}

async function open(page, where) {
  await page.goto(`${opts.url}${where}`);
  await live(page);
}

// Marks the page; a reload would lose the mark.
async function mark(page) {
  await page.evaluate(() => {
    window.__notReloaded = true;
  });
}

async function stillSame(page) {
  return page.evaluate(() => window.__notReloaded === true);
}

// What an attack would leave behind: elements or globals it made.
async function injected(page) {
  return page.evaluate(() => ({
    pwned: typeof window.__pwned !== "undefined",
    images: document.querySelectorAll("img").length,
    scripts: Array.from(document.scripts).map((s) => s.getAttribute("src") || "inline"),
    bold: document.querySelectorAll("main b").length,
  }));
}

async function scenarioLive(context) {
  const tree = await signIn(context);
  await mark(tree);
  const side = await context.newPage();
  await open(side, "/humans");
  emit({ step: "ready" });

  // The parent run appears, then its sub-agent nested under it: pushed, not reloaded.
  const parent = tree.locator("ul.tree > li.run", {
    has: tree.locator(":scope > .row > .agent", { hasText: "Editor" }),
  });
  await parent.waitFor({ timeout: WAIT });
  const runId = await parent.getAttribute("data-key");
  const child = parent.locator(":scope > ul.children > li.run", {
    has: tree.locator(":scope > .row > .agent", { hasText: "Echo" }),
  });
  await child.waitFor({ timeout: WAIT });
  const childStateSeen = await child.getAttribute("data-status");

  // The question arrives on /humans (already open) and in the navigation.
  const question = side.locator("section.human");
  await question.waitFor({ timeout: WAIT });
  await tree.locator('nav [data-key="humans"]', { hasText: "1" }).waitFor({ timeout: WAIT });
  const asked = (await question.locator('[data-field="question"]').textContent()) ?? "";
  const parentWhileAsking = await parent.getAttribute("data-status");
  await shoot(tree, "tree");

  // Its sandbox, with limits and use, while the question waits.
  await open(side, "/sandboxes");
  const row = side.locator('tbody[data-list="sandboxes"] tr', {
    has: side.locator('[data-field="agent"]', { hasText: /^Editor$/ }),
  });
  await row.waitFor({ timeout: WAIT });
  const cells = {};
  for (const name of ["run", "memory", "peak", "memory_limit", "cpus", "pids", "cpu"]) {
    cells[name] = (await row.locator(`[data-field="${name}"]`).textContent()) ?? "";
  }
  await shoot(side, "sandboxes");

  // Answer it from the page.
  await open(side, "/humans");
  await shoot(side, "humans");
  await side.fill('section.human input[name="answer"]', opts.answer);
  await Promise.all([
    side.waitForURL(`${opts.url}/humans`),
    side.click('section.human button[type="submit"]'),
  ]);
  await side.locator("section.human").waitFor({ state: "detached", timeout: WAIT });

  // The tree, never reloaded, sees the run finish.
  await tree.locator(`ul.tree > li.run[data-key="${runId}"][data-status="finished"]`).waitFor({
    timeout: WAIT,
  });
  const notReloaded = await stillSame(tree);
  const pendingAfter = await tree.locator('nav [data-key="humans"]').textContent();

  // Its trace: model call, code, the tool calls with arguments and results.
  await Promise.all([tree.waitForURL(`**/runs/${runId}`), parent.locator(":scope > .row > .agent").click()]);
  await live(tree);
  const entries = await tree.locator("ol.trace > li.entry").evaluateAll((items) =>
    items.map((li) => ({
      kind: li.className.replace("entry", "").trim(),
      title: li.querySelector('[data-field="title"]')?.textContent ?? "",
      args: li.querySelector('[data-field="args"]')?.textContent ?? "",
      result: li.querySelector('[data-field="result"]')?.textContent ?? "",
      value: li.querySelector('[data-field="value"]')?.textContent ?? "",
      state: li.dataset.status,
    })),
  );
  const output = await tree.locator('.summary [data-field="output"]').textContent();
  await shoot(tree, "trace");

  // Every agent with its system prompt.
  await open(side, "/agents");
  const prompts = await side.locator("section.agent").evaluateAll((sections) =>
    Object.fromEntries(
      sections.map((s) => [s.querySelector("h2").textContent, s.querySelector("pre.prompt").textContent]),
    ),
  );
  await side.locator("section.agent details").first().evaluate((d) => {
    d.open = true;
  });
  await shoot(side, "agents");

  // A chat with a long-lived agent: the answer is pushed to the open page.
  await open(side, "/chat");
  await side.selectOption('select[name="agent"]', "Echo");
  await Promise.all([side.waitForURL(/\/chat\?c=/), side.click('form.start button[type="submit"]')]);
  await live(side);
  await side.fill('textarea[name="message"]', "hello from the chat box");
  await Promise.all([side.waitForURL(/\/chat\?c=/), side.click('form.send button[type="submit"]')]);
  await live(side);
  const reply = side.locator('li.message[data-status="agent"]');
  await reply.waitFor({ timeout: WAIT });
  const replied = await reply.locator('[data-field="text"]').textContent();
  await shoot(side, "chat");

  return {
    run_id: runId,
    child_state_seen: childStateSeen,
    parent_while_asking: parentWhileAsking,
    asked,
    sandbox: cells,
    not_reloaded: notReloaded,
    pending_after: pendingAfter,
    entries,
    output,
    prompts,
    chat_reply: replied,
  };
}

// streaming: the trace of a run whose model reply streams in slowly, opened
// while the reply still comes: the model call's reply grows on the page (every
// text it showed is noted) until the call is done.
async function scenarioStreaming(context) {
  const tree = await signIn(context);
  emit({ step: "ready" });
  const run = tree.locator("ul.tree > li.run");
  await run.first().waitFor({ timeout: WAIT });
  const runId = await run.first().getAttribute("data-key");
  const trace = await context.newPage();
  await open(trace, `/runs/${runId}`);
  const reply = trace.locator('li.entry.llm [data-field="reply"]').first();
  await reply.waitFor({ timeout: WAIT });
  await trace.evaluate(() => {
    const node = document.querySelector('li.entry.llm [data-field="reply"]');
    window.__replies = [node.textContent];
    const note = () => window.__replies.push(node.textContent);
    new MutationObserver(note).observe(node, { childList: true, characterData: true, subtree: true });
  });
  await trace.locator('li.entry.llm[data-status="done"]').first().waitFor({ timeout: WAIT });
  return {
    run_id: runId,
    replies: await trace.evaluate(() => window.__replies),
    final: await reply.textContent(),
  };
}

async function scenarioHostile(context) {
  const tree = await signIn(context);
  const side = await context.newPage();
  await open(side, "/humans");
  emit({ step: "ready" });

  // Live path: the question and the task arrive through the event stream.
  const question = side.locator("section.human");
  await question.waitFor({ timeout: WAIT });
  const liveQuestion = await question.locator('[data-field="question"]').textContent();
  // The session may show earlier runs of this principal: this one holds the payload.
  const run = tree.locator("ul.tree > li.run", {
    has: tree.locator(":scope > .row > .task", { hasText: "__pwned" }),
  });
  await run.waitFor({ timeout: WAIT });
  const runId = await run.getAttribute("data-key");
  const liveTask = await run.locator('[data-field="task"]').textContent();
  const afterLive = { humans: await injected(side), tree: await injected(tree) };

  await side.fill('section.human input[name="answer"]', opts.payload);
  await Promise.all([
    side.waitForURL(`${opts.url}/humans`),
    side.click('section.human button[type="submit"]'),
  ]);
  await tree.locator(`li.run[data-key="${runId}"][data-status="finished"]`).waitFor({ timeout: WAIT });

  // Server-rendered path: the trace page, loaded afresh.
  await open(tree, `/runs/${runId}`);
  const text = await tree.locator("main").innerText();
  const fields = await tree.locator("[data-field]").evaluateAll((els) =>
    els.map((el) => el.textContent).filter((t) => t),
  );
  return {
    run_id: runId,
    live_question: liveQuestion,
    live_task: liveTask,
    after_live: afterLive,
    trace_text: text,
    trace_fields: fields,
    after_trace: await injected(tree),
  };
}

const profile = mkdtempSync(path.join(tmpdir(), "legion-chromium-"));
let context;
try {
  context = await chromium.launchPersistentContext(profile, {
    executablePath: "/usr/bin/chromium",
    headless: true,
    viewport: { width: 1280, height: 860 },
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
  const scenarios = { live: scenarioLive, hostile: scenarioHostile, streaming: scenarioStreaming };
  const scenario = scenarios[opts.scenario];
  if (!scenario) {
    throw new Error(`unknown scenario ${opts.scenario}`);
  }
  emit({ step: "done", summary: await scenario(context) });
} catch (error) {
  process.stderr.write(`browse.mjs: ${error.stack || error}\n`);
  process.exitCode = 1;
} finally {
  await context?.close();
  rmSync(profile, { recursive: true, force: true });
}
