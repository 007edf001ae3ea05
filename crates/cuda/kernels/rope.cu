// powerinfer-cuda: rotary position embedding in place over n_heads heads of head_dim values.
// The first n_dims dimensions of each head rotate in pairs (i, i + 1) for neox == 0 (llama.cpp
// NORM) or (i, i + n_dims / 2) for neox != 0 (NEOX); the rest pass through. Pair i turns by
// theta_i = pos * freq_scale * base^(-2 i / n_dims). One thread per (head, pair).
// Requires common.cuh only.

extern "C" __global__ void rope(float* __restrict__ x, int n_heads, int head_dim, int n_dims,
                                int pos, float base, float freq_scale, int neox) {
    const int half = n_dims >> 1;
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n_heads * half) return;
    const int h = idx / half;
    const int i = idx - h * half;
    const float theta = freq_scale * ((float)pos * powf(base, -2.0f * (float)i / (float)n_dims));
    float s, c;
    sincosf(theta, &s, &c);
    float* head = x + (u64)h * head_dim;
    const int a = neox ? i : 2 * i;
    const int b = neox ? i + half : 2 * i + 1;
    const float x0 = head[a];
    const float x1 = head[b];
    head[a] = x0 * c - x1 * s;
    head[b] = x0 * s + x1 * c;
}
