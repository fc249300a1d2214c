"""Build the real Stack: one AsyncLLMEngine (or ProcessLLMEngine), one WhisperASR, the Piper voice(s) and the Silero
VAD model, each with an explicit CPU thread budget so the stages do not fight over a small machine's cores."""

from __future__ import annotations

import asyncio
import functools
import logging
import os

from voicefast.config import ServerConfig
from voicefast.stack import Stack

log = logging.getLogger("voicefast.loader")


def budget_threads(opts: ServerConfig) -> None:
    """Cap OpenMP/MKL pools before any native library starts them (they default to every core). torch's own
    intra-op count is set by the engine (EngineConfig.cpu_threads); ctranslate2, Piper and Silero get theirs
    through their constructors below."""
    os.environ.setdefault("OMP_NUM_THREADS", str(opts.torch_threads))
    os.environ.setdefault("MKL_NUM_THREADS", str(opts.torch_threads))


def engine_config(opts: ServerConfig):
    """The LLM engine's EngineConfig for these server options."""
    from llm_engine import EngineConfig

    return EngineConfig(model=opts.llm_model, device=opts.device, max_num_seqs=opts.max_num_seqs,
                        num_kv_blocks=opts.num_kv_blocks, max_waiting=opts.max_waiting,
                        max_model_len=opts.max_model_len, cpu_threads=opts.torch_threads,
                        tensor_parallel=opts.tensor_parallel)


def load_stack(opts: ServerConfig) -> Stack:
    """Load every model (raises voicefast.assets.MissingAssetError naming the install command)."""
    from voicefast.assets import resolve_asr, resolve_llm, resolve_tts, resolve_turn, resolve_vad

    # Fail fast, before seconds of model loading, when any asset is missing.
    for resolve, spec in ((resolve_vad, opts.vad_model), (resolve_turn, opts.turn_model), (resolve_asr, opts.asr_model),
                          (resolve_llm, opts.llm_model), (resolve_tts, opts.tts_voice)):
        resolve(spec)
    budget_threads(opts)
    from audio.asr import WhisperASR
    from audio.text_chunker import TextChunker
    from audio.transcriber import StreamingTranscriber
    from audio.tts import PiperTTS
    from audio.turn_model import SmartTurnModel
    from audio.vad import SileroVadModel, VadParams, VadStream
    from llm_engine import AsyncLLMEngine, ProcessLLMEngine, SamplingParams

    vad_model = SileroVadModel(opts.vad_model)
    turn_model = SmartTurnModel(resolve_turn(opts.turn_model).path, threads=1, workers=opts.turn_workers)
    asr_device = "cpu" if opts.device == "cpu" and opts.asr_device == "auto" else opts.asr_device
    asr = WhisperASR(opts.asr_model, device=asr_device, cpu_threads=opts.asr_cpu_threads, workers=opts.asr_workers)
    tts = PiperTTS(opts.tts_voice, threads=opts.tts_threads)
    # The engine on a thread of this process, or (engine_process) in its own process: the same API; there
    # `engine.engine` is an llm_engine.engine_process.EngineInfo (device, max_model_len, ...), not the LLMEngine.
    engine = (ProcessLLMEngine if opts.engine_process else AsyncLLMEngine)(engine_config(opts))

    def vad_factory(td) -> VadStream:
        # server_vad: silence_duration_ms ends the turn, early silence starts the speculative reply; semantic_vad:
        # early silence is the end-of-turn check, the stop is the eagerness' maximum silence (voicefast.turns).
        policy = td.policy(**opts.turn_policy_kw())
        return VadStream(vad_model, VadParams(threshold=min(max(td.threshold, 0.01), 0.99),
                                              prefix_padding_ms=td.prefix_padding_ms,
                                              silence_duration_ms=policy.end_silence_ms,
                                              early_silence_ms=policy.early_ms))

    # An utterance ends at max_utterance_s (the session's rule); the transcriber's own cap is above it (plus the
    # longest prefix padding) so it never drops audio in practice, yet is bounded on its own.
    max_audio_ms = int(min(opts.max_utterance_s, opts.max_input_buffer_s) * 1000) + 5000 + 1000

    def transcriber_factory(submit_kw: dict | None = None) -> StreamingTranscriber:
        return StreamingTranscriber(asr, partial_interval_ms=max(1, opts.asr_partial_interval_ms),
                                    max_audio_ms=max(max_audio_ms, 10_000), submit_kw=submit_kw)

    def sampling(*, temperature: float, max_tokens: int, grammar=None) -> SamplingParams:
        return SamplingParams(temperature=temperature, top_p=0.9 if temperature > 0 else 1.0, max_tokens=max_tokens,
                              grammar=grammar)

    inner = engine.engine
    desc = {"vad": f"Silero VAD ({vad_model.path})", "turn": f"Smart Turn ({turn_model.path})",
            "asr": f"{asr.name} ({asr.device}, {asr.compute_type})",
            "llm": f"{getattr(inner, 'model_name', None) or opts.llm_model or 'embedded SmolLM2'} "
                   f"({getattr(inner, 'device', opts.device)}, max_model_len {inner.max_model_len}"
                   f"{', own process' if opts.engine_process else ''})",
            "tts": f"Piper {tts.name} ({tts.sample_rate_hz} Hz)"}
    return Stack(engine=engine, asr=asr, voices={tts.name: tts}, vad_factory=vad_factory,
                 chunker_factory=functools.partial(TextChunker, first_max_words=opts.tts_first_phrase_words),
                 sampling_params=sampling,
                 transcriber_factory=transcriber_factory if opts.asr_partial_interval_ms > 0 else None,
                 turn_model=turn_model,
                 max_model_len=inner.max_model_len, tts_workers=opts.tts_workers,
                 vad_threads=opts.vad_threads, description=desc)


