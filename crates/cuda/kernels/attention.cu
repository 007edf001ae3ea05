// powerinfer-cuda: decode attention of one query row over an F16 KV cache, GQA.
// k: rows of n_head_kv * hd_k f16 per position, v: rows of n_head_kv * hd_v; keys first..n_keys-1
// are visible (causal, optionally windowed). One block per query head (blockDim.x a power of two,
// a multiple of 32): scores into scratch[h * scratch_stride ..] (one warp per key), softmax
// (max, exp, sum by block tree reductions), then out = sum_t p_t v_t / sum_t p_t with every output
// dimension summed over keys in increasing order: deterministic.
// Requires common.cuh only.

extern "C" __global__ void attn_decode(const float* __restrict__ q, const u16* __restrict__ k,
                                       const u16* __restrict__ v, float* __restrict__ out,
                                       float* __restrict__ scratch, int n_head, int n_head_kv,
                                       int hd_k, int hd_v, int first, int n_keys,
                                       int scratch_stride, float scale) {
    __shared__ float red[1024];
    const int h = blockIdx.x;
    const int kvh = h / (n_head / n_head_kv);
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int n_warps = blockDim.x >> 5;
    const int n = n_keys - first;
    const u64 k_row = (u64)n_head_kv * hd_k;
    const u64 v_row = (u64)n_head_kv * hd_v;
    const float* qh = q + (u64)h * hd_k;
    float* sc = scratch + (u64)h * scratch_stride;

    for (int t = warp; t < n; t += n_warps) {
        const u16* kr = k + (u64)(first + t) * k_row + (u64)kvh * hd_k;
        float s = 0.f;
        for (int d = lane; d < hd_k; d += 32) s += qh[d] * h2f(kr[d]);
        s = warp_sum(s);
        if (lane == 0) sc[t] = s * scale;
    }
    __syncthreads();

    float m = PI_NEG_INF;
    for (int t = tid; t < n; t += blockDim.x) m = fmaxf(m, sc[t]);
    m = block_max(m, red);

    float s = 0.f;
    for (int t = tid; t < n; t += blockDim.x) {
        const float e = expf(sc[t] - m);
        sc[t] = e;
        s += e;
    }
    const float sum = block_sum(s, red); // its __syncthreads also publishes sc[]
    const float inv = 1.0f / sum;

    for (int d = tid; d < hd_v; d += blockDim.x) {
        const u16* vc = v + (u64)kvh * hd_v + d;
        float acc = 0.f;
        for (int t = 0; t < n; ++t) acc += sc[t] * h2f(vc[(u64)(first + t) * v_row]);
        out[(u64)h * hd_v + d] = acc * inv;
    }
}

// Store n f32 values as f16 (round to nearest even): a new K or V row into the cache.
extern "C" __global__ void store_f16(const float* __restrict__ src, u16* __restrict__ dst, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[i] = f2h(src[i]);
}
