#!/usr/bin/env bash
# Activation sparsity on a non-ReLU model (SwiGLU SmolLM2, GeGLU Gemma 3), end to end with our
# own tools: profile on the Austen novels other than Pride and Prejudice, train predictors for
# each target sparsity, then measure on austen-pp-100k.txt perplexity and decode speed, sparse
# and dense in the same run.
#
#   scripts/sparsity-experiment.sh [MODEL]        default: models/SmolLM2-135M-Instruct.Q4_1.gguf
#
# For each target sparsity it measures three ways of running: `predicted` (the trained
# predictors choose the neurons, then the activity threshold zeroes the rest), `threshold` (no
# predictor: every gate and up, the down projection skips |h| <= t), and the original dense model.
#
# Environment: SPARSITIES ("0.3 0.4 0.5 0.6 0.7"), THREADS (2), MAX_TOKENS (profile tokens,
# 20000), SAMPLES (4096), RECALL (0.99), TRAIN_FLAGS (extra train-predictor flags, default
# "--max-hidden 256 --epochs 10"), PPL_CTX (512), N_GEN (128), REPS (3), SKIP_TG (set: no decode
# speeds), POWERINFER_BIN (the binary; default: build and use target/release/powerinfer), WORK
# (output dir, default <repo>/target/sparsity-<model name>).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
model=${1:-$repo/models/SmolLM2-135M-Instruct.Q4_1.gguf}
sparsities=${SPARSITIES:-0.3 0.4 0.5 0.6 0.7}
threads=${THREADS:-2}
max_tokens=${MAX_TOKENS:-20000}
samples=${SAMPLES:-4096}
train_flags=${TRAIN_FLAGS:---max-hidden 256 --epochs 10}
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
calib=(-f "$austen/austen-mansfieldpark.txt" -f "$austen/austen-northangerabbey.txt"
    -f "$austen/austen-persuasion.txt" -f "$austen/austen-sensesensibility.txt")
eval_text=$austen/austen-pp-100k.txt
bin=${POWERINFER_BIN:-$repo/target/release/powerinfer}

[ -n "${POWERINFER_BIN:-}" ] || (cd "$repo" && cargo build --release -q -p powerinfer-cli)
mkdir -p "$work"
out=$work/results.jsonl
: >"$out"

ppl() { # model [flags...] -> the final perplexity
    local m=$1
    shift
    "$bin" perplexity -m "$m" -f "$eval_text" -c "$ctx" -t "$threads" "$@" 2>/dev/null |
        sed -n 's/^Final estimate: PPL = \([0-9.]*\).*/\1/p'
}
tg() { # model [flags...] -> decode tokens/s (median)
    local m=$1
    shift
    "$bin" bench -m "$m" -p 0 -n "$n_gen" -r "$reps" -t "$threads" --json "$@" 2>/dev/null |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["tg_tok_s"])'
}

for s in $sparsities; do
    prof=$work/profile-s$s.safetensors
    pwri=$work/$name.s$s.powerinfer.gguf
    if [ ! -f "$pwri" ]; then
        t0=$(date +%s)
        "$bin" profile -m "$model" "${calib[@]}" -o "$prof" --sparsity "$s" \
            --samples "$samples" --max-tokens "$max_tokens" -t "$threads"
        t1=$(date +%s)
        # shellcheck disable=SC2086 # TRAIN_FLAGS is a list of flags
        "$bin" train-predictor -m "$model" --profile "$prof" -o "$pwri" --recall "$recall" \
            -t "$threads" $train_flags | tee "$work/train-s$s.txt"
        t2=$(date +%s)
        echo "sparsity $s: profile $((t1 - t0)) s, training $((t2 - t1)) s" >&2
        rm -f "$prof"
    fi
    echo "== sparsity $s ($(cut -d' ' -f1-3 /proc/loadavg))" >&2
    [ -n "${dense_ppl:-}" ] || dense_ppl=$(ppl "$model")
    pred_ppl=$(ppl "$pwri")
    thr_ppl=$(ppl "$pwri" --sparse-mode threshold)
    # decode speeds back to back, so that they share the machine's state (SKIP_TG=1: none)
    if [ -n "${SKIP_TG:-}" ]; then
        dense_tg=0 pred_tg=0 thr_tg=0 dense_tg2=0
    else
        dense_tg=$(tg "$model")
        pred_tg=$(tg "$pwri")
        thr_tg=$(tg "$pwri" --sparse-mode threshold)
        dense_tg2=$(tg "$model")
    fi
    # the training's held-out recall, precision and shares of neurons predicted / truly active
    read -r q_recall q_precision q_pred q_true < <(sed -n 's/^mean: recall \([0-9.]*\), precision \([0-9.]*\), predicted \([0-9.]*\)%, active \([0-9.]*\)%.*/\1 \2 \3 \4/p' "$work/train-s$s.txt")
    echo "{\"sparsity\":$s,\"dense_ppl\":$dense_ppl,\"pred_ppl\":$pred_ppl,\"thr_ppl\":$thr_ppl,\"dense_tg\":$dense_tg,\"dense_tg2\":$dense_tg2,\"pred_tg\":$pred_tg,\"thr_tg\":$thr_tg,\"recall\":$q_recall,\"precision\":$q_precision,\"predicted_pct\":$q_pred,\"true_pct\":$q_true}" | tee -a "$out"
done

python3 - "$out" "$name" "$threads" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("| target sparsity | PPL dense | PPL threshold | change | PPL predicted | change | predicted active (recall) | tg dense tok/s | tg threshold | tg predicted |")
print("|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    d = r["dense_ppl"]
    dtg = (r["dense_tg"] + r["dense_tg2"]) / 2 or float("nan")
    print(f'| {r["sparsity"]:.0%} | {d:.3f} | {r["thr_ppl"]:.3f} | {100 * (r["thr_ppl"] / d - 1):+.2f}% | '
          f'{r["pred_ppl"]:.3f} | {100 * (r["pred_ppl"] / d - 1):+.2f}% | {r["predicted_pct"]:.1f}% ({r["recall"]:.3f}) | '
          f'{dtg:.1f} | {r["thr_tg"]:.1f} ({r["thr_tg"] / dtg:.2f}x) | {r["pred_tg"]:.1f} ({r["pred_tg"] / dtg:.2f}x) |')
print(f"\n({sys.argv[2]}, {sys.argv[3]} threads; perplexity on austen-pp-100k.txt, ctx 512)")
EOF
