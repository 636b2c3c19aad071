// Drives the fluidcloud dashboard in Debian's Chromium through playwright-core.
// tests/ui.rs starts the service and runs this; every check throws on failure,
// and the last line of stdout is a JSON summary the Rust test checks again.
//
//   node dashboard.mjs dashboard   FC_URL FC_TOKEN FC_OUT FC_SECRETS
//   node dashboard.mjs report      FC_REPORT FC_STEPS FC_OUT FC_SECRETS
import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { chromium } from "playwright-core";

const env = (k) => {
  const v = process.env[k];
  assert.ok(v, `${k} is not set`);
  return v;
};
const OUT = env("FC_OUT");
const SECRETS = (process.env.FC_SECRETS || "").split(",").filter(Boolean);
const TIMEOUT = 120_000;
const summary = {};

async function launch() {
  return chromium.launch({
    executablePath: process.env.FC_CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: ["--no-sandbox", "--disable-dev-shm-usage"],
  });
}

// No page may show a secret: the token, a password the service's config holds.
async function noSecrets(page, where) {
  const html = await page.content();
  for (const s of SECRETS) assert.ok(!html.includes(s), `${where} shows a secret (${s.slice(0, 3)}…)`);
}

async function shot(page, name) {
  await page.screenshot({ path: join(OUT, `${name}.png`), fullPage: true });
}

// Every state each step's node took while the page was open, in order.
async function watchStates(page) {
  await page.evaluate(() => {
    window.__seen = {};
    const note = (g) => {
      const id = g.getAttribute("data-step");
      const m = /st-([a-z-]+)/.exec(g.getAttribute("class") || "");
      if (!id || !m) return;
      const list = (window.__seen[id] ||= []);
      if (list[list.length - 1] !== m[1]) list.push(m[1]);
    };
    document.querySelectorAll("#dag g[data-step]").forEach(note);
    new MutationObserver((muts) => muts.forEach((m) => {
      if (m.target instanceof Element && m.target.matches("#dag g[data-step]")) note(m.target);
      m.addedNodes.forEach((n) => n instanceof Element && n.querySelectorAll("#dag g[data-step]").forEach(note));
    })).observe(document.getElementById("app"), { subtree: true, attributes: true, attributeFilter: ["class"], childList: true });
  });
}

async function statusIs(page, state) {
  await page.locator(`#status [data-state="${state}"]`).waitFor({ timeout: TIMEOUT });
}

