#!/usr/bin/env bash
# Sparse vs dense decode and prompt speed on a synthetic LLaMA shape, side by side in one run:
# our sparse path on PowerInfer files at several sparsities, our dense path and llama.cpp on the
# dense twin (the same weights as a plain GGUF).
#
#   scripts/sparse-bench.sh                     llama-7b, q4_0, sparsity 0.5 0.7 0.9 0.95
#
# Environment: SHAPE (llama-7b), TYPE (q4_0), SPARSITIES ("0.5 0.7 0.9 0.95"), THREADS (2),
# REPS (3), N_GEN (32), N_PROMPT (128), SYNTH_DIR (where the synthetic files go, default
# <repo>/target/synth; each 7B file is about 3.9 GB), OUT (results, default
# <repo>/target/sparse-bench.jsonl), LLAMACPP (1: include llama.cpp, needs
# scripts/llamacpp-bench.sh build; 0: skip).
#
# Each round runs the three engines back to back for one sparsity, so the machine's noise hits
# them alike; the table at the end gives ratios within a round. The synthetic files are for
# speed and scale only (random weights, predictors tuned to the sparsity): see crates/synth.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
shape=${SHAPE:-llama-7b}
ty=${TYPE:-q4_0}
sparsities=${SPARSITIES:-0.5 0.7 0.9 0.95}
threads=${THREADS:-2}
reps=${REPS:-3}
n_gen=${N_GEN:-32}
n_prompt=${N_PROMPT:-128}
dir=${SYNTH_DIR:-$repo/target/synth}
out=${OUT:-$repo/target/sparse-bench.jsonl}
use_llamacpp=${LLAMACPP:-1}
bin=$repo/target/release/powerinfer
lcpp=$repo/benches/llamacpp/target/release/llamacpp-bench

(cd "$repo" && cargo build --release -q -p powerinfer-cli)
if [ "$use_llamacpp" = 1 ] && [ ! -x "$lcpp" ]; then
    "$repo/scripts/llamacpp-bench.sh" build
fi
mkdir -p "$dir"
dense=$dir/$shape.$ty.dense.gguf
for s in $sparsities; do
    f=$dir/$shape.$ty.s$s.powerinfer.gguf
    if [ ! -f "$f" ]; then
        extra=()
        [ -f "$dense" ] || extra=(--dense "$dense")
        # One seed for all: the weights are the same in every file, only the predictors differ.
        "$bin" synth --shape "$shape" --type "$ty" --sparsity "$s" --seed 1 -o "$f" "${extra[@]}"
    fi
done

: >"$out"
for s in $sparsities; do
    f=$dir/$shape.$ty.s$s.powerinfer.gguf
    echo "== sparsity $s ($(cut -d' ' -f1-3 /proc/loadavg))" >&2
    r=$("$bin" bench -m "$f" -p "$n_prompt" -n "$n_gen" -r "$reps" -t "$threads" --json 2>/dev/null)
    echo "{\"sparsity\":$s,\"engine\":\"powerinfer-sparse\",\"result\":$r}" >>"$out"
    r=$("$bin" bench -m "$dense" -p "$n_prompt" -n "$n_gen" -r "$reps" -t "$threads" --json 2>/dev/null)
    echo "{\"sparsity\":$s,\"engine\":\"powerinfer-dense\",\"result\":$r}" >>"$out"
    if [ "$use_llamacpp" = 1 ]; then
        r=$("$lcpp" bench -m "$dense" -p "$n_prompt" -n "$n_gen" -r "$reps" -t "$threads" --json 2>/dev/null)
        echo "{\"sparsity\":$s,\"engine\":\"llama.cpp-dense\",\"result\":$r}" >>"$out"
    fi
done

python3 - "$out" "$shape" "$ty" "$threads" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
shape, ty, threads = sys.argv[2:5]
by = {}
for r in rows:
    by.setdefault(r["sparsity"], {})[r["engine"]] = r["result"]
print(f"| sparsity | sparse tg tok/s | dense tg (ours) | llama.cpp tg | tg vs ours dense | tg vs llama.cpp | sparse pp tok/s | dense pp (ours) | pp vs ours dense |")
print("|---|---|---|---|---|---|---|---|---|")
for s in sorted(by):
    e = by[s]
    sp, de = e["powerinfer-sparse"], e["powerinfer-dense"]
    lc = e.get("llama.cpp-dense")
    lctg = f'{lc["tg_tok_s"]:.2f}' if lc else "-"
    lcr = f'{sp["tg_tok_s"] / lc["tg_tok_s"]:.2f}x' if lc else "-"
    print(f'| {s:.0%} | {sp["tg_tok_s"]:.2f} | {de["tg_tok_s"]:.2f} | {lctg} | '
          f'{sp["tg_tok_s"] / de["tg_tok_s"]:.2f}x | {lcr} | {sp["pp_tok_s"]:.1f} | '
          f'{de["pp_tok_s"]:.1f} | {sp["pp_tok_s"] / de["pp_tok_s"]:.2f}x |')
print(f"\n({shape} {ty}, {threads} threads; tg = decode, pp = prompt)")
EOF
"$repo/scripts/plot-sparse-bench.py" "$out" "${out%.jsonl}.svg" "$shape $ty decode, $threads threads"
echo "plot: ${out%.jsonl}.svg" >&2
