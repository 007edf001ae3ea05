#!/usr/bin/env bash
# Builds and runs the llama.cpp reference harness (benches/llamacpp): llama.cpp's own source, as
# vendored by the `llama-cpp-sys-2` crate, compiled for this CPU (GGML_NATIVE=ON, OpenMP), driven
# by a small Rust binary. Works on a fresh Debian machine (run as root, or with sudo available).
#
#   scripts/llamacpp-bench.sh build                  install cmake/clang/libclang if missing, build once
#   scripts/llamacpp-bench.sh bench [MODEL...]       pp512 + tg128, 2 threads, 3 reps, JSON per model
#   scripts/llamacpp-bench.sh golden                 greedy continuations of the 5 golden prompts per
#                                                    model, checked against shared/data/golden-*.json;
#                                                    writes crates/generate/tests/data/llamacpp-token-ids.json
#   scripts/llamacpp-bench.sh run ARGS...            run the binary with ARGS (see benches/llamacpp/README.md)
#
# Environment: LLAMACPP_THREADS (default 2), LLAMACPP_REPS (default 3), LLAMACPP_MIN_CPU_SHARE
# (default 0.9), LLAMACPP_MAX_RETRIES (default 5), POWERINFER_MODELS_DIR
# (default <repo>/models), SHARED_DIR (default: ../shared beside the repo, else /work/shared),
# CMAKE_BUILD_PARALLEL_LEVEL (default 2: the machine is shared).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
bench_dir=$repo/benches/llamacpp
bin=$bench_dir/target/release/llamacpp-bench
models=${POWERINFER_MODELS_DIR:-$repo/models}
threads=${LLAMACPP_THREADS:-2}
reps=${LLAMACPP_REPS:-3}
# A timed run in which the benchmark's threads got less than this share of their CPUs (other
# processes took them) is redone, up to LLAMACPP_MAX_RETRIES times per phase; 0 keeps every run.
min_share=${LLAMACPP_MIN_CPU_SHARE:-0.9}
max_retries=${LLAMACPP_MAX_RETRIES:-5}
if [ -n "${SHARED_DIR:-}" ]; then
    shared=$SHARED_DIR
elif [ -d "$repo/../shared" ]; then
    shared=$(cd "$repo/../shared" && pwd)
else
    shared=/work/shared
fi
default_models=("$models/SmolLM2-135M-Instruct.Q4_1.gguf" "$models/gemma-3-270m-q4_k_m.gguf")

install_deps() {
    local missing=()
    command -v cmake >/dev/null || missing+=(cmake)
    command -v clang >/dev/null || missing+=(clang)
    # bindgen needs libclang.so (the unversioned one comes with libclang-dev).
    if ! ls /usr/lib/llvm-*/lib/libclang.so >/dev/null 2>&1 &&
        ! ls /usr/lib/x86_64-linux-gnu/libclang.so >/dev/null 2>&1; then
        missing+=(libclang-dev)
    fi
    command -v g++ >/dev/null || missing+=(g++)
    if [ ${#missing[@]} -gt 0 ]; then
        echo "llamacpp-bench: installing ${missing[*]}" >&2
        local sudo=
        [ "$(id -u)" -eq 0 ] || sudo=sudo
        $sudo apt-get update
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends "${missing[@]}"
    fi
}

build() {
    install_deps
    # `-C target-cpu=native` is what makes llama-cpp-sys-2 configure llama.cpp with GGML_NATIVE=ON
    # (its build.rs reads target-cpu from CARGO_ENCODED_RUSTFLAGS); without it ggml is built for
    # the baseline x86-64 ISA and is several times slower.
    (cd "$bench_dir" &&
        RUSTFLAGS="-C target-cpu=native" \
            CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
            cargo build --release -j "${CARGO_BUILD_JOBS:-2}")
}

ensure_built() {
    # Incremental: seconds when nothing changed; rebuilds the harness after an edit.
    build >&2
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
build)
    build
    ;;
bench)
    ensure_built
    [ $# -gt 0 ] || set -- "${default_models[@]}"
    for m in "$@"; do
        "$bin" bench -m "$m" -p 512 -n 128 -t "$threads" -r "$reps" \
            --min-cpu-share "$min_share" --max-retries "$max_retries" --json
    done
    ;;
golden)
    ensure_built
    out=$repo/crates/generate/tests/data/llamacpp-token-ids.json
    mkdir -p "$(dirname "$out")"
    "$bin" golden -t "$threads" -o "$out" \
        "$models/SmolLM2-135M-Instruct.Q4_1.gguf" "$shared/data/golden-llamacpp-SmolLM2-135M-Instruct.Q4_1.json" \
        "$models/gemma-3-270m-q4_k_m.gguf" "$shared/data/golden-llamacpp-gemma-3-270m-q4_k_m.json"
    ;;
run)
    ensure_built
    "$bin" "$@"
    ;;
*)
    sed -n '2,17p' "$0" >&2
    exit 2
    ;;
esac