async function planAndStart(page, { from, service, to }) {
  await page.goto(`${env("FC_URL")}/ui/#/plan`);
  await page.selectOption("#from", from);
  await page.fill("#service", service);
  await page.selectOption("#to", to);
  await page.click("#plan");
  await page.locator("#plan-view svg.dag").waitFor({ timeout: TIMEOUT });
  page.once("dialog", (d) => d.accept());
  await page.click("#start");
  await page.waitForURL(/#\/relocations\/[^/]+$/, { timeout: TIMEOUT });
  return decodeURIComponent(page.url().split("/").pop());
}

async function dashboard() {
  const URL = env("FC_URL");
  const TOKEN = env("FC_TOKEN");
  const browser = await launch();
  const context = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1360, height: 900 } });
  const page = await context.newPage();
  const problems = [];
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));

  // A wrong token: an error, and nothing of the service.
  await page.goto(`${URL}/ui/`);
  await page.locator("#token").waitFor();
  await page.fill("#token", "not-the-token");
  await page.click("button[type=submit]");
  await page.getByRole("alert").filter({ hasText: "not valid" }).waitFor();
  const wrong = await page.content();
  for (const leak of ["dc-paris", "edge-nantes", "shop"]) assert.ok(!wrong.includes(leak), `the login page shows ${leak}`);
  const noSession = await page.evaluate(async () => (await fetch("/sites")).status);
  assert.equal(noSession, 401, "the API answers without a session");
  assert.equal((await context.cookies()).length, 0, "a wrong token got a cookie");
  await shot(page, "login-refused");

  // The right token, from the keyboard alone: Tab reaches the field,
  // Enter submits. A session cookie the page cannot read.
  await page.fill("#token", "");
  await page.evaluate(() => document.activeElement && document.activeElement.blur());
  let tabs = 0;
  while (await page.evaluate(() => document.activeElement && document.activeElement.id) !== "token") {
    assert.ok(++tabs <= 12, "Tab never reaches the token field");
    await page.keyboard.press("Tab");
  }
  await page.keyboard.type(TOKEN);
  await page.keyboard.press("Enter");
  await page.locator("h1", { hasText: "Relocations" }).waitFor();
  const [cookie] = await context.cookies();
  assert.ok(cookie, "no session cookie");
  assert.equal(cookie.httpOnly, true);
  assert.equal(cookie.sameSite, "Strict");
  assert.equal(cookie.secure, URL.startsWith("https://"));
  assert.ok(!cookie.value.includes(TOKEN), "the cookie holds the token");
  assert.equal(await page.evaluate(() => document.cookie), "", "the page reads the cookie");
  // A cross-site form cannot add the dashboard's header: refused even with the cookie.
  const forged = await page.evaluate(async () => (await fetch("/relocations", {
    method: "POST", headers: { "content-type": "application/json" }, body: "{\"from\":\"dc-paris\"}",
  })).status);
  assert.equal(forged, 403, "a state-changing request without the dashboard's header");

  // Sites: a map with every site, and the table.
  await page.click("nav >> text=Sites");
  await page.locator("svg.map").waitFor();
  const sites = await page.evaluate(async () => (await fetch("/sites")).json());
  assert.equal(await page.locator("svg.map g.site").count(), sites.length);
  assert.equal(await page.locator("table[aria-label=Sites] tbody tr").count(), sites.length);
  for (const s of sites) await page.locator(`svg.map g.site[data-site="${s.name}"]`).waitFor();
  summary.sites = sites.length;
  await shot(page, "sites");
  await noSecrets(page, "the sites page");

  // Match: the broker's ranking, with reasons.
  await page.goto(`${URL}/ui/#/plan`);
  await page.selectOption("#from", "dc-paris");
  await page.fill("#service", "shop");
  await page.click("#match");
  await page.locator("#match-output [data-chosen]").first().waitFor({ timeout: TIMEOUT });
  summary.matched = await page.locator("#match-output [data-chosen]").first().getAttribute("data-chosen");
  summary.alternatives = await page.locator("#match-output tbody tr").count();
  await shot(page, "match");

  // Plan, then run the demo relocation and watch it live.
  const id1 = await planAndStart(page, { from: "dc-paris", service: "shop", to: "edge-nantes" });
  summary.first = id1;
  await watchStates(page);
  await page.locator("#dag g.st-running").first().waitFor({ timeout: TIMEOUT });
  assert.match(await page.locator("#dag path.edges").getAttribute("d"), /^M[\d.]+ [\d.]+C/, "the graph has no edges");
  await page.waitForTimeout(2000);
  await shot(page, "relocation-live");
  await statusIs(page, "succeeded");
  await page.locator("#gantt").waitFor({ timeout: TIMEOUT });
  // The view reloads with the report at the end; states seen before it.
  const seen = await page.evaluate(() => window.__seen);
  const steps = await page.evaluate(async (id) => (await fetch(`/relocations/${id}`)).json(), id1);
  for (const s of steps.steps) assert.equal(s.state, "succeeded", `${s.id} is ${s.state}`);
  const live = Object.entries(seen).filter(([, l]) => l.includes("running") && l.includes("succeeded"));
  assert.ok(live.length >= steps.steps.length / 2,
    `too few steps seen going from running to succeeded live: ${JSON.stringify(seen)}`);
  summary.steps_seen_live = live.length;
  summary.steps = steps.steps.length;
  summary.downtime_text = await page.locator("#downtime text").textContent();
  summary.downtime_figure = await page.locator("#downtime-figure").textContent();
  summary.gantt_bars = await page.locator("#gantt rect.bar").count();
  await shot(page, "report");
  await noSecrets(page, "the report");

  // A second relocation, cancelled while it runs, then resumed.
  const id2 = await planAndStart(page, { from: "dc-paris", service: "svc1", to: "edge-nantes" });
  summary.second = id2;
  await page.locator("#dag g.st-running").first().waitFor({ timeout: TIMEOUT });
  page.once("dialog", (d) => { summary.cancel_question = d.message(); d.accept(); });
  await page.click("button[data-action=cancel]");
  await statusIs(page, "cancelled");
  await shot(page, "cancelled");
  page.once("dialog", (d) => d.accept());
  await page.click("button[data-action=resume]");
  await statusIs(page, "succeeded");
  await page.locator("#gantt").waitFor({ timeout: TIMEOUT });
  await noSecrets(page, "the resumed relocation");

  // The list shows both.
  await page.goto(`${URL}/ui/#/relocations`);
  for (const id of [id1, id2]) await page.locator(`tr[data-id="${id}"] [data-state=succeeded]`).waitFor();
  await shot(page, "relocations");

  // A 10,000-step plan: the time from the click to the graph on screen.
  const N = 10_000;
  const big = { relocation: { id: "big", service: "big", from: "dc-paris", assignments: { x: "edge-nantes" }, bytes_to_move: N * 1048576 },
    plan: { workflow_id: "big", name: "big", total_bytes: N * 1048576, critical_path_seconds: 0, steps: [] } };
  for (let i = 0; i < N; i++) {
    const lane = i % 100;
    big.plan.steps.push({ id: `step-${i}`, migrator: "volume-copy", site: "edge-nantes",
      depends_on: i >= 100 ? [`step-${i - 100}`] : [], estimate: { bytes_read: 1048576, bytes_sent: 1048576, bytes_written: 1048576, seconds: 0.5 + lane / 1000 } });
  }
  await page.route("**/plan", (r) => r.fulfill({ status: 200, contentType: "application/json", body: JSON.stringify(big) }));
  await page.goto(`${URL}/ui/#/plan`);
  await page.locator("#plan").waitFor();
  const t0 = Date.now();
  await page.click("#plan");
  await page.locator("#plan-view svg.dag").waitFor({ timeout: TIMEOUT });
  await page.evaluate(() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r))));
  summary.plan_10k_ms = Date.now() - t0;
  assert.equal(await page.locator("#plan-view svg.dag g.node").count(), N);
  assert.equal(await page.locator("#plan-view svg.dag g.node.critical").count(), 100, "the critical path is one lane of 100 steps");
  await page.unroute("**/plan");

  // Log out: the session ends.
  await page.goto(`${URL}/ui/#/relocations`);
  await page.click("#logout");
  await page.locator("#token").waitFor();
  assert.equal(await page.evaluate(async () => (await fetch("/relocations")).status), 401);

  assert.deepEqual(problems, []);
  await browser.close();
}

