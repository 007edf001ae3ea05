// powerinfer-cuda: FFN activations and gating, elementwise over n values:
// out = act(gate) * (up ? (relu_up ? max(up, 0) : up) : 1), act = SiLU (0), GELU tanh (1),
// ReLU (2). SwiGLU = (0, up), GeGLU = (1, up), ReGLU = (2, up), dReLU = (2, up, relu_up),
// plain ReLU/SiLU/GELU = no up.
// Requires common.cuh only.

__device__ __forceinline__ float pi_act(float g, int kind) {
    if (kind == 0) return g / (1.0f + expf(-g));
    if (kind == 1) {
        const float k0 = 0.7978845608f, k1 = 0.044715f;
        return 0.5f * g * (1.0f + tanhf(k0 * g * (1.0f + k1 * g * g)));
    }
    return fmaxf(g, 0.0f);
}

extern "C" __global__ void glu(const float* __restrict__ gate, const float* __restrict__ up,
                               float* __restrict__ out, int n, int kind, int relu_up) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float u = 1.0f;
    if (up) u = relu_up ? fmaxf(up[i], 0.0f) : up[i];
    out[i] = pi_act(gate[i], kind) * u;
}
