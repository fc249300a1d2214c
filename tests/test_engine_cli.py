"""`voicefast generate` as a subprocess with the real embedded model."""

import subprocess
import sys

import pytest


@pytest.mark.slow
def test_generate_prints_streamed_text():
    r = subprocess.run([sys.executable, "-m", "voicefast", "generate", "--prompt", "What is the capital of France?",
                        "--chat", "--max-tokens", "8"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_generate_rejects_bad_arguments():
    r = subprocess.run([sys.executable, "-m", "voicefast", "generate", "--prompt", "x", "--temperature", "-1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "temperature must be >= 0" in r.stderr


@pytest.mark.slow
def test_chat_multi_turn_until_exit():
    r = subprocess.run([sys.executable, "-m", "voicefast", "chat", "--max-tokens", "6"],
                       input="Hello!\nWhat is 2 plus 2?\nexit\n", capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert len([ln for ln in r.stdout.splitlines() if ln.strip()]) == 2
