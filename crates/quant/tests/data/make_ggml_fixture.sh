#!/usr/bin/env bash
# Regenerates tests/data/ggml_reference.json from the real ggml, using the llama.cpp that
# benches/llamacpp builds (crate llama-cpp-sys-2, pinned). Run benches/llamacpp's build first:
#   (cd benches/llamacpp && cargo build --release)
# then, from the repository root: crates/quant/tests/data/make_ggml_fixture.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../../.." && pwd)
src=$(ls -d ~/.cargo/registry/src/*/llama-cpp-sys-2-0.1.161/llama.cpp/ggml | head -1)
# The build directory that holds the static libraries (cargo may keep several).
out=$(dirname "$(ls -d "$root"/benches/llamacpp/target/release/build/llama-cpp-sys-2-*/out/lib/libggml-cpu.a | head -1)")/..
out=$(cd "$out" && pwd)
tmp=$(mktemp -d)
cc -O2 -I"$src/include" -c "$here/ggml_oracle.c" -o "$tmp/oracle.o"
c++ "$tmp/oracle.o" -o "$tmp/oracle" "$out/lib/libggml-cpu.a" "$out/lib/libggml-base.a" -fopenmp -lm
"$tmp/oracle" > "$here/ggml_reference.json"
rm -rf "$tmp"
echo "wrote $here/ggml_reference.json ($(stat -c %s "$here/ggml_reference.json") bytes)"
