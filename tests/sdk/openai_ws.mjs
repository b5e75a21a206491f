// openai (npm) OpenAIRealtimeWS through the gateway over wss:// (the SDK only dials wss).
// Spec on stdin: {baseURL, token, badToken}. NODE_EXTRA_CA_CERTS must name the test CA.
// A session: session.created → session.update → session.updated; a user text item and
// response.create → audio deltas, a transcript and response.done with usage.
// Then a bad token: the SDK reports the gateway's HTTP 401 as an error.
// Prints one JSON line: {url, events, transcript, audioBytes, usage, badToken: {...}}.
import { readFileSync } from "node:fs";
import OpenAI from "openai";
import { OpenAIRealtimeWS } from "openai/realtime/ws";

const spec = JSON.parse(readFileSync(0, "utf8"));
const deadline = setTimeout(() => {
  console.error("openai_ws: gave up after 30 s");
  process.exit(3);
}, 30000);

function session(apiKey) {
  const client = new OpenAI({ baseURL: spec.baseURL, apiKey });
  return new OpenAIRealtimeWS({ model: "gpt-realtime" }, client);
}

const report = { events: [], audioBytes: 0, transcript: "" };
await new Promise((resolve, reject) => {
  const rt = session(spec.token);
  report.url = rt.url.toString();
  rt.on("error", (err) => reject(new Error(`realtime error: ${err.message}`)));
  rt.on("event", (event) => report.events.push(event.type));
  rt.on("session.created", () => {
    rt.send({ type: "session.update",
              session: { type: "realtime", output_modalities: ["audio"], instructions: "Be brief." } });
  });
  rt.on("session.updated", () => {
    if (report.events.filter((t) => t === "session.updated").length > 1) return;
    rt.send({ type: "conversation.item.create",
              item: { type: "message", role: "user",
                      content: [{ type: "input_text", text: "Hello over TLS" }] } });
    rt.send({ type: "response.create" });
  });
  rt.on("response.output_audio.delta", (e) => {
    report.audioBytes += Buffer.from(e.delta, "base64").length;
  });
  rt.on("response.output_audio_transcript.done", (e) => { report.transcript = e.transcript; });
  rt.on("response.done", (e) => {
    report.usage = e.response.usage;
    rt.close();
  });
  rt.socket.on("close", (code) => { report.closeCode = code; resolve(); });
});

report.badToken = await new Promise((resolve) => {
  const rt = session(spec.badToken);
  const seen = { errors: [], opened: false };
  rt.socket.on("open", () => { seen.opened = true; });
  rt.on("error", (err) => seen.errors.push(err.message));
  rt.socket.on("close", () => resolve(seen));
});

clearTimeout(deadline);
console.log(JSON.stringify(report));
