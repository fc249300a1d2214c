// The voicefast demo page: Talk -> microphone frames over the Realtime WebSocket; live transcripts; reply audio
// through a jitter-buffered AudioWorklet; barge-in (stop playback + conversation.item.truncate); latency readout.
// Test hooks live on window.voicefast (real counters from the worklets and the socket; nothing is faked).
import { base64FromInt16, createAudioContext, int16FromBase64, Mic, MicError, Player, RATE } from "./audio.js";
import { drawLatencyChart } from "./chart.js";
import { RealtimeConnection } from "./realtime.js";
import { ToolRunner, TOOLS } from "./tools.js";

const $ = (id) => document.getElementById(id);
const AUDIO_DELTA = new Set(["response.output_audio.delta", "response.audio.delta"]);
const AUDIO_DONE = new Set(["response.output_audio.done", "response.audio.done"]);
const TEXT_DELTA = new Set(["response.output_audio_transcript.delta", "response.audio_transcript.delta",
  "response.output_text.delta", "response.text.delta"]);

const vf = {
  state: "idle", // idle | connecting | listening | thinking | speaking | reconnecting | error
  status: "",
  error: null,
  counters: { micFrames: 0, framesSent: 0, eventsReceived: 0, audioDeltas: 0, responses: 0, bargeIns: 0,
    truncatesSent: 0, turns: 0 },
  playback: null, // the playback worklet's own counters: chunksReceived, samplesPlayed, queued, playing, ...
  lastLatencyMs: null,
  lastLatencyAnchor: null, // "mic" (local level drop) | "server-vad" (speech_stopped's audio_end_ms, as sent)
  latencies: [],
  tokS: null,
  timings: null,
  userTranscript: "",
  assistantTranscript: "",
  lastTruncate: null,
  events: [],
  session: null,
};
window.voicefast = vf;

let ctx = null;
let mic = null;
let player = null;
let conn = null;
let userSpeaking = false;
let activeItem = null; // assistant item with audio queued or playing
const cancelledItems = new Set();
const bubbles = new Map(); // item_id -> element
let sessionSent = false;
const preOpen = []; // append events captured before the socket was open
const PRE_OPEN_FRAMES = 50; // 1 s of 20 ms frames
let pendingTurn = null; // {anchorMs, anchor, item}
const level = { floor: 0.003, lastVoicedAt: 0, lastVoicedRms: 0 };

// ---- UI helpers ----
function setState(s, status = vf.status) {
  vf.state = s;
  vf.status = status;
  const el = $("state");
  el.textContent = s;
  el.dataset.state = s;
  el.className = `pill state-${s}`;
  $("status").textContent = status;
}

function showError(msg) {
  vf.error = msg || null;
  const el = $("error");
  el.textContent = msg;
  el.hidden = !msg;
}

function bubble(item, who) {
  let el = bubbles.get(item);
  if (!el) {
    const hint = document.querySelector(".log .hint");
    if (hint) hint.remove();
    el = document.createElement("div");
    el.className = `msg ${who}`;
    el.dataset.item = item || "";
    el.innerHTML = `<span class="who">${who === "user" ? "you" : "agent"}</span><span class="text"></span>`
      + `<span class="partial"></span>`;
    $("log").appendChild(el);
    bubbles.set(item, el);
  }
  return el;
}

function scrollLog() {
  const log = $("log");
  log.scrollTop = log.scrollHeight;
}

let instructionsEdited = false;  // set on user input; until then the server's own instructions stand

function settings() {
  return {
    instructions: instructionsEdited ? $("instructions").value.trim() : "",
    voice: $("voice").value,
    turn: $("turn").value, // "semantic_vad:<eagerness>" (the server's default) | "server_vad"
    silenceMs: Math.max(100, Math.min(3000, parseInt($("silence").value, 10) || 500)),
    apiKey: $("apikey").value.trim(),
    server: $("server").value.trim(),
  };
}

function sessionUpdate() {
  const s = settings();
  const output = { format: { type: "audio/pcm", rate: RATE } };
  if (s.voice) output.voice = s.voice;
  const session = {
    type: "realtime",
    output_modalities: ["audio"],
    audio: {
      input: { format: { type: "audio/pcm", rate: RATE }, turn_detection: turnDetection(s) },
      output,
    },
  };
  if (s.instructions) session.instructions = s.instructions;
  session.tools = TOOLS; // answered by the page (tools.js); the model decides when to call them
  session.tool_choice = "auto";
  return { type: "session.update", session };
}

