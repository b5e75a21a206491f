// @openai/agents (npm) RealtimeSession through the gateway, in Node.
// Spec on stdin: {url, token}. The transport is OpenAIRealtimeWebSocket whose
// createWebSocket opens the socket (Node `ws`) with the single subprotocol "Bearer-<token>".
// Steps: connect → session.created + session.updated; sendMessage → audio + transcript;
// a message naming the get_weather tool → the agent runs it and the reply is spoken.
// Prints one JSON line: {protocol, firstEvents, turn1: {...}, tool: {...}}.
import { readFileSync } from "node:fs";
import WebSocket from "ws";
import { z } from "zod";
import { OpenAIRealtimeWebSocket, RealtimeAgent, RealtimeSession, tool } from "@openai/agents/realtime";

const spec = JSON.parse(readFileSync(0, "utf8"));
const deadline = setTimeout(() => {
  console.error("agents_session: gave up after 30 s");
  process.exit(3);
}, 30000);

const events = []; // every server event type, in order
const waiters = [];
function onEvent(event) {
  events.push(event);
  for (const w of [...waiters]) {
    if (w.test(event)) {
      waiters.splice(waiters.indexOf(w), 1);
      w.resolve(event);
    }
  }
}
function next(test, label) {
  const found = events.find((e) => test(e) && !e.__taken);
  if (found) {
    found.__taken = true;
    return Promise.resolve(found);
  }
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no ${label} within 15 s`)), 15000);
    waiters.push({ test, resolve: (e) => { clearTimeout(timer); e.__taken = true; resolve(e); } });
  });
}

const toolCalls = [];
const getWeather = tool({
  name: "get_weather",
  description: "The weather in a city.",
  parameters: z.object({ city: z.string() }),
  execute: async ({ city }) => {
    toolCalls.push(city);
    return "sunny, 21 degrees";
  },
});
const agent = new RealtimeAgent({ name: "Assistant", instructions: "Be brief.", tools: [getWeather] });

let socket;
const transport = new OpenAIRealtimeWebSocket({
  createWebSocket: async ({ url, apiKey }) => {
    socket = new WebSocket(url, [`Bearer-${apiKey}`]);
    return socket;
  },
});
const session = new RealtimeSession(agent, { transport, model: "gpt-realtime" });
let audioBytes = 0;
session.on("audio", (event) => { audioBytes += event.data.byteLength; });
session.on("transport_event", (event) => onEvent(event));
session.on("error", (error) => console.error("session error:", JSON.stringify(error.error ?? error)));
const toolEnds = [];
session.on("agent_tool_end", (_context, _agent, calledTool, result) => {
  toolEnds.push({ name: calledTool.name, result });
});

await session.connect({ apiKey: spec.token, url: spec.url });
const created = await next((e) => e.type === "session.created", "session.created");
const updated = await next((e) => e.type === "session.updated", "session.updated");
const report = {
  protocol: socket.protocol,
  firstEvents: events.slice(0, 2).map((e) => e.type),
  sessionModel: created.session.model,
};
// The SDK sends two session.update events (its config on open, tracing on session.created)
// whose answers may come in either order: wait until the agent's tool is declared.
const withTools = (e) => e.type === "session.updated"
  && (e.session.tools ?? []).some((t) => t.name === "get_weather");
const declared = updated.session.tools?.length ? updated : await next(withTools, "tools");
report.updatedTools = declared.session.tools.map((t) => t.name);

session.sendMessage("Hello from the agents SDK");
const transcript1 = await next((e) => e.type === "response.output_audio_transcript.done",
  "transcript");
await next((e) => e.type === "response.done", "response.done");
report.turn1 = { transcript: transcript1.transcript, audioBytes };

session.sendMessage("Please call get_weather for Paris");
const call = await next((e) => e.type === "response.function_call_arguments.done",
  "function call");
const spoken = await next((e) => e.type === "response.output_audio_transcript.done",
  "spoken tool result");
report.tool = { name: call.name, arguments: JSON.parse(call.arguments), calls: toolCalls,
                ends: toolEnds, transcript: spoken.transcript };
report.eventTypes = [...new Set(events.map((e) => e.type))];
session.close();
clearTimeout(deadline);
console.log(JSON.stringify(report));
