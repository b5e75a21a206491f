// The realtime-gateway voice demo (served by `realtime-gateway dev` at /).
//
// Start: ask the dev backend for a short-lived client secret (GET /_dev/secret, loopback
// only: it mints an access token and exchanges it at POST /v1/realtime/client_secrets),
// open /v1/realtime with the subprotocols ["realtime", "openai-insecure-api-key.<ek>"]
// (the seed flow: the browser never holds the access token), wait for
// session.created, send session.update (PCM16 24 kHz in and out, server VAD, input
// transcription), then stream the microphone as input_audio_buffer.append events.
// Replies are played gaplessly by an AudioWorklet; transcripts of both sides are shown live.
// Stop: close with 1000. Errors (error events, failed responses, close codes and reasons)
// are shown on the page. The secret is kept in memory only and never printed.
//
// With the "WebRTC" switch on, the same conversation is a WebRTC call instead: the page
// POSTs its SDP offer to /v1/realtime/calls (Authorization: Bearer <ek_>), the events go
// over the "oai-events" data channel and the audio over the call's tracks (the browser's
// own Opus codec, echo cancellation and playback); Stop hangs the call up.

const WIRE_RATE = 24000;
const $ = (id) => document.getElementById(id);

const ui = {
  start: $("start"),
  stop: $("stop"),
  status: $("status"),
  level: $("level"),
  model: $("model"),
  transcript: $("transcript"),
  errors: $("errors"),
  log: $("log"),
  webrtc: $("webrtc"),
};

let call = null; // the running conversation: {ws, context, stream, capture, player, ...}

function setStatus(state, text) {
  ui.status.dataset.state = state;
  ui.status.textContent = text || state;
  document.body.dataset.state = state;
}

function log(line) {
  const time = new Date().toLocaleTimeString();
  ui.log.textContent += `${time}  ${line}\n`;
  ui.log.scrollTop = ui.log.scrollHeight;
}

function showError(text) {
  const div = document.createElement("div");
  div.className = "error";
  div.textContent = text;
  ui.errors.appendChild(div);
  log(`error: ${text}`);
}

// One bubble per conversation item, created in the order the items appear.
function bubble(itemId, role) {
  let el = ui.transcript.querySelector(`[data-item="${CSS.escape(itemId)}"]`);
  if (!el) {
    el = document.createElement("div");
    el.className = `msg ${role} pending`;
    el.dataset.item = itemId;
    el.innerHTML = '<div class="who"></div><div class="text"></div>';
    el.querySelector(".who").textContent = role === "user" ? "you" : "assistant";
    el.querySelector(".text").textContent = role === "user" ? "…" : "";
    ui.transcript.appendChild(el);
  }
  return el;
}

function setText(itemId, role, text, final) {
  const el = bubble(itemId, role);
  el.querySelector(".text").textContent = text;
  if (final) el.classList.remove("pending");
}

function appendText(itemId, role, delta) {
  const el = bubble(itemId, role);
  const text = el.querySelector(".text");
  const placeholder = !el.dataset.streamed; // the user bubble's "…" until text arrives
  el.dataset.streamed = "yes";
  text.textContent = (placeholder ? "" : text.textContent) + delta;
  if (role === "assistant") el.classList.remove("pending");
}

function toBase64(buffer) {
  const bytes = new Uint8Array(buffer);
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(binary);
}

function fromBase64(text) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes.buffer;
}

async function fetchSecret() {
  const response = await fetch("/_dev/secret", { cache: "no-store" });
  if (!response.ok) {
    let detail = `HTTP ${response.status}`;
    try { detail = (await response.json()).error.message || detail; } catch (_) { /* text */ }
    throw new Error(`the backend could not mint a client secret: ${detail}`);
  }
  return response.json();
}

async function openAudio() {
  const stream = await navigator.mediaDevices.getUserMedia({
    audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true,
             autoGainControl: true },
  });
  let context;
  try {
    context = new AudioContext({ sampleRate: WIRE_RATE, latencyHint: "interactive" });
    await context.audioWorklet.addModule("/static/audio-worklets.js");
    context.createMediaStreamSource(stream).connect(new GainNode(context, { gain: 0 }));
  } catch (err) {
    // Some browsers refuse to mix a microphone into a context of another rate:
    // fall back to the device rate and let the worklets resample.
    if (context) await context.close();
    context = new AudioContext({ latencyHint: "interactive" });
    await context.audioWorklet.addModule("/static/audio-worklets.js");
  }
  const source = context.createMediaStreamSource(stream);
  const capture = new AudioWorkletNode(context, "pcm16-capture",
    { processorOptions: { chunkMs: 40 } });
  const mute = new GainNode(context, { gain: 0 });
  source.connect(capture).connect(mute).connect(context.destination);
  const player = new AudioWorkletNode(context, "pcm16-player", { outputChannelCount: [1] });
  player.connect(context.destination);
  await context.resume();
  return { stream, context, capture, player };
}