function turnDetection(s) {
  // semantic_vad: the server's end-of-turn model and the transcript decide when you are done (eagerness sets how
  // long it waits at a pause); server_vad: a fixed silence window.
  if (s.turn === "server_vad") {
    return { type: "server_vad", silence_duration_ms: s.silenceMs, interrupt_response: true, create_response: true };
  }
  const eagerness = s.turn.split(":")[1] || "auto";
  return { type: "semantic_vad", eagerness, interrupt_response: true, create_response: true };
}

// When each 20 ms of input audio was captured, by its end in the session's input clock (ms since the session's
// first appended sample): maps a server audio_end_ms back to local time.
let sentMs = 0;
let sentLog = []; // [endMs, capturedAt]
const SENT_LOG_MAX = 3000; // 60 s

function sendFrame(ev, capturedAt) {
  if (!conn.send(ev)) return;
  vf.counters.framesSent++;
  sentMs += 20;
  sentLog.push([sentMs, capturedAt]);
  if (sentLog.length > SENT_LOG_MAX) sentLog.shift();
}

function capturedAtAudioMs(ms) {
  const hit = sentLog.find(([endMs]) => endMs >= ms);
  return hit ? hit[1] - (hit[0] - ms) : null;
}

// ---- microphone ----
function onMicFrame(pcm, rms) {
  vf.counters.micFrames++;
  const now = performance.now();
  // local end-of-speech detector: a slowly rising noise floor; a frame is voiced well above it
  level.floor = rms < level.floor ? Math.max(rms, 1e-4) : level.floor * 1.002;
  if (rms > Math.max(0.01, level.floor * 4)) {
    level.lastVoicedAt = now;
    level.lastVoicedRms = rms;
  }
  $("level").style.width = `${Math.min(100, Math.sqrt(rms) * 250)}%`;
  const ev = { type: "input_audio_buffer.append", audio: base64FromInt16(pcm) };
  if (conn && conn.isOpen && sessionSent) {
    sendFrame(ev, now);
  } else {
    // keep the last second said while (re)connecting, so the first words aren't lost
    preOpen.push([ev, now]);
    if (preOpen.length > PRE_OPEN_FRAMES) preOpen.shift();
  }
}

function flushPreOpen() {
  for (const [ev, t] of preOpen.splice(0)) sendFrame(ev, t);
}

// ---- playback ----
function onPlayerEvent(m) {
  vf.playback = player.stats;
  if (m.type === "started") {
    if (cancelledItems.has(m.item)) return;
    if (pendingTurn && !pendingTurn.done) recordLatency(m.item);
    if (!userSpeaking) setState("speaking", "");
  } else if (m.type === "drained") {
    if (m.item === activeItem) activeItem = null;
    if (!userSpeaking && vf.state === "speaking") setState("listening", "");
  }
  const s = player.stats;
  $("buffer").textContent = `${Math.round((s.queued / RATE) * 1000)} ms queued, ${s.underruns} underruns`;
}

function recordLatency(item) {
  const t = pendingTurn;
  t.done = true;
  const ms = Math.round(performance.now() - t.anchorMs);
  vf.lastLatencyMs = ms;
  vf.lastLatencyAnchor = t.anchor;
  vf.latencies.push({ ms, anchor: t.anchor, item });
  if (vf.latencies.length > 30) vf.latencies.shift();
  $("latency").textContent = String(ms);
  $("latency-anchor").textContent = t.anchor === "mic"
    ? "your mic went quiet → first reply audio played"
    : "server end of speech (speech_stopped's audio_end_ms) → first reply audio played";
  drawLatencyChart($("chart"), vf.latencies);
}

async function bargeIn() {
  const item = activeItem;
  if (!item || !player) return;
  activeItem = null;
  cancelledItems.add(item);
  const r = await player.clear(); // playback stops now; the worklet says how much of the item was heard
  vf.counters.bargeIns++;
  const playedMs = r.item === item ? Math.floor((r.playedSamples * 1000) / RATE) : 0;
  const ev = { type: "conversation.item.truncate", item_id: item, content_index: 0, audio_end_ms: playedMs };
  if (conn && conn.send(ev)) {
    vf.counters.truncatesSent++;
    vf.lastTruncate = { item_id: item, audio_end_ms: playedMs, at: performance.now() };
  }
  const el = bubbles.get(item);
  if (el) el.classList.add("truncated");
}