async def warm_up(stack: Stack, instructions: str) -> None:
    """One tiny request per stage so the first caller does not pay for lazy initialisation, and the persona's
    system prompt lands in the engine's prefix cache (every session's first turn then reuses it). On CUDA the
    engine first runs its own warm-up (LLMEngine.warm_up: every kernel specialization compiled; it leaves nothing
    behind, so the persona request after it is what stays cached)."""
    import numpy as np

    inner = getattr(stack.engine, "engine", None)
    if inner is not None and getattr(inner, "tokenizer", None) is not None:
        # llguidance's view of the tokenizer takes ~0.5-3 s to build: do it now, off the event loop, rather than
        # inside the first tool-using response (it would stall every session's loop).
        await asyncio.to_thread(inner.grammar_compiler)
    engine_warm_up = getattr(stack.engine, "warm_up", None)
    if engine_warm_up is not None:  # CUDA: compile every kernel specialization now, not in the first callers' steps
        from llm_engine.warm_up import EngineBusy

        try:
            await asyncio.to_thread(engine_warm_up)
        except EngineBusy as e:  # a caller's request got in first; any other failure (CUDA, a bug) stops start-up
            log.warning("engine warm-up skipped: %s", e)
    sp = stack.sampling_params(temperature=0.0, max_tokens=1)
    async for _ in stack.engine.generate(sp, messages=[{"role": "system", "content": instructions},
                                                       {"role": "user", "content": "Hello"}]):
        pass
    await stack.asr.transcribe_async(np.zeros(8000, np.float32))
    if stack.turn_model is not None:
        await asyncio.wrap_future(stack.turn_model.submit(np.zeros(8000, np.float32)))
    for voice in stack.voice_names:  # the response path: chunker -> Piper on the TTS pool -> resampler -> frames
        speech = stack.speech_output(voice, 24_000, 100)
        speech.say("Hello.")
        async for _ in speech.frames():
            pass


def log_gc_pauses(threshold_ms: float = 100.0):
    """Log every garbage collection that takes threshold_ms or longer (its generation, time, objects found): a
    collection stops every Python thread of the server (engine steps, the event loop), so a slow one shows up as a
    stall of all sessions at once. Returns the callback (gc.callbacks.remove() it to stop)."""
    import gc
    import time

    started = [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        ms = (time.perf_counter() - started[0]) * 1e3
        if ms >= threshold_ms:
            log.warning("garbage collection of generation %d took %.0f ms (%d objects collected; every thread "
                        "waited)", info.get("generation", -1), ms, info.get("collected", 0))

    gc.callbacks.append(on_gc)
    return on_gc


def freeze_heap() -> int:
    """Move every object alive now (the models, tokenizers, compiled kernels, imported modules) into the garbage
    collector's permanent generation and return how many. CPython's full collection walks every tracked object
    with every thread stopped: with the stack loaded, one took ~1 s here (`gc.collect(2)` after load_stack on the
    2-core VM) and the server's engine steps and event loop stalled whenever one ran (issue 14: 0.6-1.9 s steps
    on the H200 host). Frozen, a full collection only walks what sessions allocated since. Call once, after the
    warm-up, before serving."""
    import gc

    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()

