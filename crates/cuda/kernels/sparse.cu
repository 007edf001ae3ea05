// powerinfer-cuda: sparse FFN operators over compact hot-neuron matrices.
//
// A compact matrix holds k rows; compact row j is original neuron bucket[j] (bucket == 0 means
// the identity). Neuron n is active iff scores[n] >= threshold (a NaN score is inactive): the
// predictor's decision, respected exactly.
// Requires quant.cuh.

// y[j] = active(bucket[j]) ? dot(W[j], x) : 0 for j < rows. An inactive row is never read.
#define PI_SPARSE_MATVEC(T)                                                                    \
    extern "C" __global__ void sparse_matvec_##T(                                              \
        const u8* __restrict__ w, const float* __restrict__ x, float* __restrict__ y,          \
        int rows, int cols, u64 row_bytes, const float* __restrict__ scores,                   \
        const int* __restrict__ bucket, float threshold) {                                     \
        const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);                   \
        const int lane = threadIdx.x & 31;                                                     \
        if (row >= rows) return;                                                               \
        const int neuron = bucket ? bucket[row] : row;                                         \
        if (!(scores[neuron] >= threshold)) {                                                  \
            if (lane == 0) y[row] = 0.f;                                                       \
            return;                                                                            \
        }                                                                                      \
        const float v = row_dot_##T(w + (u64)row * row_bytes, x, cols, lane);                  \
        if (lane == 0) y[row] = v;                                                             \
    }

PI_FOR_EACH_TYPE(PI_SPARSE_MATVEC)

// Sparse axpy over compact down_t rows, phase 1: chunk blockIdx.y covers compact rows
// [y * chunk_rows, min(rows, (y + 1) * chunk_rows)); each thread owns one output column and adds
// h[j] * W[j][col] over the chunk's active rows in increasing j. partial[chunk * cols + col].
#define PI_SPARSE_AXPY(T)                                                                      \
    extern "C" __global__ void sparse_axpy_partial_##T(                                        \
        const u8* __restrict__ w, const float* __restrict__ h, float* __restrict__ partial,    \
        int rows, int cols, u64 row_bytes, const float* __restrict__ scores,                   \
        const int* __restrict__ bucket, float threshold, int chunk_rows) {                     \
        const int col = blockIdx.x * blockDim.x + threadIdx.x;                                 \
        if (col >= cols) return;                                                               \
        const int j0 = blockIdx.y * chunk_rows;                                                \
        const int j1 = min(rows, j0 + chunk_rows);                                             \
        float acc = 0.f;                                                                       \
        for (int j = j0; j < j1; ++j) {                                                        \
            const int neuron = bucket ? bucket[j] : j;                                         \
            if (scores[neuron] >= threshold) acc += h[j] * elem_##T(w + (u64)j * row_bytes, col); \
        }                                                                                      \
        partial[(u64)blockIdx.y * cols + col] = acc;                                           \
    }

PI_FOR_EACH_TYPE(PI_SPARSE_AXPY)

// Phase 2: out[col] = (accumulate ? out[col] : 0) + sum over chunks in increasing order.
extern "C" __global__ void sparse_axpy_reduce(const float* __restrict__ partial,
                                              float* __restrict__ out, int cols, int n_chunks,
                                              int accumulate) {
    const int col = blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= cols) return;
    float acc = 0.f;
    for (int c = 0; c < n_chunks; ++c) acc += partial[(u64)c * cols + col];
    out[col] = accumulate ? out[col] + acc : acc;
}
