// powerinfer-cuda: helpers shared by every kernel family. Prepended to each family's source
// before NVRTC compiles it. No #include: NVRTC runs without the CUDA toolkit's headers here, so
// f16 conversions use PTX `cvt` directly.

typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define PI_NEG_INF __int_as_float(0xff800000u)

#ifdef PI_HOST_EMULATION
// The host emulator of the tests (tests/host_emu.rs) compiles these sources with a C++ compiler.
__device__ __forceinline__ float h2f(u16 h) {
    _Float16 v;
    memcpy(&v, &h, 2);
    return (float)v;
}
__device__ __forceinline__ u16 f2h(float f) {
    const _Float16 v = (_Float16)f;
    u16 h;
    memcpy(&h, &v, 2);
    return h;
}
#else
// IEEE binary16 -> binary32 (exact).
__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("{ cvt.f32.f16 %0, %1; }" : "=f"(f) : "h"(h));
    return f;
}

// binary32 -> binary16, round to nearest even.
__device__ __forceinline__ u16 f2h(float f) {
    u16 h;
    asm("{ cvt.rn.f16.f32 %0, %1; }" : "=h"(h) : "f"(f));
    return h;
}
#endif

// A little-endian f16 at any byte address (ggml blocks are not 2-byte aligned in general).
__device__ __forceinline__ float load_f16(const u8* p) {
    return h2f((u16)((u32)p[0] | ((u32)p[1] << 8)));
}

// Butterfly sum over the 32 lanes of a warp: every lane gets the same value, summed in the same
// fixed order on every run.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Tree reduction over a block whose size is a power of two <= 1024, through `red` (blockDim.x
// floats of shared memory). Every thread must call it; every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float* red) {
    const int tid = threadIdx.x;
    red[tid] = v;
    __syncthreads();
    for (int s = blockDim.x >> 1; s > 0; s >>= 1) {
        if (tid < s) red[tid] += red[tid + s];
        __syncthreads();
    }
    const float r = red[0];
    __syncthreads();
    return r;
}

__device__ __forceinline__ float block_max(float v, float* red) {
    const int tid = threadIdx.x;
    red[tid] = v;
    __syncthreads();
    for (int s = blockDim.x >> 1; s > 0; s >>= 1) {
        if (tid < s) red[tid] = fmaxf(red[tid], red[tid + s]);
        __syncthreads();
    }
    const float r = red[0];
    __syncthreads();
    return r;
}
