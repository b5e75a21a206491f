// Opens a page of tests/sdk/pages (served by the test) in headless Chromium and awaits
// window[fn](arg) there. Spec on stdin: {chromium, flags: [...], page, fn, arg}.
// Prints {result, consoleErrors} as one JSON line.
import { chromium } from "playwright-core";
import { readFileSync } from "node:fs";

const spec = JSON.parse(readFileSync(0, "utf8"));
const browser = await chromium.launch({ executablePath: spec.chromium, args: spec.flags,
                                        headless: true, timeout: 30000 });
try {
  const page = await browser.newPage();
  const consoleErrors = [];
  page.on("console", (m) => { if (m.type() === "error") consoleErrors.push(m.text()); });
  await page.goto(spec.page, { timeout: 15000 });
  await page.waitForFunction(() => window.ready === true, null, { timeout: 15000 });
  const result = await page.evaluate(([fn, arg]) => window[fn](arg), [spec.fn, spec.arg]);
  console.log(JSON.stringify({ result, consoleErrors }));
} finally {
  await browser.close();
}
