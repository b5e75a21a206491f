// Opens the agents_webrtc page (served by the test) in headless Chromium with a fake
// microphone (the WAV named in the flags) and runs window.runCall({callsUrl, apiKey}):
// @openai/agents' RealtimeSession over OpenAIRealtimeWebRTC through the gateway.
// Spec on stdin: {chromium, flags: [...], page, callsUrl, apiKey}.
// Prints one JSON line: {call: <what the page saw>, consoleErrors: [...]}.
import { chromium } from "playwright-core";
import { readFileSync } from "node:fs";

const spec = JSON.parse(readFileSync(0, "utf8"));
const browser = await chromium.launch({ executablePath: spec.chromium, args: spec.flags,
                                        headless: true, timeout: 30000 });
try {
  const context = await browser.newContext();
  await context.grantPermissions(["microphone"]);
  const page = await context.newPage();
  const consoleErrors = [];
  page.on("console", (m) => { if (m.type() === "error") consoleErrors.push(m.text()); });
  page.on("pageerror", (err) => consoleErrors.push(String(err)));
  await page.goto(spec.page, { timeout: 15000 });
  await page.waitForFunction(() => window.ready === true, null, { timeout: 15000 });
  const call = await page.evaluate((args) => window.runCall(args),
                                   { callsUrl: spec.callsUrl, apiKey: spec.apiKey });
  console.log(JSON.stringify({ call, consoleErrors }));
} finally {
  await browser.close();
}
