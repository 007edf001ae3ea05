// powerinfer-cuda: RMS norm. One block per row of n values (blockDim.x a power of two):
// out = x * (1 / sqrt(mean(x^2) + eps)) * w, the same w for every row (per-head QK norm).
// Requires common.cuh only.

extern "C" __global__ void rms_norm(const float* __restrict__ x, const float* __restrict__ w,
                                    float* __restrict__ out, int n, float eps) {
    __shared__ float red[1024];
    const float* xr = x + (u64)blockIdx.x * n;
    float* o = out + (u64)blockIdx.x * n;
    float s = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += xr[i] * xr[i];
    const float sum = block_sum(s, red);
    const float scale = 1.0f / sqrtf(sum / (float)n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) o[i] = (xr[i] * scale) * w[i];
}
