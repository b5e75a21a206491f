// The benchmark's load generator: N concurrent Realtime sessions appending 20 ms audio chunks.
//
// Each session opens a WebSocket (Authorization: Bearer <token>), then sends
// `input_audio_buffer.append` text frames (--chunk-bytes of PCM16 audio, base64) at --rate per
// second on its own schedule, and times each append until the matching
// `response.output_audio.delta` comes back (frames are never reordered, so replies match appends
// in order: a per-session FIFO of send times).  Sessions are opened evenly over --ramp-seconds;
// after --warmup-seconds the measurement window of --duration-seconds starts.  With
// --session-lifetime L > 0 (the soak) each session closes itself after L seconds and its slot
// reopens at once, so handshakes and closes run all along.
//
// Everything is bounded: a hard stop fires at ramp + warmup + duration + 60 s.
//
// stdout, one JSON object a line:
//   {"event":"opened", ...}        every slot has had its first handshake (done or failed)
//   {"event":"window_start","t":s} {"event":"window_end","t":s}
//   {"event":"progress", ...}      every --progress-seconds (0: never)
//   {"event":"idle"}               appends stopped and replies drained; sessions still open.
//                                  With --wait-close 1 the generator then waits (<= 20 s) for a
//                                  line "close" on stdin, so its parent can measure the relay
//                                  with N idle live sessions, before it closes them.
//   {"event":"report", ...}        the results; then the process exits 0.
// Times in the report are milliseconds unless the key says otherwise.

import { readFileSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { createInterface } from 'node:readline';
import WebSocket from 'ws';

function parseArgs(argv) {
  const args = {
    url: '', sessions: 10, rate: 50, chunkBytes: 960, rampSeconds: 1, warmupSeconds: 2,
    durationSeconds: 10, tokensFile: '', sessionLifetime: 0, handshakeTimeout: 10,
    waitClose: 0, progressSeconds: 0,
  };
  const names = {
    '--url': 'url', '--sessions': 'sessions', '--rate': 'rate', '--chunk-bytes': 'chunkBytes',
    '--ramp-seconds': 'rampSeconds', '--warmup-seconds': 'warmupSeconds',
    '--duration-seconds': 'durationSeconds', '--tokens-file': 'tokensFile',
    '--session-lifetime': 'sessionLifetime', '--handshake-timeout': 'handshakeTimeout',
    '--wait-close': 'waitClose', '--progress-seconds': 'progressSeconds',
  };
  for (let i = 2; i < argv.length; i += 2) {
    const name = names[argv[i]];
    if (name === undefined) throw new Error(`unknown argument ${argv[i]}`);
    args[name] = typeof args[name] === 'number' ? Number(argv[i + 1]) : argv[i + 1];
  }
  if (!args.url) throw new Error('--url is required');
  return args;
}

// A log-bucketed histogram of durations: 1 % wide buckets from 1 µs, exact min/max/mean.
class Histogram {
  constructor() {
    this.ratio = Math.log(1.01);
    this.buckets = new Float64Array(2400); // 1.01^2400 µs ≈ 23 000 s
    this.count = 0; this.sum = 0; this.min = Infinity; this.max = 0;
  }
  record(ms) {
    const us = ms * 1000;
    const idx = us < 1 ? 0 : Math.min(this.buckets.length - 1, Math.floor(Math.log(us) / this.ratio));
    this.buckets[idx] += 1;
    this.count += 1; this.sum += ms;
    if (ms < this.min) this.min = ms;
    if (ms > this.max) this.max = ms;
  }
  quantile(q) {
    if (this.count === 0) return null;
    const rank = q * this.count;
    let seen = 0;
    for (let i = 0; i < this.buckets.length; i += 1) {
      seen += this.buckets[i];
      if (seen >= rank && this.buckets[i] > 0) {
        const mid = Math.exp((i + 0.5) * this.ratio) / 1000;
        return Math.min(this.max, Math.max(this.min, mid));
      }
    }
    return this.max;
  }
  summary() {
    if (this.count === 0) return { count: 0 };
    const r = (v) => Math.round(v * 1000) / 1000;
    return {
      count: this.count, mean: r(this.sum / this.count), min: r(this.min),
      p50: r(this.quantile(0.5)), p90: r(this.quantile(0.9)), p99: r(this.quantile(0.99)),
      p999: r(this.quantile(0.999)), max: r(this.max),
    };
  }
}

const args = parseArgs(process.argv);
const tokens = args.tokensFile
  ? readFileSync(args.tokensFile, 'utf8').split('\n').filter((line) => line.length > 0)
  : [];
const audio = randomBytes(args.chunkBytes).toString('base64');
const APPEND = Buffer.from(
  `{"type":"input_audio_buffer.append","event_id":"event_bench_append","audio":"${audio}"}`);
const AUDIO_TAIL = Buffer.from(audio.slice(-32));
const DELTA_TYPE = Buffer.from('"response.output_audio.delta"');
const EVENT_ID_T = Buffer.from('"event_id":"t');
const interval = 1000 / args.rate;
const now = () => performance.now();

const t0 = now();
const windowStart = t0 + (args.rampSeconds + args.warmupSeconds) * 1000;
const windowEnd = windowStart + args.durationSeconds * 1000;
let appending = true; // false once the window ended: no new appends, no reopened sessions

const rtt = new Histogram();
// The worst round trip of each second of the window: shows whether tail latency comes in
// periodic stalls (timers, housekeeping) or spread out.
const rttMaxBySecond = new Float64Array(Math.max(1, Math.ceil(args.durationSeconds)));
const rttAll = new Histogram();
// Slow round trips of the window with the wall-clock time of their send (epoch ms), so that
// bench/probe.py can line them up with what the gateway was doing then (bounded).
const SLOW_RTT_MS = 5;
const slowRtts = [];
const sendLag = new Histogram();
const closeTime = new Histogram(); // our close() → 'close' event (the closing handshake)
const handshakes = [];
const handshakeFailures = {};
const unexpectedCloses = {};
const stats = {
  sent: 0, sentWindow: 0, received: 0, receivedWindow: 0, deltas: 0, badDeltas: 0,
  usageEvents: 0, opened: 0, closedByUs: 0, maxBuffered: 0, unmatched: 0,
};
const live = new Set();

function fail(table, key) { table[key] = (table[key] || 0) + 1; }

function openSession(slot) {
  if (!appending) return;
  const token = tokens.length ? tokens[slot % tokens.length] : 'bench-no-token';
  const started = now();
  const ws = new WebSocket(args.url, {
    headers: { Authorization: `Bearer ${token}`, 'User-Agent': 'realtime-gateway-bench' },
    perMessageDeflate: false, handshakeTimeout: args.handshakeTimeout * 1000,
    maxPayload: 16 * 1024 * 1024,
  });
  const session = { ws, slot, fifo: [], timer: null, isOpen: false, ending: false, settled: false };
  const settle = () => {
    if (!session.settled) { session.settled = true; firstHandshakes.done(slot); }
  };

  ws.on('unexpected-response', (req, res) => {
    fail(handshakeFailures, `http_${res.statusCode}`);
    res.resume();
    req.destroy();
  });
  ws.on('error', (err) => {
    if (!session.isOpen) fail(handshakeFailures, err.code || err.message.slice(0, 40));
  });
  ws.on('open', () => {
    handshakes.push(now() - started);
    stats.opened += 1;
    session.isOpen = true;
    live.add(session);
    settle();
    schedule(session);
    if (args.sessionLifetime > 0) {
      session.lifetime = setTimeout(() => endSession(session, true), args.sessionLifetime * 1000);
    }
  });
  ws.on('message', (data, isBinary) => {
    const t = now();
    stats.received += 1;
    if (t >= windowStart && t < windowEnd) stats.receivedWindow += 1;
    if (isBinary) return;
    const head = data.subarray(0, 80);
    if (head.indexOf(DELTA_TYPE) >= 0) {
      stats.deltas += 1;
      const tail = data.subarray(data.length - 2 - AUDIO_TAIL.length, data.length - 2);
      if (!tail.equals(AUDIO_TAIL)) stats.badDeltas += 1;
      const sentAt = session.fifo.shift();
      if (sentAt === undefined) { stats.unmatched += 1; return; }
      const ms = t - sentAt;
      rttAll.record(ms);
      if (sentAt >= windowStart && sentAt < windowEnd) {
        rtt.record(ms);
        const second = Math.floor((sentAt - windowStart) / 1000);
        if (ms > rttMaxBySecond[second]) rttMaxBySecond[second] = ms;
        if (ms > SLOW_RTT_MS && slowRtts.length < 20000) {
          // [send, round trip, arrival at the upstream (event_id "t<epoch ms>", or null)]
          const at = head.indexOf(EVENT_ID_T);
          const arrived = at >= 0
            ? Number(data.subarray(at + EVENT_ID_T.length, at + EVENT_ID_T.length + 15)) : NaN;
          slowRtts.push([Math.round((performance.timeOrigin + sentAt) * 10) / 10,
            Math.round(ms * 100) / 100, Number.isFinite(arrived) ? arrived : null]);
        }
      }
    } else if (data.indexOf('"response.done"') >= 0) {
      stats.usageEvents += 1;
    }
  });
  ws.on('close', (code) => {
    settle();
    if (session.closeStarted !== undefined) closeTime.record(now() - session.closeStarted);
    live.delete(session);
    if (session.timer) clearTimeout(session.timer);
    if (session.lifetime) clearTimeout(session.lifetime);
    if (session.isOpen && !session.ending) fail(unexpectedCloses, String(code));
    if (session.isOpen && session.ending && session.reopen) openSession(slot);
    // A soak slot whose handshake failed tries again a second later (while appending).
    if (!session.isOpen && args.sessionLifetime > 0) setTimeout(() => openSession(slot), 1000);
  });
}

function schedule(session) {
  let next = now() + Math.random() * interval; // spread sends of different sessions
  const tick = () => {
    if (!appending || session.ending || session.ws.readyState !== WebSocket.OPEN) return;
    const t = now();
    sendLag.record(Math.max(0, t - next));
    session.fifo.push(t);
    session.ws.send(APPEND, { binary: false });
    stats.sent += 1;
    if (t >= windowStart && t < windowEnd) stats.sentWindow += 1;
    const buffered = session.ws.bufferedAmount;
    if (buffered > stats.maxBuffered) stats.maxBuffered = buffered;
    next += interval;
    session.timer = setTimeout(tick, Math.max(0, next - now()));
  };
  session.timer = setTimeout(tick, Math.max(0, next - now()));
}

function endSession(session, reopen) {
  if (session.ending) return;
  session.ending = true;
  session.closeStarted = now();
  session.reopen = reopen && appending;
  stats.closedByUs += 1;
  if (session.timer) clearTimeout(session.timer);
  session.ws.close(1000, 'bench done');
}

// Resolves once every slot's first handshake completed or failed.
const firstHandshakes = (() => {
  const pending = new Set(Array.from({ length: args.sessions }, (_, i) => i));
  let resolve;
  const promise = new Promise((r) => { resolve = r; });
  if (pending.size === 0) resolve();
  return {
    promise,
    done(slot) { if (pending.delete(slot) && pending.size === 0) resolve(); },
  };
})();

const emit = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');
const sinceStart = () => Math.round(now() - t0) / 1000;
const delay = (ms) => new Promise((r) => setTimeout(r, Math.max(0, ms)));

async function waitFor(predicate, ms) {
  const deadline = now() + ms;
  while (!predicate() && now() < deadline) await delay(10);
}

async function waitForCloseCommand(ms) {
  const lines = createInterface({ input: process.stdin });
  await Promise.race([
    new Promise((resolve) => {
      lines.on('line', (line) => { if (line.trim() === 'close') resolve(); });
      lines.on('close', resolve);
    }),
    delay(ms),
  ]);
  lines.close();
}

async function main() {
  const hardStop = setTimeout(() => {
    emit({ event: 'error', message: 'hard stop: the run overran its bound' });
    process.exit(3);
  }, (args.rampSeconds + args.warmupSeconds + args.durationSeconds + 60) * 1000);
  hardStop.unref();

  for (let slot = 0; slot < args.sessions; slot += 1) {
    const at = t0 + (slot * args.rampSeconds * 1000) / args.sessions;
    setTimeout(() => openSession(slot), Math.max(0, at - now()));
  }
  await Promise.race([firstHandshakes.promise, delay(windowStart - now())]);
  emit({ event: 'opened', t: sinceStart(), live: live.size, handshakes: handshakes.length });

  let progress = null;
  if (args.progressSeconds > 0) {
    let last = { sent: 0, received: 0, t: now() };
    progress = setInterval(() => {
      const t = now();
      const dt = (t - last.t) / 1000;
      emit({
        event: 'progress', t: sinceStart(), live: live.size, opened: stats.opened,
        sent_per_s: Math.round((stats.sent - last.sent) / dt),
        received_per_s: Math.round((stats.received - last.received) / dt),
        handshake_failures: handshakeFailures, unexpected_closes: unexpectedCloses,
      });
      last = { sent: stats.sent, received: stats.received, t };
    }, args.progressSeconds * 1000);
  }

  await delay(windowStart - now());
  emit({ event: 'window_start', t: sinceStart(), live: live.size });
  await delay(windowEnd - now());
  appending = false;
  emit({ event: 'window_end', t: sinceStart(), live: live.size });
  if (progress) clearInterval(progress);

  await waitFor(() => [...live].every((s) => s.fifo.length === 0), 5000);
  const inFlight = [...live].reduce((n, s) => n + s.fifo.length, 0);
  emit({ event: 'idle', t: sinceStart(), live: live.size });
  if (args.waitClose) await waitForCloseCommand(20000);

  for (const session of [...live]) endSession(session, false);
  await waitFor(() => live.size === 0, 5000);

  const windowSeconds = args.durationSeconds;
  emit({
    event: 'report',
    config: {
      url: args.url.replace(/\?.*$/, ''), sessions: args.sessions, rate: args.rate,
      chunk_bytes: args.chunkBytes, append_bytes: APPEND.length, ramp_seconds: args.rampSeconds,
      warmup_seconds: args.warmupSeconds, duration_seconds: args.durationSeconds,
      session_lifetime: args.sessionLifetime,
    },
    window_seconds: windowSeconds,
    appends_sent: stats.sent,
    appends_in_window: stats.sentWindow,
    received: stats.received,
    received_in_window: stats.receivedWindow,
    deltas: stats.deltas,
    bad_deltas: stats.badDeltas,
    unmatched_deltas: stats.unmatched,
    usage_events: stats.usageEvents,
    unanswered_appends: inFlight,
    messages_per_s: Math.round((stats.sentWindow + stats.receivedWindow) / windowSeconds),
    appends_per_s: Math.round(stats.sentWindow / windowSeconds),
    offered_appends_per_s: args.sessions * args.rate,
    rtt_ms: rtt.summary(),
    rtt_all_ms: rttAll.summary(),
    rtt_max_ms_by_second: Array.from(rttMaxBySecond, (v) => Math.round(v * 100) / 100),
    slow_rtts: slowRtts,
    send_lag_ms: sendLag.summary(),
    close_ms: closeTime.summary(),
    handshake_ms: (() => {
      const h = new Histogram();
      for (const ms of handshakes) h.record(ms);
      return h.summary();
    })(),
    sessions_opened: stats.opened,
    handshake_failures: handshakeFailures,
    unexpected_closes: unexpectedCloses,
    max_buffered_bytes: stats.maxBuffered,
  });
  // Exit once stdout has taken the report: a report larger than the pipe's buffer would be
  // cut short by an immediate exit.
  process.stdout.write('', () => process.exit(0));
}

main().catch((err) => {
  emit({ event: 'error', message: String(err && err.stack ? err.stack : err) });
  process.exit(2);
});
