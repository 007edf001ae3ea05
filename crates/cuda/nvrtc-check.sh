#!/usr/bin/env bash
# Compile every CUDA kernel of powerinfer-cuda with NVRTC for sm_80 and sm_90. No GPU needed.
#
# Downloads NVIDIA's NVRTC wheel from PyPI (nvidia-cuda-nvrtc, CUDA 13: libnvrtc.so.13 under
# nvidia/cu13/lib) with `pip download` and unpacks it under target/nvrtc (no virtualenv, nothing
# installed system-wide), then runs the NVRTC compile test with POWERINFER_REQUIRE_NVRTC=1, so a
# missing NVRTC fails instead of skipping. With --ptxas it also fetches nvidia-cuda-nvcc and
# assembles the PTX with its ptxas (register and resource checks, per-kernel register counts).
#
# Usage: crates/cuda/nvrtc-check.sh [--ptxas]
# Environment: NVRTC_DIR (unpack directory, default <repo>/target/nvrtc), NVRTC_VERSION (default
# 13.0.88, the CUDA 13.0 of the lent GPU machines' driver; any 13.x compiles the kernels).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
DIR=${NVRTC_DIR:-$ROOT/target/nvrtc}
VERSION=${NVRTC_VERSION:-13.0.88}
WITH_PTXAS=0
[ "${1:-}" = "--ptxas" ] && WITH_PTXAS=1

fetch() { # package: pip-download the wheel and unpack it into $DIR
    local tmp
    tmp=$(mktemp -d)
    python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" "$1"
    python3 -c 'import glob, sys, zipfile
for w in glob.glob(sys.argv[2] + "/*.whl"):
    zipfile.ZipFile(w).extractall(sys.argv[1])' "$DIR" "$tmp"
    rm -rf "$tmp"
}

start=$(date +%s)
mkdir -p "$DIR"
[ -f "$DIR/nvidia/cu13/lib/libnvrtc.so.13" ] || fetch "nvidia-cuda-nvrtc==$VERSION"
if [ "$WITH_PTXAS" = 1 ]; then
    [ -f "$DIR/nvidia/cu13/bin/ptxas" ] || fetch "nvidia-cuda-nvcc==$VERSION"
    chmod +x "$DIR/nvidia/cu13/bin/ptxas"
    export POWERINFER_PTXAS=$DIR/nvidia/cu13/bin/ptxas
fi
lib=$DIR/nvidia/cu13/lib
echo "nvrtc-check: NVRTC in $lib ($(du -sh "$DIR" | cut -f1)); setup took $(($(date +%s) - start)) s"

export POWERINFER_REQUIRE_NVRTC=1
export POWERINFER_NVRTC_LIB="$lib"
cd "$ROOT"
cargo test -p powerinfer-cuda --test nvrtc_compile -- --nocapture
