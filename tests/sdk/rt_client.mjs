// Azure's rt-client 0.5.1 (npm) LowLevelRTClient through the gateway, in Node or (with
// spec.chromium) in headless Chromium with its browser build. Azure mode, as Azure's realtime
// audio sample uses it: new LowLevelRTClient(new URL(endpoint), {key: token}, {deployment}).
// In Node the key goes in an api-key header; in a browser in the query (api-key=).
// Spec on stdin: {endpoint, token, deployment, audio: base64 PCM16 24 kHz,
//                 chromium?, flags?, page?}.
// A beta session: session.update, the audio appended in 100 ms chunks, commit,
// response.create, then every server event until response.done (rt-client itself throws
// "Invalid message type" on a type the beta protocol lacks).
// Prints one JSON line: {events: [type...], audioBytes, transcript, usage, error, userAgent}.
import { readFileSync } from "node:fs";

const spec = JSON.parse(readFileSync(0, "utf8"));
const deadline = setTimeout(() => {
  console.error("rt_client: gave up after 45 s");
  process.exit(3);
}, 45000);

// The whole conversation, as a function that runs in Node or in the page (rtclient global).
async function converse(rtclient, spec) {
  const report = { events: [], audioBytes: 0, transcript: "", usage: null, error: null,
                   userAgent: typeof navigator === "object" ? navigator.userAgent : null };
  const client = new rtclient.LowLevelRTClient(new URL(spec.endpoint), { key: spec.token },
                                               { deployment: spec.deployment });
  const decode = (b64) => (typeof atob === "function" ? atob(b64).length
                                                      : Buffer.from(b64, "base64").length);
  try {
    await client.send({ type: "session.update", session: {
      modalities: ["text", "audio"], voice: "alloy", instructions: "Be brief.",
      input_audio_format: "pcm16", output_audio_format: "pcm16", turn_detection: null,
      input_audio_transcription: { model: "whisper-1" }, temperature: 0.8 } });
    const chunk = 6400;  // base64 characters of 100 ms of PCM16 24 kHz (4800 bytes)
    for (let i = 0; i < spec.audio.length; i += chunk) {
      await client.send({ type: "input_audio_buffer.append", audio: spec.audio.slice(i, i + chunk) });
    }
    await client.send({ type: "input_audio_buffer.commit" });
    await client.send({ type: "response.create" });
    for await (const message of client.messages()) {
      report.events.push(message.type);
      if (message.type === "error") report.error = message.error;
      if (message.type === "response.audio.delta") report.audioBytes += decode(message.delta);
      if (message.type === "response.audio_transcript.delta") report.transcript += message.delta;
      if (message.type === "response.done") {
        report.usage = message.response.usage;
        break;
      }
    }
  } catch (err) {
    report.error = { thrown: String(err && err.message || err) };
  }
  await client.close();
  return report;
}

let report;
if (spec.chromium) {
  const { chromium } = await import("playwright-core");
  const browser = await chromium.launch({ executablePath: spec.chromium, args: spec.flags,
                                          headless: true, timeout: 30000 });
  try {
    const page = await browser.newPage();
    await page.goto(spec.page, { timeout: 15000 });
    report = await page.evaluate(
      async ([source, s]) => (0, eval)(`(${source})`)(window.rtclient, s),
      [converse.toString(), spec]);
  } finally {
    await browser.close();
  }
} else {
  report = await converse(await import("rt-client"), spec);
}
clearTimeout(deadline);
console.log(JSON.stringify(report));
