// openai-node's client.realtime.clientSecrets.create against the gateway, as the seeds'
// backends call it. Spec on stdin: {baseURL, token}. Prints the answer as one JSON line.
import { readFileSync } from "node:fs";
import OpenAI from "openai";

const spec = JSON.parse(readFileSync(0, "utf8"));
const client = new OpenAI({ apiKey: spec.token, baseURL: spec.baseURL, maxRetries: 0 });
const secret = await client.realtime.clientSecrets.create({
  expires_after: { seconds: 300, anchor: "created_at" },
});
console.log(JSON.stringify(secret));