async function report() {
  const file = env("FC_REPORT");
  const steps = JSON.parse(env("FC_STEPS"));
  const browser = await launch();
  const context = await browser.newContext({ offline: true, viewport: { width: 1360, height: 900 } });
  const page = await context.newPage();
  const requests = [];
  page.on("request", (r) => { if (!r.url().startsWith("file:")) requests.push(r.url()); });
  const problems = [];
  page.on("pageerror", (e) => problems.push(e.message));
  await page.goto(`file://${file}`);
  await page.locator("#gantt").waitFor();
  for (const id of steps) {
    await page.locator(`#gantt rect[data-step="${id}"], #gantt text:text-is("${id}")`).first().waitFor();
    assert.equal(await page.locator(`tr[data-step="${id}"]`).count(), 1, `step ${id} is not in the table`);
  }
  summary.report_steps = steps.length;
  summary.report_downtime = await page.locator("#downtime text").textContent();
  await shot(page, "report-html");
  await noSecrets(page, "the HTML report");
  assert.deepEqual(requests, [], "the report page loaded something");
  assert.deepEqual(problems, []);
  await browser.close();
}

const mode = process.argv[2];
try {
  if (mode === "dashboard") await dashboard();
  else if (mode === "report") await report();
  else throw new Error(`unknown mode ${mode}`);
  writeFileSync(join(OUT, `${mode}.json`), JSON.stringify(summary, null, 2));
  console.log(JSON.stringify(summary));
} catch (e) {
  console.error(`FAILED: ${e.stack || e}`);
  process.exit(1);
}
