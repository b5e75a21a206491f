// Opens tests/sdk/pages/foundry.html (served by the test) in headless Chromium and runs
// window.openRealtime(url, protocols) for each case of the JSON spec read from stdin:
//   {chromium, flags: [...], page, cases: [{name, url, protocols}]}
// Prints {results: {name: <what the page saw>}} as one JSON line.
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
  const results = {};
  for (const c of spec.cases) {
    results[c.name] = await page.evaluate(([url, protocols]) => window.openRealtime(url, protocols),
                                          [c.url, c.protocols]);
  }
  console.log(JSON.stringify({ results, consoleErrors }));
} finally {
  await browser.close();
}
