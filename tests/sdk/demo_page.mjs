// Drives the voice demo page of `realtime-gateway dev` in headless Chromium with a fake
// microphone (the WAV named in the Chromium flags): Start, wait until both transcripts
// show and the reply has been played, take a screenshot, Stop, read the close status.
// Then start again with a token the gateway refuses and read the error shown.
// Spec on stdin: {chromium, flags: [...], url, screenshot, errorScreenshot}.
// Prints one JSON line: {live, user: [...], assistant: [...], errors: [...], log, closed,
// refused: {status, errors}}.
import { readFileSync } from "node:fs";
import { chromium } from "playwright-core";

const spec = JSON.parse(readFileSync(0, "utf8"));
const browser = await chromium.launch({ executablePath: spec.chromium, args: spec.flags,
                                        headless: true, timeout: 30000 });
const texts = (page, selector) =>
  page.$$eval(selector, (els) => els.map((el) => el.textContent.trim()));
try {
  const context = await browser.newContext({ viewport: { width: 900, height: 820 } });
  await context.grantPermissions(["microphone"]);
  const page = await context.newPage();
  const consoleErrors = [];
  page.on("console", (m) => { if (m.type() === "error") consoleErrors.push(m.text()); });
  page.on("pageerror", (err) => consoleErrors.push(String(err)));
  await page.goto(spec.url, { timeout: 15000 });
  const report = { title: await page.title() };
  await page.click("#start");
  try {
    await page.waitForSelector('#status[data-state="live"]', { timeout: 10000 });
    report.live = await page.textContent("#status");
    await page.waitForSelector(".msg.user:not(.pending)", { timeout: 20000 });
    await page.waitForSelector(".msg.assistant:not(.pending)", { timeout: 20000 });
    await page.waitForFunction(
      () => document.getElementById("log").textContent.includes("reply played"), null,
      { timeout: 15000 });
  } finally {
    report.user = await texts(page, ".msg.user .text");
    report.assistant = await texts(page, ".msg.assistant .text");
    report.errors = await texts(page, "#errors .error");
    report.log = await page.textContent("#log");
    report.consoleErrors = consoleErrors;
    await page.screenshot({ path: spec.screenshot, fullPage: true });
    console.error(`page state: ${JSON.stringify(report)}`); // diagnosis when a wait failed
  }
  await page.click("#stop");
  await page.waitForSelector('#status[data-state="closed"]', { timeout: 10000 });
  report.closed = await page.textContent("#status");
  report.startEnabled = await page.isEnabled("#start");

  // A refused secret: the gateway accepts, sends an error event and closes 4401; the page
  // must show both. The backend's secret endpoint is replaced for this second start only.
  await page.route("**/_dev/secret", async (route) => {
    const grant = await (await route.fetch()).json();
    await route.fulfill({ json: { ...grant, value: "ek_not-a-valid-secret" } });
  });
  await page.click("#start");
  await page.waitForSelector('#status[data-state="error"]', { timeout: 10000 });
  report.refused = { status: await page.textContent("#status"),
                     errors: await texts(page, "#errors .error") };
  await page.screenshot({ path: spec.errorScreenshot, fullPage: true });
  console.log(JSON.stringify(report));
} finally {
  await browser.close();
}
