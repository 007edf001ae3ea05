// powerinfer-cuda: ggml weight formats, read in place (layouts as in powerinfer-quant's
// blocks.rs). Every format is consumed in "units" of 32 consecutive elements of one row:
//   dot_unit_T(row, u, x): sum over the 32 elements of unit u of w[e] * x[e] (x = the whole
//                          activation row, f32);
//   elem_T(row, c):        the dequantized element c of the row.
// Both compute each weight exactly as ggml's dequantize_row_* does (same scale products).

// ---- F32 ----
__device__ __forceinline__ float elem_f32(const u8* row, int c) {
    return ((const float*)row)[c];
}
__device__ __forceinline__ float dot_unit_f32(const u8* row, int u, const float* x) {
    const float* w = (const float*)row + u * 32;
    const float* xs = x + u * 32;
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < 32; ++j) s += w[j] * xs[j];
    return s;
}

// ---- F16 ----
__device__ __forceinline__ float elem_f16(const u8* row, int c) {
    return h2f(((const u16*)row)[c]);
}
__device__ __forceinline__ float dot_unit_f16(const u8* row, int u, const float* x) {
    const u16* w = (const u16*)row + u * 32;
    const float* xs = x + u * 32;
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < 32; ++j) s += h2f(w[j]) * xs[j];
    return s;
}

// ---- Q4_0: 18 bytes = f16 d, 16 bytes of nibbles (low: element j, high: element j + 16) ----
__device__ __forceinline__ float elem_q4_0(const u8* row, int c) {
    const u8* b = row + (u64)(c >> 5) * 18;
    const int j = c & 31;
    const int q = j < 16 ? (b[2 + j] & 0xF) : (b[2 + j - 16] >> 4);
    return load_f16(b) * (float)(q - 8);
}
__device__ __forceinline__ float dot_unit_q4_0(const u8* row, int u, const float* x) {
    const u8* b = row + (u64)u * 18;
    const float* xs = x + u * 32;
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
        const int q = b[2 + j];
        s += (float)((q & 0xF) - 8) * xs[j] + (float)((q >> 4) - 8) * xs[j + 16];
    }
    return load_f16(b) * s;
}

// ---- Q8_0: 34 bytes = f16 d, 32 signed bytes ----
__device__ __forceinline__ float elem_q8_0(const u8* row, int c) {
    const u8* b = row + (u64)(c >> 5) * 34;
    return load_f16(b) * (float)((const i8*)(b + 2))[c & 31];
}
__device__ __forceinline__ float dot_unit_q8_0(const u8* row, int u, const float* x) {
    const u8* b = row + (u64)u * 34;
    const i8* q = (const i8*)(b + 2);
    const float* xs = x + u * 32;
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < 32; ++j) s += (float)q[j] * xs[j];
    return load_f16(b) * s;
}

// ---- Q4_K: 144 bytes = f16 d, f16 dmin, 12 bytes of 6-bit scales/mins, 128 bytes of nibbles.
// Sub-block s (0..8) of 32 elements: chunk s/2 of 32 bytes, low nibbles for even s, high for odd;
// element = d * sc[s] * q - dmin * m[s].
__device__ __forceinline__ void q4k_scale_min(int j, const u8* q, int* sc, int* m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}
__device__ __forceinline__ float elem_q4_k(const u8* row, int c) {
    const u8* b = row + (u64)(c >> 8) * 144;
    const int e = c & 255;
    const int s = e >> 5;
    const int l = e & 31;
    int sc, m;
    q4k_scale_min(s, b + 4, &sc, &m);
    const float d1 = load_f16(b) * (float)sc;
    const float m1 = load_f16(b + 2) * (float)m;
    const int q = (b[16 + (s >> 1) * 32 + l] >> ((s & 1) * 4)) & 0xF;
    return d1 * (float)q - m1;
}
__device__ __forceinline__ float dot_unit_q4_k(const u8* row, int u, const float* x) {
    const u8* b = row + (u64)(u >> 3) * 144;
    const int s = u & 7;
    int sc, m;
    q4k_scale_min(s, b + 4, &sc, &m);
    const float d1 = load_f16(b) * (float)sc;
    const float m1 = load_f16(b + 2) * (float)m;
    const u8* qs = b + 16 + (s >> 1) * 32;
    const int shift = (s & 1) * 4;
    const float* xs = x + u * 32;
    float sq = 0.f, sx = 0.f;
#pragma unroll
    for (int l = 0; l < 32; ++l) {
        sq += (float)((qs[l] >> shift) & 0xF) * xs[l];
        sx += xs[l];
    }
    return d1 * sq - m1 * sx;
}