function sessionConfig() {
  return {
    type: "realtime",
    output_modalities: ["audio"],
    audio: {
      input: {
        format: { type: "audio/pcm", rate: WIRE_RATE },
        transcription: { model: "gpt-4o-mini-transcribe" },
        turn_detection: { type: "server_vad", create_response: true, interrupt_response: true },
      },
      output: { format: { type: "audio/pcm", rate: WIRE_RATE } },
    },
  };
}

function send(event) {
  if (!call) return;
  if (call.channel) {
    if (call.channel.readyState === "open") call.channel.send(JSON.stringify(event));
  } else if (call.ws.readyState === WebSocket.OPEN) {
    call.ws.send(JSON.stringify(event));
  }
}

function onEvent(event) {
  switch (event.type) {
    case "session.created":
      log(`session.created (${event.session && event.session.model})`);
      send({ type: "session.update", session: sessionConfig() });
      break;
    case "session.updated":
      if (!call.ready) log("session.updated: listening");
      call.ready = true;
      setStatus("live", "live — speak");
      break;
    case "input_audio_buffer.speech_started":
      bubble(event.item_id, "user");
      if (call.player) call.player.port.postMessage({ type: "clear" }); // barge-in: stop at once
      break;
    case "input_audio_buffer.committed":
      bubble(event.item_id, "user");
      break;
    case "conversation.item.input_audio_transcription.delta":
      appendText(event.item_id, "user", event.delta || "");
      break;
    case "conversation.item.input_audio_transcription.completed":
      setText(event.item_id, "user", event.transcript || "", true);
      break;
    case "conversation.item.input_audio_transcription.failed":
      setText(event.item_id, "user", "(transcription failed)", true);
      showError(`transcription failed: ${event.error && event.error.message}`);
      break;
    case "response.output_audio_transcript.delta":
    case "response.output_text.delta":
      appendText(event.item_id, "assistant", event.delta || "");
      break;
    case "response.output_audio_transcript.done":
      setText(event.item_id, "assistant", event.transcript || "", true);
      break;
    case "response.output_text.done":
      setText(event.item_id, "assistant", event.text || "", true);
      break;
    case "response.output_audio.delta": {
      if (!call.player) break; // a call plays its audio track instead
      const pcm = fromBase64(event.delta);
      call.player.port.postMessage({ type: "audio", pcm }, [pcm]);
      break;
    }
    case "output_audio_buffer.stopped":
      log("reply played (WebRTC audio track)");
      break;
    case "response.done": {
      const r = event.response || {};
      const usage = r.usage ? `, ${r.usage.total_tokens} tokens` : "";
      log(`response.done: ${r.status}${usage}`);
      if (r.status === "failed") {
        const err = r.status_details && r.status_details.error;
        showError(`response failed: ${(err && err.message) || "no details"}`);
      }
      break;
    }
    case "error": {
      const e = event.error || {};
      showError(`${e.code || e.type || "error"}: ${e.message || ""}`);
      break;
    }
    default:
      break;
  }
}

