// Drives the voice demo page of `realtime-gateway dev` with its "WebRTC" switch on, in
// headless Chromium with a fake microphone (the WAV named in the flags): Start, wait until
// the call is live and both transcripts show, Stop (the page hangs the call up).
// Spec on stdin: {chromium, flags: [...], url, screenshot}.
// Prints one JSON line: {live, user: [...], assistant: [...], errors: [...], log, closed}.
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
  await page.check("#webrtc");
  await page.click("#start");
  const report = {};
  try {
    await page.waitForSelector('#status[data-state="live"]', { timeout: 15000 });
    report.live = await page.textContent("#status");
    await page.waitForSelector(".msg.user:not(.pending)", { timeout: 30000 });
    await page.waitForSelector(".msg.assistant:not(.pending)", { timeout: 30000 });
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
  console.log(JSON.stringify(report));
} finally {
  await browser.close();
}