// ---- Q6_K: 210 bytes = ql[128] (low 4 bits), qh[64] (high 2 bits), i8 scales[16], f16 d.
// Element e of the super-block: half n = e/128, quarter qq = (e%128)/32, l = e%32:
//   low  = (ql[n*64 + (qq&1)*32 + l] >> ((qq>>1)*4)) & 0xF
//   high = (qh[n*32 + l] >> (qq*2)) & 3
//   w    = d * scales[n*8 + qq*2 + l/16] * ((low | high << 4) - 32)
__device__ __forceinline__ int q6k_q(const u8* b, int n, int qq, int l) {
    const int lo = (b[n * 64 + (qq & 1) * 32 + l] >> ((qq >> 1) * 4)) & 0xF;
    const int hi = (b[128 + n * 32 + l] >> (qq * 2)) & 3;
    return (lo | (hi << 4)) - 32;
}
__device__ __forceinline__ float elem_q6_k(const u8* row, int c) {
    const u8* b = row + (u64)(c >> 8) * 210;
    const int e = c & 255;
    const int n = e >> 7;
    const int qq = (e & 127) >> 5;
    const int l = e & 31;
    const int sc = ((const i8*)(b + 192))[n * 8 + qq * 2 + (l >> 4)];
    return load_f16(b + 208) * (float)sc * (float)q6k_q(b, n, qq, l);
}
__device__ __forceinline__ float dot_unit_q6_k(const u8* row, int u, const float* x) {
    const u8* b = row + (u64)(u >> 3) * 210;
    const int w = u & 7;
    const int n = w >> 2;
    const int qq = w & 3;
    const i8* sc = (const i8*)(b + 192) + n * 8 + qq * 2;
    const float d = load_f16(b + 208);
    const float* xs = x + u * 32;
    float s0 = 0.f, s1 = 0.f;
#pragma unroll
    for (int l = 0; l < 16; ++l) s0 += (float)q6k_q(b, n, qq, l) * xs[l];
#pragma unroll
    for (int l = 16; l < 32; ++l) s1 += (float)q6k_q(b, n, qq, l) * xs[l];
    return (d * (float)sc[0]) * s0 + (d * (float)sc[1]) * s1;
}

// One warp's dot product of a weight row with x: lane L takes units L, L+32, ... in order, then
// any tail elements (F32/F16 rows of a length that is not a multiple of 32), then the warp's
// butterfly sum. Deterministic: the same order on every run.
#define PI_ROW_DOT(T)                                                                          \
    __device__ __forceinline__ float row_dot_##T(const u8* row, const float* x, int cols,      \
                                                 int lane) {                                   \
        const int n_units = cols >> 5;                                                         \
        float s = 0.f;                                                                         \
        for (int u = lane; u < n_units; u += 32) s += dot_unit_##T(row, u, x);                 \
        for (int c = (n_units << 5) + lane; c < cols; c += 32) s += elem_##T(row, c) * x[c];   \
        return warp_sum(s);                                                                    \
    }

#define PI_FOR_EACH_TYPE(M) M(f32) M(f16) M(q4_0) M(q8_0) M(q4_k) M(q6_k)

PI_FOR_EACH_TYPE(PI_ROW_DOT)
