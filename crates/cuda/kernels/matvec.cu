// powerinfer-cuda: dense matvec y = W x over a ggml weight matrix (rows x cols, row-major rows of
// `row_bytes` bytes) and f32 activations. One warp per row, `blockDim.x / 32` rows per block.
// `relu != 0` applies max(0, .) to each output (the predictor's first layer).
// Requires quant.cuh.

#define PI_MATVEC(T)                                                                           \
    extern "C" __global__ void matvec_##T(const u8* __restrict__ w,                            \
                                          const float* __restrict__ x,                         \
                                          float* __restrict__ y, int rows, int cols,           \
                                          u64 row_bytes, int relu) {                           \
        const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);                   \
        const int lane = threadIdx.x & 31;                                                     \
        if (row >= rows) return; /* whole warp leaves together */                              \
        const float v = row_dot_##T(w + (u64)row * row_bytes, x, cols, lane);                  \
        if (lane == 0) y[row] = relu ? fmaxf(v, 0.f) : v;                                      \
    }

PI_FOR_EACH_TYPE(PI_MATVEC)
