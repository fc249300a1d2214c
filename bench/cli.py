"""`voicefast bench voice | engine | spec | turns | wer | asr | tts | phone | rolling | tools | grammar | soak |
overload | stall`: each benchmark lives in its own module, imported lazily."""

from __future__ import annotations

import importlib
import sys

BENCHES: dict[str, tuple[str, str]] = {
    "voice": ("bench.voice:main", "voice-to-voice latency of a Realtime server with simulated callers"),
    "engine": ("bench.engine:main", "LLM decode engine throughput and latency"),
    "spec": ("bench.spec_decode:main", "speculative decoding on customer-service conversations (CPU)"),
    "turns": ("bench.turns:main", "end-of-turn decisions offline: cut rate vs wait per eagerness and witness"),
    "wer": ("bench.asr_wer:main", "ASR word error rate per voice, rate and phone band, with/without context prompt"),
    "asr": ("bench.audio:asr_main", "streaming ASR latency and WER"),
    "tts": ("bench.audio:tts_main", "TTS time to first audio and real-time factor"),
    "rolling": ("bench.rolling:main", "failed calls across a rolling restart of replicas behind HAProxy"),
    "phone": ("bench.phone:main", "telephone band: ASR WER 8 kHz mu-law vs wideband, VAD splits, TTS downsampling"),
    "tools": ("bench.tool_calls:main", "forced tool calls on random schemas: constrained vs free validity"),
    "grammar": ("bench.grammar_mask:main", "cost of schema-constrained decoding per decode step"),
    "soak": ("bench.soak:main", "long run of mixed sessions; RSS, fds, threads, tasks, KV blocks over time"),
    "overload": ("bench.overload:main", "connection storms at max_sessions; running callers' latency before/during"),
    "stall": ("bench.stall:main", "how long other sessions wait while one sends the biggest appends"),
}


def _usage() -> str:
    return "\n".join(["usage: voicefast bench <benchmark> [options]", "", "benchmarks:"]
                     + [f"  {name:8} {desc}" for name, (_, desc) in BENCHES.items()]
                     + ["", "`voicefast bench <benchmark> --help` lists each one's options."])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in BENCHES:
        print(f"voicefast bench: unknown benchmark {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    mod_name, fn_name = BENCHES[name][0].split(":")
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name and (mod_name == e.name or mod_name.startswith(e.name + ".")):
            print(f"voicefast bench {name}: {mod_name} is not part of this build yet", file=sys.stderr)
        else:
            print(f"voicefast bench {name}: a dependency is missing: {e}\n"
                  f"    pip install 'voicefast[bench]'", file=sys.stderr)
        return 2
    fn = getattr(mod, fn_name, None)
    if fn is None:
        print(f"voicefast bench {name}: {mod_name} has no {fn_name}() entry point", file=sys.stderr)
        return 2
    return int(fn(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
