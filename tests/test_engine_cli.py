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


@pytest.mark.slow
def test_generate_json_schema_output_validates(tmp_path):
    import json

    import jsonschema

    schema = {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 40},
        "population_millions": {"type": "integer", "minimum": 0, "maximum": 100}},
              "required": ["city", "population_millions"], "additionalProperties": False}
    f = tmp_path / "schema.json"
    f.write_text(json.dumps(schema))
    r = subprocess.run([sys.executable, "-m", "voicefast", "generate", "--prompt", "The capital of France, as JSON.",
                        "--chat", "--max-tokens", "60", "--json-schema", str(f)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    jsonschema.validate(json.loads(r.stdout), schema)


def test_generate_json_schema_file_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    for path, msg in ((tmp_path / "missing.json", "No such file"), (bad, "Expecting property name")):
        r = subprocess.run([sys.executable, "-m", "voicefast", "generate", "--prompt", "x", "--json-schema",
                            str(path)], capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and "--json-schema" in r.stderr and msg in r.stderr, r.stderr
