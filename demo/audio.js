// Main-thread audio: microphone capture and reply playback, each through an AudioWorklet (see *-worklet.js).
export const RATE = 24000;

export async function createAudioContext() {
  let ctx;
  try {
    ctx = new AudioContext({ sampleRate: RATE, latencyHint: "interactive" });
  } catch {
    ctx = new AudioContext({ latencyHint: "interactive" }); // the worklets resample if 24 kHz is refused
  }
  await Promise.all([
    ctx.audioWorklet.addModule(new URL("./capture-worklet.js", import.meta.url)),
    ctx.audioWorklet.addModule(new URL("./playback-worklet.js", import.meta.url)),
  ]);
  if (ctx.state !== "running") await ctx.resume();
  return ctx;
}

export class MicError extends Error {}

/** Microphone -> `onFrame(Int16Array pcm24k, rms)` every 20 ms. */
export class Mic {
  constructor(ctx, onFrame) {
    this.ctx = ctx;
    this.onFrame = onFrame;
    this.stream = null;
    this.node = null;
  }

  async start() {
    try {
      this.stream = await navigator.mediaDevices.getUserMedia({
        audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
      });
    } catch (e) {
      const why = e && e.name === "NotAllowedError" ? "microphone access was denied"
        : e && e.name === "NotFoundError" ? "no microphone was found" : `microphone error: ${e && e.message}`;
      throw new MicError(why);
    }
    const src = this.ctx.createMediaStreamSource(this.stream);
    this.node = new AudioWorkletNode(this.ctx, "voicefast-capture", { numberOfInputs: 1, numberOfOutputs: 0 });
    this.node.port.onmessage = (e) => {
      if (e.data.type === "frame") this.onFrame(new Int16Array(e.data.pcm), e.data.rms);
    };
    src.connect(this.node);
    this.src = src;
  }

  stop() {
    if (this.src) this.src.disconnect();
    if (this.node) this.node.port.onmessage = null;
    if (this.stream) for (const t of this.stream.getTracks()) t.stop();
    this.stream = this.node = this.src = null;
  }
}

/** Reply playback with a jitter buffer; `events` gets "started" / "drained" / "cleared" / "stats" messages. */
export class Player {
  constructor(ctx, onEvent) {
    this.ctx = ctx;
    this.node = new AudioWorkletNode(ctx, "voicefast-playback", { numberOfInputs: 0, outputChannelCount: [1] });
    this.node.connect(ctx.destination);
    this.stats = { chunksReceived: 0, samplesReceived: 0, samplesPlayed: 0, underruns: 0, cleared: 0, queued: 0,
      playing: false, item: null, itemPlayed: 0 };
    this.node.port.onmessage = (e) => {
      const m = e.data;
      if (m.type !== "started") Object.assign(this.stats, m, { type: undefined });
      onEvent(m);
    };
  }

  /** pcm16: Int16Array of 24 kHz samples for assistant item `item`. */
  push(item, pcm16) {
    const f = new Float32Array(pcm16.length);
    for (let i = 0; i < pcm16.length; i++) f[i] = pcm16[i] / 32768;
    this.node.port.postMessage({ type: "audio", item, pcm: f }, [f.buffer]);
  }

  end(item) {
    this.node.port.postMessage({ type: "end", item });
  }

  /** Stop now; resolves with {item, playedSamples} once the worklet has flushed. */
  clear() {
    return new Promise((resolve) => {
      const prev = this.node.port.onmessage;
      this.node.port.onmessage = (e) => {
        prev(e);
        if (e.data.type === "cleared") {
          this.node.port.onmessage = prev;
          resolve(e.data);
        }
      };
      this.node.port.postMessage({ type: "clear" });
    });
  }
}

export function base64FromInt16(pcm) {
  const bytes = new Uint8Array(pcm.buffer, pcm.byteOffset, pcm.byteLength);
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

export function int16FromBase64(b64) {
  const s = atob(b64);
  const bytes = new Uint8Array(s.length & ~1);
  for (let i = 0; i < bytes.length; i++) bytes[i] = s.charCodeAt(i);
  return new Int16Array(bytes.buffer);
}
