#!/usr/bin/env bash
# Fills the fuzz corpus (crates/gguf/fuzz/corpus/parse, gitignored) with seeds at run time:
# the Q4_0 tiny fixture (the F16 ones are 3-4x larger and add nothing new) and a few small
# hand-made files covering every metadata value type, nested arrays, several tensor types,
# and a .gpuidx placement file.
# Usage: crates/gguf/fuzz/seed.sh [fixture dir]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
fixtures="${1:-/work/shared/fixtures/powerinfer-tiny}"
corpus="$here/corpus/parse"
mkdir -p "$corpus"
q4="$fixtures/tiny-relu-llama.random-pred.q4_0.powerinfer.gguf"
if [ -e "$q4" ]; then cp "$q4" "$corpus/"; else echo "note: $q4 not found, skipped"; fi
python3 - "$corpus" <<'PY'
import struct, sys, os
out = sys.argv[1]
def s(x): b = x.encode(); return struct.pack('<Q', len(b)) + b
def kv(k, tid, payload): return s(k) + struct.pack('<I', tid) + payload
def arr(tid, items): return struct.pack('<IQ', tid, len(items)) + b''.join(items)
def gguf(magic, version, kvs, tensors, align=32):
    h = magic + struct.pack('<IQQ', version, len(tensors), len(kvs)) + b''.join(kvs)
    data = b''; infos = b''
    for name, tid, shape, payload in tensors:
        infos += s(name) + struct.pack('<I', len(shape)) + b''.join(struct.pack('<Q', d) for d in shape)
        infos += struct.pack('<IQ', tid, len(data))
        data += payload + b'\0' * (-len(payload) % align)
    h += infos
    h += b'\0' * (-len(h) % align)
    return h + data
kvs = [
    kv('general.architecture', 8, s('llama')),
    kv('a.u8', 0, b'\x07'), kv('a.i8', 1, b'\xff'), kv('a.u16', 2, struct.pack('<H', 513)),
    kv('a.i16', 3, struct.pack('<h', -3)), kv('llama.block_count', 4, struct.pack('<I', 2)),
    kv('a.i32', 5, struct.pack('<i', -9)), kv('llama.rope.freq_base', 6, struct.pack('<f', 1e4)),
    kv('a.bool', 7, b'\x01'), kv('a.u64', 10, struct.pack('<Q', 1 << 40)),
    kv('a.i64', 11, struct.pack('<q', -1)), kv('a.f64', 12, struct.pack('<d', 0.5)),
    kv('tokenizer.ggml.tokens', 9, arr(8, [s('<s>'), s('a'), s('bc')])),
    kv('tokenizer.ggml.scores', 9, arr(6, [struct.pack('<f', x) for x in (0.0, -1.0, 2.0)])),
    kv('a.nested', 9, arr(9, [arr(5, [struct.pack('<i', 1)]), arr(8, [s('x'), s('y')])])),
    kv('a.empty', 9, arr(4, [])),
]
tensors = [
    ('f32', 0, [3, 2], struct.pack('<6f', *range(6))),
    ('f16', 1, [4], b'\0\x3c' * 4),
    ('q4_0', 2, [32, 2], bytes(range(36))),
    ('q8_0', 8, [32], bytes(34)),
]
open(os.path.join(out, 'all_types_v3.gguf'), 'wb').write(gguf(b'GGUF', 3, kvs, tensors))
open(os.path.join(out, 'all_types_v2.pwri'), 'wb').write(gguf(b'PWRI', 2, kvs[:5], tensors[:2]))
open(os.path.join(out, 'align64.gguf'), 'wb').write(
    gguf(b'GGUF', 3, [kv('general.alignment', 4, struct.pack('<I', 64))], tensors[1:3], 64))
i32 = lambda xs: b''.join(struct.pack('<i', x) for x in xs)
gi = [kv('general.architecture', 8, s('generic.gpu_index')),
      kv('generic.gpu_index.block_count', 4, struct.pack('<I', 2)),
      kv('split.vram_capacity', 10, struct.pack('<Q', 1 << 30))]
idx0, idx1 = [1, 0, 1, 1, 0, 0, 0, 1], [0] * 8
gt = [('blk.0.gpu_idx', 18, [8], i32(idx0)), ('blk.0.gpu_bucket', 18, [4], i32([0, 2, 3, 7])),
      ('blk.1.gpu_idx', 18, [8], i32(idx1)), ('blk.1.gpu_bucket', 18, [0], b'')]
open(os.path.join(out, 'model.gpuidx'), 'wb').write(gguf(b'PWRI', 3, gi, gt))
open(os.path.join(out, 'empty_v3'), 'wb').write(gguf(b'GGUF', 3, [], []))
PY
echo "seeded $corpus: $(ls "$corpus" | wc -l) files"
