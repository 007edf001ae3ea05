#!/usr/bin/env python3
"""Generate crates/quant/tests/data/reference.json: independent reference values from the
`gguf` Python package (gguf-py, from llama.cpp), used by tests/reference.rs.

  pip install gguf numpy
  python3 crates/quant/tests/data/make_fixture.py [models_dir]

- "dequant": the first rows of real tensors (raw block bytes) and gguf.quants.dequantize's f32
  output for them (Q4_1 / Q8_0 from SmolLM2-135M-Instruct.Q4_1.gguf; Q5_0 / Q8_0 / Q4_K / Q6_K
  from gemma-3-270m-q4_k_m.gguf).
- "quant": seeded random f32 rows and gguf.quants.quantize's bytes for them (the types gguf-py
  can quantize: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, BF16, and F16 via numpy).
All f32 data is stored as little-endian hex so the comparison is bit-exact.
"""
import json
import os
import sys

import numpy as np
from gguf import GGUFReader, GGMLQuantizationType as T
from gguf import quants

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "..", "..", "..", "models")

PICKS = {
    "SmolLM2-135M-Instruct.Q4_1.gguf": [
        ("blk.0.ffn_down.weight", 2),   # Q4_1, rows of 1536
        ("blk.0.ffn_gate.weight", 1),   # Q4_1, rows of 576
        ("token_embd.weight", 2),       # Q8_0, rows of 576
    ],
    "gemma-3-270m-q4_k_m.gguf": [
        ("blk.0.attn_q.weight", 2),        # Q5_0, rows of 640
        ("blk.0.attn_v.weight", 1),        # Q8_0
        ("blk.0.attn_output.weight", 2),   # Q4_K, rows of 1024
        ("blk.0.ffn_down.weight", 2),      # Q6_K, rows of 2048
    ],
}


def hexf32(a):
    return np.ascontiguousarray(a, dtype="<f4").tobytes().hex()


def main():
    out = {"dequant": [], "quant": []}
    for fname, picks in PICKS.items():
        r = GGUFReader(os.path.join(MODELS, fname))
        by_name = {t.name: t for t in r.tensors}
        for name, nrows in picks:
            t = by_name[name]
            n = int(t.shape[0])
            for row in range(nrows):
                raw = np.ascontiguousarray(t.data[row]).view(np.uint8)
                deq = quants.dequantize(raw, t.tensor_type).reshape(-1)
                assert deq.size == n, (name, deq.size, n)
                out["dequant"].append({
                    "model": fname,
                    "tensor": name,
                    "row": row,
                    "type": t.tensor_type.name,
                    "n": n,
                    "raw_hex": raw.tobytes().hex(),
                    "f32_hex": hexf32(deq),
                })

    rng = np.random.default_rng(20261124)
    rows = []
    rows.append(rng.standard_normal(256).astype(np.float32))
    rows.append((rng.standard_normal(256) * 1e-3).astype(np.float32))
    rows.append((rng.uniform(-3, 5, 256)).astype(np.float32))
    special = rng.standard_normal(256).astype(np.float32)
    special[0:32] = 0.0                          # all-zero block
    special[32:64] = 0.75                        # constant block
    special[64:96] = np.arange(32, dtype=np.float32) - 16.0   # exact levels, ties
    special[96:128] = -(np.arange(32, dtype=np.float32) / 4)  # negative max
    rows.append(special)
    # Realistic input: the first 256 dequantized weights of a real Q4_K row.
    rows.append(np.frombuffer(bytes.fromhex(out["dequant"][-4]["f32_hex"])[:1024], dtype="<f4").copy())

    for qt in (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.BF16):
        for i, x in enumerate(rows):
            q = quants.quantize(x.reshape(1, -1), qt).reshape(-1)
            out["quant"].append({"type": qt.name, "case": i, "n": int(x.size),
                                 "input_hex": hexf32(x), "output_hex": q.tobytes().hex()})
    for i, x in enumerate(rows):
        out["quant"].append({"type": "F16", "case": i, "n": int(x.size), "input_hex": hexf32(x),
                             "output_hex": x.astype("<f2").tobytes().hex()})

    path = os.path.join(HERE, "reference.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=0)
    print(path, os.path.getsize(path), "bytes,", len(out["dequant"]), "dequant rows,",
          len(out["quant"]), "quant rows")


if __name__ == "__main__":
    main()