async function startCall(grant) {
  const stream = await navigator.mediaDevices.getUserMedia({
    audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true,
             autoGainControl: true },
  });
  const pc = new RTCPeerConnection();
  const channel = pc.createDataChannel("oai-events");
  const speaker = new Audio();
  speaker.autoplay = true;
  pc.ontrack = (e) => { speaker.srcObject = e.streams[0] || new MediaStream([e.track]); };
  pc.addTrack(stream.getAudioTracks()[0], stream);
  call = { pc, channel, stream, speaker, ready: false, player: null };
  ui.stop.disabled = false;
  channel.onopen = () => log("call connected (data channel oai-events open)");
  channel.onmessage = ({ data }) => {
    let event;
    try {
      event = JSON.parse(data);
    } catch {
      showError("a data channel message was not JSON");
      return;
    }
    onEvent(event);
  };
  pc.onconnectionstatechange = () => {
    if (!call || call.pc !== pc) return;
    const state = pc.connectionState;
    if (state === "failed" || state === "closed") {
      const clean = call.stopping;
      if (!clean) showError(`call ${state}`);
      setStatus(clean ? "closed" : "error", `call ${state}`);
      finish();
    }
  };
  await pc.setLocalDescription(await pc.createOffer());
  const response = await fetch(`/v1/realtime/calls?model=${encodeURIComponent(grant.model)}`, {
    method: "POST",
    headers: { Authorization: `Bearer ${grant.value}`, "Content-Type": "application/sdp" },
    body: pc.localDescription.sdp,
  });
  if (response.status !== 201) {
    let message = `HTTP ${response.status}`;
    try {
      const body = await response.json();
      message += `: ${body.error.code}: ${body.error.message}`;
    } catch {
      // not a JSON error body; the status says enough
    }
    throw new Error(`the gateway refused the call (${message})`);
  }
  call.callId = (response.headers.get("Location") || "").split("/").pop();
  call.token = grant.value;
  log(`call ${call.callId} answered`);
  await pc.setRemoteDescription({ type: "answer", sdp: await response.text() });
}

async function start() {
  ui.start.disabled = true;
  ui.errors.textContent = "";
  setStatus("connecting", "connecting…");
  if (ui.webrtc.checked) {
    try {
      const grant = await fetchSecret();
      ui.model.textContent = grant.model;
      await startCall(grant);
    } catch (err) {
      showError(`could not start the call: ${err.message || err}`);
      setStatus("error", "not started");
      finish();
      ui.start.disabled = false;
    }
    return;
  }
  let grant, audio;
  try {
    grant = await fetchSecret();
    audio = await openAudio();
  } catch (err) {
    showError(`could not start: ${err.message || err}`);
    setStatus("error", "not started");
    if (audio) stopAudio(audio);
    ui.start.disabled = false;
    return;
  }
  ui.model.textContent = grant.model;
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const url = `${scheme}://${location.host}${grant.path}?model=${encodeURIComponent(grant.model)}`;
  const ws = new WebSocket(url, ["realtime", `openai-insecure-api-key.${grant.value}`]);
  call = { ws, ready: false, ...audio };
  ui.stop.disabled = false;

  audio.capture.port.onmessage = ({ data }) => {
    ui.level.style.width = `${Math.min(100, Math.round(data.rms * 400))}%`;
    if (call && call.ws === ws && call.ready) {
      send({ type: "input_audio_buffer.append", audio: toBase64(data.pcm) });
    }
  };
  audio.player.port.onmessage = ({ data }) => {
    if (data.type === "idle") log(`reply played: ${Math.round(data.playedMs)} ms without a gap`);
  };
  ws.onopen = () => log(`connected (subprotocol echoed: ${ws.protocol ? "yes" : "no"})`);
  ws.onerror = () => log("WebSocket error (the close code follows)");
  ws.onmessage = (message) => {
    if (typeof message.data !== "string") return;
    let event;
    try {
      event = JSON.parse(message.data);
    } catch {
      showError("a server frame was not JSON");
      return;
    }
    onEvent(event);
  };
  ws.onclose = (close) => {
    const reason = close.reason ? ` ${close.reason}` : "";
    const text = `closed: ${close.code}${reason}`;
    log(text);
    const clean = close.code === 1000 && call && call.stopping;
    if (!clean) showError(`connection ${text}`);
    setStatus(clean ? "closed" : "error", text);
    finish();
  };
}

function stopAudio(audio) {
  audio.stream.getTracks().forEach((track) => track.stop());
  if (audio.context) audio.context.close();
  if (audio.pc) audio.pc.close();
}

function finish() {
  if (!call) return;
  stopAudio(call);
  call = null;
  ui.level.style.width = "0";
  ui.start.disabled = false;
  ui.stop.disabled = true;
}

async function hangUp(current) {
  if (current.callId) {
    try {
      await fetch(`/v1/realtime/calls/${encodeURIComponent(current.callId)}/hangup`, {
        method: "POST", headers: { Authorization: `Bearer ${current.token}` },
      });
    } catch (err) {
      showError(`hang-up failed: ${err.message || err}`);
    }
  }
  log("call ended");
  setStatus("closed", "call ended");
  finish();
}

function stop() {
  if (!call) return;
  call.stopping = true;
  ui.stop.disabled = true;
  if (call.pc) {
    hangUp(call);
    return;
  }
  call.ws.close(1000, "user stopped");
}

ui.start.addEventListener("click", start);
ui.stop.addEventListener("click", stop);
setStatus("idle", "idle");