// ---- tools ----
const tools = new ToolRunner((ev) => Boolean(conn && conn.send(ev)), (name, args, answer) => {
  vf.toolCalls.push({ name, arguments: args, answer });
  const el = document.createElement("div");
  el.className = "msg tool";
  el.innerHTML = '<span class="who">tool</span><span class="text"></span>';
  el.querySelector(".text").textContent = `${name}(${args}) → ${JSON.stringify(answer)}`;
  $("log").appendChild(el);
  scrollLog();
});
vf.toolCalls = [];

// ---- server events ----
function onEvent(ev) {
  vf.counters.eventsReceived++;
  const t = ev.type || "";
  tools.onEvent(ev);
  if (!AUDIO_DELTA.has(t)) {
    vf.events.push(t);
    if (vf.events.length > 300) vf.events.shift();
  }
  if (t === "session.created" || t === "session.updated") {
    vf.session = ev.session || null;
    // Show the server's system prompt (its built-in persona holds the business facts the small model
    // needs); only a prompt the user edited is ever sent back.
    const box = $("instructions");
    if (vf.session && typeof vf.session.instructions === "string" && !instructionsEdited) {
      box.value = vf.session.instructions;
    }
  } else if (t === "input_audio_buffer.speech_started") {
    userSpeaking = true;
    setState("listening", "hearing you…");
    bargeIn();
    const el = bubble(ev.item_id, "user");
    el.querySelector(".partial").textContent = "…";
    scrollLog();
  } else if (t === "input_audio_buffer.speech_stopped") {
    userSpeaking = false;
    vf.counters.turns++;
    const now = performance.now();
    const s = settings();
    const wait = s.turn === "server_vad" ? s.silenceMs : 2500; // the longest the server may wait after speech
    // Prefer the client-side anchor: when the local mic level last dropped, if it falls in this utterance; else
    // the server's end of speech (audio_end_ms), mapped to when that audio was captured here.
    const micEnd = level.lastVoicedAt;
    const plausible = micEnd > 0 && now - micEnd < wait + 1500 && now - micEnd >= 0;
    const serverEnd = capturedAtAudioMs(ev.audio_end_ms);
    pendingTurn = plausible ? { anchorMs: micEnd, anchor: "mic", done: false }
      : { anchorMs: serverEnd !== null ? serverEnd : now - wait, anchor: "server-vad", done: false };
    setState("thinking", "");
  } else if (t === "conversation.item.input_audio_transcription.delta") {
    const el = bubble(ev.item_id, "user");
    const p = el.querySelector(".partial");
    p.textContent = (p.textContent === "…" ? "" : p.textContent) + (ev.delta || "");
    vf.userTranscript = el.querySelector(".text").textContent + p.textContent;
    scrollLog();
  } else if (t === "conversation.item.input_audio_transcription.completed") {
    const el = bubble(ev.item_id, "user");
    el.querySelector(".text").textContent = (ev.transcript || "").trim() || "(nothing recognised)";
    el.querySelector(".partial").textContent = "";
    vf.userTranscript = el.querySelector(".text").textContent;
    scrollLog();
  } else if (TEXT_DELTA.has(t)) {
    if (cancelledItems.has(ev.item_id)) return;
    const el = bubble(ev.item_id, "assistant");
    el.querySelector(".text").textContent += ev.delta || "";
    vf.assistantTranscript = el.querySelector(".text").textContent;
    scrollLog();
  } else if (AUDIO_DELTA.has(t)) {
    if (cancelledItems.has(ev.item_id) || !player) return;
    vf.counters.audioDeltas++;
    activeItem = ev.item_id;
    player.push(ev.item_id, int16FromBase64(ev.delta || ""));
  } else if (AUDIO_DONE.has(t)) {
    if (player && !cancelledItems.has(ev.item_id)) player.end(ev.item_id);
  } else if (t === "response.created") {
    if (!userSpeaking) setState("thinking", "");
  } else if (t === "response.done") {
    vf.counters.responses++;
    const r = ev.response || {};
    const tm = (r.metadata && r.metadata.voicefast_timings) || null;
    if (tm) {
      vf.timings = tm;
      if (tm.llm_tok_s != null) {
        vf.tokS = tm.llm_tok_s;
        $("toks").textContent = Number(tm.llm_tok_s).toFixed(1);
      }
      const f = (k) => (tm[k] == null ? "–" : Math.round(tm[k]));
      $("stages").textContent = `eot ${f("end_of_turn_delay_ms")} · asr ${f("asr_final_ms")} · `
        + `llm ${f("llm_ttft_ms")} · tts ${f("tts_first_audio_ms")} ms`;
    }
    if (r.status === "failed") showError(`response failed: ${JSON.stringify(r.status_details || {})}`);
    if (!activeItem && !userSpeaking && vf.state === "thinking") setState("listening", "");
  } else if (t === "error") {
    const e = ev.error || {};
    showError(`server error: ${e.message || e.type || "unknown"}`);
  }
}

