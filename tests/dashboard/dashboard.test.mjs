// Drives the daemon's dashboard in Debian's Chromium with playwright-core. Run by
// tests/e2e/tests/dashboard.rs, which starts the daemon and the demo backend and passes:
//   SELFHEAL_URL    the daemon's admin address (http://127.0.0.1:PORT)
//   SELFHEAL_TOKEN  its bearer token
//   FAULT_URL       a URL whose POST crashes the demo backend (the injected failure)
//   PLATFORMS       the platforms the page must show, comma-separated
//   SCREENSHOTS     the directory the screenshots go to
// Exits 0 when every check passed; otherwise prints what failed and exits 1.

import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";
import { join } from "node:path";

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};
const base = env("SELFHEAL_URL");
const token = env("SELFHEAL_TOKEN");
const faultUrl = env("FAULT_URL");
const platforms = env("PLATFORMS").split(",");
const shots = env("SCREENSHOTS");
mkdirSync(shots, { recursive: true });

const step = (text) => console.log(`dashboard: ${text}`);
const problems = [];

async function api(path) {
  const response = await fetch(base + "/api/v1/system" + path, { headers: { Authorization: `Bearer ${token}` } });
  const body = await response.json();
  if (!body.success) throw new Error(`${path}: ${body.error}`);
  return body.data;
}

const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
try {
  page.on("console", (message) => {
    if (message.type() === "error") problems.push(`console error: ${message.text()}`);
  });
  page.on("pageerror", (error) => problems.push(`page error: ${error.message}`));
  page.on("requestfailed", (request) => {
    // The event stream is aborted on purpose when the page closes.
    if (!request.url().includes("/events")) problems.push(`request failed: ${request.url()} ${request.failure()?.errorText}`);
  });
  page.setDefaultTimeout(20000);

  step("the page asks for the token");
  await page.goto(base + "/");
  await page.waitForSelector("#login:not([hidden])");
  await page.fill("#token", "a-wrong-token-of-some-length");
  await page.click("#login button[type=submit]");
  await page.waitForFunction(() => document.querySelector("#login-error").textContent.includes("refused"));
  // A refused token is a 401 the page handles; Chromium still logs the failed load.
  const refused = problems.filter((p) => !p.includes("401"));
  problems.splice(0, problems.length, ...refused);
  await page.fill("#token", token);
  await page.click("#login button[type=submit]");
  await page.waitForFunction(() => document.querySelector("#status").textContent !== "…");
  await page.waitForFunction(() => document.querySelector("#live").textContent === "live");

  step("status and platforms at a glance");
  const status = await page.textContent("#status");
  if (status !== "healthy") problems.push(`overall status shows ${status}, expected healthy`);
  for (const name of platforms) {
    const card = page.locator(`#platforms .platform[data-name="${name}"]`);
    if ((await card.count()) !== 1) problems.push(`platform ${name} is not shown`);
  }
  await page.waitForSelector('#agents tr[data-agent="repair"]');
  await page.waitForSelector("#charts .chart svg path", { state: "attached" });
  const charts = await page.locator("#charts .chart").count();
  if (charts !== 5) problems.push(`${charts} charts, expected 5`);
  // The busiest platform's traffic and the target's memory are drawn, not empty paths.
  for (const chart of ["Latency", "Throughput", "Target memory"]) {
    const drawn = await page.locator(`#charts .chart[data-chart="${chart}"] svg path`).evaluateAll(
      (paths) => paths.some((p) => p.getAttribute("d") !== "M0 0"));
    if (!drawn) problems.push(`the ${chart} chart is empty`);
  }
  const traffic = await page.textContent('#platforms .platform[data-name="tackle.io"]');
  if (!/[0-9.]+ req\/s · p95 [0-9.]+ ms/.test(traffic)) problems.push(`tackle.io shows no traffic: ${traffic}`);
  await page.selectOption("#window", "24h");
  await page.waitForSelector("#charts .chart svg path", { state: "attached" });
  await page.screenshot({ path: join(shots, "1-healthy.png"), fullPage: true });

  step("the token is kept for the session: a reload does not ask again");
  await page.reload();
  await page.waitForFunction(() => document.querySelector("#live").textContent === "live");
  if (await page.isVisible("#login")) problems.push("the reload asked for the token again");

  step("an injected failure appears as an alert without a reload");
  const navigations = [];
  page.on("framenavigated", (frame) => { if (frame === page.mainFrame()) navigations.push(frame.url()); });
  const crash = await fetch(faultUrl, { method: "POST" }).catch((error) => ({ status: `connection ended (${error.message})` }));
  step(`crash requested: ${crash.status}`);
  const row = page.locator('#alerts tr[data-state="firing"]', { hasText: "target.exited" });
  await row.waitFor();
  await page.waitForFunction(() => document.querySelector("#status").textContent === "critical");
  if (navigations.length) problems.push(`the page navigated: ${navigations}`);
  await page.screenshot({ path: join(shots, "2-alert.png"), fullPage: true });

  step("acknowledging it from the page changes its state in the API");
  const id = Number(await row.getAttribute("data-id"));
  await row.locator("button.ack").click();
  await page.locator(`#alerts tr[data-id="${id}"][data-state="acknowledged"]`).waitFor();
  const alert = (await api(`/alerts/${id}`));
  const state = alert.state ?? alert.alert?.state;
  if (state !== "acknowledged") problems.push(`the API shows alert ${id} as ${state}`);
  const by = alert.acknowledged_by ?? alert.alert?.acknowledged_by;
  if (by !== "dashboard") problems.push(`acknowledged by ${by}, expected dashboard`);
  await page.screenshot({ path: join(shots, "3-acknowledged.png"), fullPage: true });
} catch (error) {
  problems.push(`step failed: ${error.stack || error}`);
  await page.screenshot({ path: join(shots, "failed.png"), fullPage: true }).catch(() => {});
} finally {
  await browser.close();
}

if (problems.length) {
  console.log("dashboard: FAILED\n  " + problems.join("\n  "));
  process.exit(1);
}
console.log(`dashboard: every check passed; screenshots in ${shots}`);
