// Microphone -> 24 kHz PCM16 frames of 20 ms (480 samples), posted to the main thread with their RMS level.
// Runs on the audio rendering thread; `sampleRate` is the AudioContext's rate (24 kHz when the browser honours
// our request, else resampled here by linear interpolation, with state carried across blocks).
const OUT_RATE = 24000;
const FRAME = 480; // 20 ms at 24 kHz

class CaptureProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.step = sampleRate / OUT_RATE; // input samples per output sample
    this.t = 0; // read position relative to the current block start (>= -1: -1 means the previous block's last sample)
    this.last = 0;
    this.frame = new Int16Array(FRAME);
    this.n = 0;
    this.sumSq = 0;
    this.frames = 0;
  }

  push(x) {
    const v = Math.max(-1, Math.min(1, x));
    this.frame[this.n++] = v < 0 ? v * 0x8000 : v * 0x7fff;
    this.sumSq += v * v;
    if (this.n === FRAME) {
      const rms = Math.sqrt(this.sumSq / FRAME);
      this.frames++;
      // transfer the buffer: no copy, and a fresh one for the next frame
      this.port.postMessage({ type: "frame", pcm: this.frame.buffer, rms, seq: this.frames }, [this.frame.buffer]);
      this.frame = new Int16Array(FRAME);
      this.n = 0;
      this.sumSq = 0;
    }
  }

  process(inputs) {
    const input = inputs[0] && inputs[0][0];
    if (!input) return true;
    const N = input.length;
    if (this.step === 1) {
      for (let i = 0; i < N; i++) this.push(input[i]);
      return true;
    }
    let t = this.t;
    while (t <= N - 1) {
      const i = Math.floor(t);
      const f = t - i;
      const a = i < 0 ? this.last : input[i];
      const b = i + 1 < N ? input[i + 1] : a;
      this.push(a + (b - a) * f);
      t += this.step;
    }
    this.t = t - N;
    this.last = input[N - 1];
    return true;
  }
}

registerProcessor("voicefast-capture", CaptureProcessor);
