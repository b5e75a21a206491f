// openai (npm) beta OpenAIRealtimeWS ("openai/beta/realtime/ws": OpenAI-Beta: realtime=v1)
// through the gateway over wss:// (the SDK only dials wss). Spec on stdin: {baseURL, token}.
// NODE_EXTRA_CA_CERTS must name the test CA. A beta session: session.created → session.update
// (beta shape) → session.updated; a user text item and response.create (beta modalities) →
// response.audio.delta, response.audio_transcript.done and response.done with usage.
// Prints one JSON line: {url, events, transcript, audioBytes, usage, closeCode}.
import { readFileSync } from "node:fs";
import OpenAI from "openai";
import { OpenAIRealtimeWS } from "openai/beta/realtime/ws";

const spec = JSON.parse(readFileSync(0, "utf8"));
const deadline = setTimeout(() => {
  console.error("openai_beta_ws: gave up after 30 s");
  process.exit(3);
}, 30000);

const report = { events: [], audioBytes: 0, transcript: "" };
await new Promise((resolve, reject) => {
  const client = new OpenAI({ baseURL: spec.baseURL, apiKey: spec.token });
  const rt = new OpenAIRealtimeWS({ model: "gpt-realtime" }, client);
  report.url = rt.url.toString();
  rt.on("error", (err) => reject(new Error(`realtime error: ${err.message}`)));
  rt.on("event", (event) => report.events.push(event.type));
  rt.on("session.created", () => {
    rt.send({ type: "session.update", session: {
      modalities: ["text", "audio"], voice: "alloy", output_audio_format: "pcm16",
      instructions: "Be brief.", temperature: 0.8 } });
  });
  rt.on("session.updated", () => {
    if (report.events.filter((t) => t === "session.updated").length > 1) return;
    rt.send({ type: "conversation.item.create",
              item: { type: "message", role: "user",
                      content: [{ type: "input_text", text: "Hello beta over TLS" }] } });
    rt.send({ type: "response.create", response: { modalities: ["audio", "text"] } });
  });
  rt.on("response.audio.delta", (e) => {
    report.audioBytes += Buffer.from(e.delta, "base64").length;
  });
  rt.on("response.audio_transcript.done", (e) => { report.transcript = e.transcript; });
  rt.on("response.done", (e) => {
    report.usage = e.response.usage;
    rt.close();
  });
  rt.socket.on("close", (code) => { report.closeCode = code; resolve(); });
});

clearTimeout(deadline);
console.log(JSON.stringify(report));
