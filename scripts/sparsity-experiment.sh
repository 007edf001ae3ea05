#!/usr/bin/env bash
# Activation sparsity on a non-ReLU model (SwiGLU SmolLM2, GeGLU Gemma 3), end to end with our
# own tools: profile on the Austen novels other than Pride and Prejudice, train predictors for
# each target sparsity, then measure on austen-pp-100k.txt perplexity and decode speed, sparse
# and dense in the same run.
#
#   scripts/sparsity-experiment.sh [MODEL]        default: models/SmolLM2-135M-Instruct.Q4_1.gguf
#
# Environment: SPARSITIES ("0.3 0.4 0.5 0.6 0.7"), THREADS (2), MAX_TOKENS (profile tokens,
# 60000), SAMPLES (8192), RECALL (0.99), PPL_CTX (512), N_GEN (128), REPS (3), WORK (output dir,
# default <repo>/target/sparsity-<model name>).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
model=${1:-$repo/models/SmolLM2-135M-Instruct.Q4_1.gguf}
sparsities=${SPARSITIES:-0.3 0.4 0.5 0.6 0.7}
threads=${THREADS:-2}
max_tokens=${MAX_TOKENS:-60000}
samples=${SAMPLES:-8192}
recall=${RECALL:-0.99}
ctx=${PPL_CTX:-512}
n_gen=${N_GEN:-128}
reps=${REPS:-3}
name=$(basename "$model" .gguf)
work=${WORK:-$repo/target/sparsity-$name}
if [ -n "${SHARED_DIR:-}" ]; then
    shared=$SHARED_DIR
elif [ -d "$repo/../shared" ]; then
    shared=$(cd "$repo/../shared" && pwd)
else
    shared=/work/shared
fi
austen=$shared/data/austen
calib=("$austen/austen-mansfieldpark.txt" "$austen/austen-northangerabbey.txt"
    "$austen/austen-persuasion.txt" "$austen/austen-sensesensibility.txt")
eval_text=$austen/austen-pp-100k.txt
bin=$repo/target/release/powerinfer

(cd "$repo" && cargo build --release -q -p powerinfer-cli)
mkdir -p "$work"
out=$work/results.jsonl
: >"$out"

ppl() { # model [flags...] -> the final perplexity
    local m=$1
    shift
    "$bin" perplexity -m "$m" -f "$eval_text" -c "$ctx" -t "$threads" "$@" 2>/dev/null |
        sed -n 's/^Final estimate: PPL = \([0-9.]*\).*/\1/p'
}
tg() { # model -> decode tokens/s (median)
    "$bin" bench -m "$1" -p 0 -n "$n_gen" -r "$reps" -t "$threads" --json 2>/dev/null |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["tg_tok_s"])'
}

for s in $sparsities; do
    prof=$work/profile-s$s.safetensors
    pwri=$work/$name.s$s.powerinfer.gguf
    if [ ! -f "$pwri" ]; then
        t0=$(date +%s)
        "$bin" profile -m "$model" -f "${calib[@]}" -o "$prof" --sparsity "$s" \
            --samples "$samples" --max-tokens "$max_tokens" -t "$threads"
        t1=$(date +%s)
        "$bin" train-predictor -m "$model" --profile "$prof" -o "$pwri" --recall "$recall" \
            -t "$threads" | tee "$work/train-s$s.txt"
        t2=$(date +%s)
        echo "sparsity $s: profile $((t1 - t0)) s, training $((t2 - t1)) s" >&2
    fi
    echo "== sparsity $s ($(cut -d' ' -f1-3 /proc/loadavg))" >&2
    dense_ppl=$(ppl "$model")
    sparse_ppl=$(ppl "$pwri")
    dense_tg=$(tg "$model")
    sparse_tg=$(tg "$pwri")
    # the fraction of FFN neurons the predictors skip on the evaluation text
    quality=$("$bin" perplexity -m "$pwri" -f "$eval_text" -c "$ctx" -t "$threads" \
        --predictor-quality 2>/dev/null | awk '$1 == "all" {print $2, $3, $4, $5}')
    read -r q_recall q_precision q_pred q_true <<<"$quality"
    echo "{\"sparsity\":$s,\"dense_ppl\":$dense_ppl,\"sparse_ppl\":$sparse_ppl,\"dense_tg\":$dense_tg,\"sparse_tg\":$sparse_tg,\"recall\":$q_recall,\"precision\":$q_precision,\"predicted_pct\":$q_pred,\"true_pct\":$q_true}" >>"$out"
done

python3 - "$out" "$name" "$threads" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"| target sparsity | neurons computed | recall | PPL dense | PPL sparse | PPL change | tg dense tok/s | tg sparse tok/s | speed-up |")
print("|---|---|---|---|---|---|---|---|---|")
for r in rows:
    print(f'| {r["sparsity"]:.0%} | {r["predicted_pct"]:.1f}% | {r["recall"]:.3f} | {r["dense_ppl"]:.4f} | '
          f'{r["sparse_ppl"]:.4f} | {100 * (r["sparse_ppl"] / r["dense_ppl"] - 1):+.2f}% | '
          f'{r["dense_tg"]:.1f} | {r["sparse_tg"]:.1f} | {r["sparse_tg"] / r["dense_tg"]:.2f}x |')
print(f"\n({sys.argv[2]}, {sys.argv[3]} threads; perplexity on austen-pp-100k.txt)")
EOF
