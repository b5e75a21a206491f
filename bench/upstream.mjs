// The benchmark's echo upstream: a stand-in for the Realtime API that costs next to nothing.
//
// Each text frame `{"type":"input_audio_buffer.append",...,"audio":"<base64>"}` is answered
// with one `response.output_audio.delta` carrying the same base64 audio (so the reply is the
// same size as the append); binary frames are echoed verbatim.  With --usage-every N > 0
// ("streaming mode") every N-th append is also followed by a `response.done` carrying a
// `usage` object (GA Realtime shape), which the gateway meters.  Every connection gets a
// `session.created` first, like the real API.
//
// With --tls-cert and --tls-key (PEM files) it serves TLS: an https server with the WebSocket
// server on it (wss://), so a relay's upstream leg is TLS as in production.
//
// Usage: node upstream.mjs [--host 127.0.0.1] [--port 0] [--usage-every 0] [--max-seconds 3600]
//                          [--exit-on-stdin-close 1] [--tls-cert server.pem --tls-key server.key]
// Prints one JSON line {"event":"listening","port":P,"tls":bool} on stdout, then runs until
// SIGTERM/SIGINT,
// for --max-seconds at most (bounded), or (with --exit-on-stdin-close 1) until its stdin
// closes, so it never outlives the benchmark runner that started it.

import { readFileSync } from 'node:fs';
import { createServer } from 'node:https';
import { WebSocketServer } from 'ws';

function parseArgs(argv) {
  const args = {
    host: '127.0.0.1', port: 0, usageEvery: 0, maxSeconds: 3600, stdinExit: 0, tlsCert: '',
    tlsKey: '',
  };
  for (let i = 2; i < argv.length; i += 2) {
    const [key, value] = [argv[i], argv[i + 1]];
    if (key === '--host') args.host = value;
    else if (key === '--port') args.port = Number(value);
    else if (key === '--usage-every') args.usageEvery = Number(value);
    else if (key === '--max-seconds') args.maxSeconds = Number(value);
    else if (key === '--exit-on-stdin-close') args.stdinExit = Number(value);
    else if (key === '--tls-cert') args.tlsCert = value;
    else if (key === '--tls-key') args.tlsKey = value;
    else throw new Error(`unknown argument ${key}`);
  }
  return args;
}

const args = parseArgs(process.argv);
const APPEND = Buffer.from('"input_audio_buffer.append"');
const AUDIO_KEY = Buffer.from('"audio":"');
// The delta's event_id carries the time the append arrived here (epoch ms, fixed width), so
// the load generator can split a slow round trip into its way up and its way down.
const DELTA_PREFIX = Buffer.from('{"type":"response.output_audio.delta","event_id":"t');
const DELTA_HEAD = Buffer.from(
  '","response_id":"resp_bench",' +
  '"item_id":"item_bench","output_index":0,"content_index":0,"delta":"');
const arrival = () => Buffer.from(
  (performance.timeOrigin + performance.now()).toFixed(1).padStart(15, '0'));
const DELTA_TAIL = Buffer.from('"}');
// 20 ms of audio is ~2 audio tokens in, ~2 out; one response.done per N appends.
function usageEvent(appends) {
  const audioIn = Math.max(1, Math.round(appends / 5));
  return JSON.stringify({
    type: 'response.done',
    event_id: 'event_bench_done',
    response: {
      object: 'realtime.response', id: 'resp_bench', status: 'completed', output: [],
      usage: {
        total_tokens: 2 * audioIn, input_tokens: audioIn, output_tokens: audioIn,
        input_token_details: { text_tokens: 0, audio_tokens: audioIn, image_tokens: 0,
          cached_tokens: 0 },
        output_token_details: { text_tokens: 0, audio_tokens: audioIn },
      },
    },
  });
}
const USAGE = args.usageEvery > 0 ? usageEvent(args.usageEvery) : null;
const SESSION_CREATED = JSON.stringify({
  type: 'session.created', event_id: 'event_bench_created',
  session: { type: 'realtime', object: 'realtime.session', id: 'sess_bench', model: 'bench' },
});

const wsOptions = {
  perMessageDeflate: false, clientTracking: true, maxPayload: 16 * 1024 * 1024,
};
const tls = Boolean(args.tlsCert && args.tlsKey);
let https = null;
let server;
if (tls) {
  https = createServer({ cert: readFileSync(args.tlsCert), key: readFileSync(args.tlsKey) });
  server = new WebSocketServer({ ...wsOptions, server: https });
  https.listen({ host: args.host, port: args.port, backlog: 4096 });
} else {
  server = new WebSocketServer({ ...wsOptions, host: args.host, port: args.port, backlog: 4096 });
}

server.on('connection', (ws) => {
  let appends = 0;
  ws.send(SESSION_CREATED);
  ws.on('message', (data, isBinary) => {
    if (isBinary) {
      ws.send(data, { binary: true });
      return;
    }
    if (data.indexOf(APPEND) < 0) return;
    const start = data.indexOf(AUDIO_KEY);
    if (start < 0) return;
    const from = start + AUDIO_KEY.length;
    const to = data.indexOf(0x22, from); // the closing quote; base64 never contains one
    if (to < 0) return;
    ws.send(Buffer.concat([DELTA_PREFIX, arrival(), DELTA_HEAD, data.subarray(from, to), DELTA_TAIL]),
      { binary: false });
    appends += 1;
    if (USAGE !== null && appends % args.usageEvery === 0) ws.send(USAGE);
  });
  ws.on('error', () => {});
});

function stop() {
  for (const ws of server.clients) ws.terminate();
  server.close(() => (https ? https.close(() => process.exit(0)) : process.exit(0)));
  setTimeout(() => process.exit(0), 2000).unref();
}

(https || server).on('listening', () => {
  const { port } = (https || server).address();
  process.stdout.write(JSON.stringify({ event: 'listening', port, tls }) + '\n');
});
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
if (args.stdinExit) {
  process.stdin.on('end', stop);
  process.stdin.on('error', stop);
  process.stdin.resume();
}
setTimeout(stop, args.maxSeconds * 1000).unref();
