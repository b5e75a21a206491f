// AudioWorklet processors of the realtime-gateway voice demo (loaded with
// audioWorklet.addModule). Realtime `audio/pcm` is PCM16, 24 kHz, mono, little-endian.
// The page asks for a 24 kHz AudioContext, so no resampling happens in Chromium; where a
// browser runs the context at another rate, both processors resample linearly.

const WIRE_RATE = 24000;

// Microphone → PCM16 at 24 kHz. Posts {pcm: ArrayBuffer (Int16 LE), rms: 0..1} every
// `chunkMs` milliseconds of audio (default 40 ms).
class Pcm16Capture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const chunkMs = (options.processorOptions && options.processorOptions.chunkMs) || 40;
    this.chunk = new Int16Array(Math.round((WIRE_RATE * chunkMs) / 1000));
    this.filled = 0;
    this.sumSquares = 0;
    this.step = sampleRate / WIRE_RATE; // input samples per output sample
    this.position = 0; // fractional read position into the current input block
    this.previous = 0; // last input sample of the previous block (for interpolation)
  }

  push(value) {
    const clamped = Math.max(-1, Math.min(1, value));
    this.sumSquares += clamped * clamped;
    this.chunk[this.filled++] = clamped < 0 ? clamped * 0x8000 : clamped * 0x7fff;
    if (this.filled === this.chunk.length) {
      const rms = Math.sqrt(this.sumSquares / this.filled);
      const pcm = this.chunk.buffer.slice(0);
      this.port.postMessage({ pcm, rms }, [pcm]);
      this.filled = 0;
      this.sumSquares = 0;
    }
  }

  process(inputs, outputs) {
    const input = inputs[0] && inputs[0][0];
    if (input) {
      if (this.step === 1) {
        for (let i = 0; i < input.length; i++) this.push(input[i]);
      } else {
        let pos = this.position;
        while (pos < input.length) {
          const i = Math.floor(pos);
          const a = i === 0 ? this.previous : input[i - 1];
          const b = input[i];
          const frac = pos - i;
          this.push(a + (b - a) * frac);
          pos += this.step;
        }
        this.position = pos - input.length;
        this.previous = input[input.length - 1];
      }
    }
    for (const output of outputs) for (const channel of output) channel.fill(0);
    return true;
  }
}

// PCM16 24 kHz chunks → speaker, gapless: chunks are queued and played back to back.
// Messages in: {type: "audio", pcm: ArrayBuffer} | {type: "clear"}.
// Messages out: {type: "playing"} when sound starts, {type: "idle", playedMs} when the
// queue runs dry or is cleared.
class Pcm16Player extends AudioWorkletProcessor {
  constructor() {
    super();
    this.queue = [];
    this.offset = 0; // read position (output-rate samples) in queue[0]
    this.playing = false;
    this.played = 0;
    this.port.onmessage = (event) => {
      const message = event.data;
      if (message.type === "audio") {
        this.queue.push(this.toFloat(new Int16Array(message.pcm)));
      } else if (message.type === "clear") {
        this.queue = [];
        this.offset = 0;
        this.setPlaying(false);
      }
    };
  }

  toFloat(samples) {
    const ratio = sampleRate / WIRE_RATE;
    const length = Math.round(samples.length * ratio);
    const out = new Float32Array(length);
    for (let i = 0; i < length; i++) {
      const pos = i / ratio;
      const j = Math.floor(pos);
      const a = samples[j] / 0x8000;
      const b = (j + 1 < samples.length ? samples[j + 1] : samples[j]) / 0x8000;
      out[i] = a + (b - a) * (pos - j);
    }
    return out;
  }

  setPlaying(playing) {
    if (playing === this.playing) return;
    this.playing = playing;
    if (playing) {
      this.played = 0;
      this.port.postMessage({ type: "playing" });
    } else {
      this.port.postMessage({ type: "idle", playedMs: (this.played / sampleRate) * 1000 });
    }
  }

  process(inputs, outputs) {
    const out = outputs[0][0];
    let written = 0;
    while (written < out.length && this.queue.length) {
      const head = this.queue[0];
      const n = Math.min(out.length - written, head.length - this.offset);
      out.set(head.subarray(this.offset, this.offset + n), written);
      written += n;
      this.offset += n;
      if (this.offset === head.length) {
        this.queue.shift();
        this.offset = 0;
      }
    }
    out.fill(0, written);
    for (let c = 1; c < outputs[0].length; c++) outputs[0][c].set(out);
    if (written) this.setPlaying(true);
    this.played += written;
    if (!this.queue.length && written < out.length) this.setPlaying(false);
    return true;
  }
}

registerProcessor("pcm16-capture", Pcm16Capture);
registerProcessor("pcm16-player", Pcm16Player);
