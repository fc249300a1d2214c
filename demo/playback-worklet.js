// Reply playback with a small jitter buffer. The main thread posts 24 kHz Float32 chunks tagged with the
// assistant item id; playback of an item starts once PREBUFFER_MS is queued (or its end is known), so a late
// network chunk doesn't click. `clear` (barge-in) flushes everything at once and reports how much of the
// current item was actually played, for conversation.item.truncate.
const IN_RATE = 24000;
const PREBUFFER_MS = 80;

class PlaybackProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.step = IN_RATE / sampleRate; // 24 kHz samples consumed per output sample
    this.prebuffer = (IN_RATE * PREBUFFER_MS) / 1000;
    this.chunks = []; // [{item, pcm: Float32Array}]
    this.offset = 0; // read position (fractional) inside chunks[0]
    this.queued = 0; // 24 kHz samples waiting
    this.playing = false;
    this.ended = new Set(); // items whose last chunk has arrived
    this.item = null; // item currently (or last) played
    this.itemPlayed = 0; // 24 kHz samples of this.item played
    this.stats = { chunksReceived: 0, samplesReceived: 0, samplesPlayed: 0, underruns: 0, cleared: 0 };
    this.quanta = 0;
    this.port.onmessage = (e) => this.onMessage(e.data);
  }

  onMessage(m) {
    if (m.type === "audio") {
      this.chunks.push({ item: m.item, pcm: m.pcm });
      this.queued += m.pcm.length;
      this.stats.chunksReceived++;
      this.stats.samplesReceived += m.pcm.length;
    } else if (m.type === "end") {
      if (m.item === this.item && !this.chunks.some((c) => c.item === m.item)) {
        // everything of this item has already played (the last chunk ran dry before its end was known)
        this.stats.underruns = Math.max(0, this.stats.underruns - 1);
        this.port.postMessage({ type: "drained", item: m.item, ...this.snapshot() });
      } else {
        this.ended.add(m.item);
      }
    } else if (m.type === "clear") {
      const item = this.item;
      const played = this.itemPlayed;
      this.chunks = [];
      this.offset = 0;
      this.queued = 0;
      this.playing = false;
      this.stats.cleared++;
      this.port.postMessage({ type: "cleared", item, playedSamples: played, ...this.snapshot() });
    }
  }

  snapshot() {
    return { ...this.stats, queued: this.queued, playing: this.playing, item: this.item, itemPlayed: this.itemPlayed };
  }

  process(inputs, outputs) {
    const out = outputs[0][0];
    this.quanta++;
    if (!this.playing && this.chunks.length) {
      const head = this.chunks[0].item;
      if (this.queued >= this.prebuffer || this.ended.has(head)) this.playing = true;
    }
    let k = 0;
    if (this.playing) {
      while (k < out.length && this.chunks.length) {
        const c = this.chunks[0];
        if (c.item !== this.item) {
          this.item = c.item;
          this.itemPlayed = 0;
          this.port.postMessage({ type: "started", item: c.item, frame: currentFrame });
        }
        const i = Math.floor(this.offset);
        out[k++] = c.pcm[i];
        this.offset += this.step;
        const used = Math.floor(this.offset) - i;
        this.itemPlayed += used;
        this.stats.samplesPlayed += used;
        this.queued -= used;
        if (this.offset >= c.pcm.length) {
          this.offset -= c.pcm.length;
          this.chunks.shift();
        }
      }
      if (!this.chunks.length) {
        this.playing = false;
        this.queued = 0;
        if (this.ended.has(this.item)) {
          this.ended.delete(this.item);
          this.port.postMessage({ type: "drained", item: this.item, ...this.snapshot() });
        } else {
          this.stats.underruns++;
        }
      }
    }
    for (; k < out.length; k++) out[k] = 0;
    for (let ch = 1; ch < outputs[0].length; ch++) outputs[0][ch].set(out);
    if (this.quanta % 8 === 0) this.port.postMessage({ type: "stats", ...this.snapshot() });
    return true;
  }
}

registerProcessor("voicefast-playback", PlaybackProcessor);