// ---- start / stop ----
function serverUrl() {
  const s = settings().server;
  if (s) return s;
  return `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/realtime`;
}

async function start() {
  showError("");
  setState("connecting", "starting audio…");
  $("talk").setAttribute("aria-pressed", "true");
  $("talk").textContent = "Stop";
  try {
    ctx = await createAudioContext();
    player = new Player(ctx, onPlayerEvent);
    vf.playback = player.stats;
    mic = new Mic(ctx, onMicFrame);
    await mic.start();
  } catch (e) {
    const msg = e instanceof MicError ? e.message : `audio could not start: ${e && e.message}`;
    await stop();
    setState("error", "");
    showError(msg);
    return;
  }
  conn = new RealtimeConnection(serverUrl(), settings().apiKey, {
    onEvent,
    onOpen: () => {
      showError("");
      conn.send(sessionUpdate());
      sessionSent = true;
      sentMs = 0; // a new session: its input-audio clock starts again
      sentLog = [];
      flushPreOpen();
      setState("listening", "");
    },
    onStatus: (status, detail) => {
      if (status !== "open") sessionSent = false;
      if (status === "reconnecting") {
        setState("reconnecting", detail);
        showError(`${detail.split(";")[0]} (${serverUrl()})`);
      } else if (status === "failed") {
        setState("error", "");
        showError(detail);
      } else if (status === "connecting") {
        setState("connecting", "connecting…");
      }
    },
  });
  conn.open();
}

/** Re-acquire the microphone (a new getUserMedia; with Chromium's fake capture file this restarts the file). */
async function restartMic() {
  if (!ctx) return;
  if (mic) mic.stop();
  mic = new Mic(ctx, onMicFrame);
  await mic.start();
}

async function stop() {
  if (conn) conn.close();
  if (mic) mic.stop();
  if (ctx) await ctx.close().catch(() => {});
  conn = mic = ctx = player = null;
  sessionSent = false;
  preOpen.length = 0;
  activeItem = null;
  userSpeaking = false;
  $("talk").setAttribute("aria-pressed", "false");
  $("talk").textContent = "Talk";
  setState("idle", "");
}

async function loadVoices() {
  try {
    const r = await fetch("/v1/voices");
    if (!r.ok) return;
    const body = await r.json();
    const list = Array.isArray(body) ? body : body.data || body.voices || [];
    const sel = $("voice");
    for (const v of list) {
      const id = typeof v === "string" ? v : v.id || v.name;
      if (!id) continue;
      const o = document.createElement("option");
      o.value = id;
      o.textContent = (typeof v === "string" ? v : v.name || v.id) + (id === body.default ? " (default)" : "");
      sel.appendChild(o);
    }
  } catch {
    // no voice list (e.g. page opened from another server): keep "server default"
  }
}

$("instructions").addEventListener("input", () => { instructionsEdited = true; });
$("ask-order").addEventListener("click", () => {
  if (conn && conn.isOpen) tools.askAboutOrder($("order-number").value.trim() || "A1234");
});
$("talk").addEventListener("click", () => (conn || ctx ? stop() : start()));
$("apply").addEventListener("click", () => {
  if (conn && conn.isOpen) conn.send(sessionUpdate());
});
const qs = new URLSearchParams(location.search);
if (qs.get("server")) $("server").value = qs.get("server");
$("server").placeholder = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/realtime`;
drawLatencyChart($("chart"), []);
loadVoices();
vf.start = start;
vf.stop = stop;
vf.restartMic = restartMic;
vf.ready = true;
