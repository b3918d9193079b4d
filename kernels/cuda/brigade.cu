// brigade's CUDA kernels: the GPU twins of the fused CPU kernels in kernels/src (same
// algorithms, same row-wise reductions). Every kernel exists for f32 and bf16 storage and
// accumulates in f32. Reductions are deterministic: a fixed tree per warp or block and no
// atomics, so a result never changes from run to run.
//
// Conventions: tensors are dense row-major (the Rust side makes them contiguous); "row"
// kernels run one warp per row (WARPS warps per block) and loop over the row in strides of 32,
// so any row length works; elementwise kernels use grid-stride loops.
//
// Kernel names are `<op>_<dtype>`; kernels/src/cuda.rs lists every one it launches, and a test
// checks each is in the compiled module.

#include <cuda_bf16.h>
#include <stdint.h>

#define WARPS 8
#define FULL_MASK 0xffffffffu

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

__device__ __forceinline__ int warp_row() { return blockIdx.x * WARPS + threadIdx.x / 32; }
__device__ __forceinline__ int lane() { return threadIdx.x % 32; }

// ---- GELU (tanh approximation, GPT-2's gelu_new) -------------------------------------------

#define GELU_A 0.7978845608028654f
#define GELU_B 0.044715f

template <typename T>
__device__ void gelu_tanh_fwd(const T* x, T* y, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float v = to_f(x[i]);
        y[i] = from_f<T>(0.5f * v * (1.0f + tanhf(GELU_A * v * (1.0f + GELU_B * v * v))));
    }
}

template <typename T>
__device__ void gelu_tanh_bwd(const T* x, const T* dy, T* dx, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float v = to_f(x[i]);
        float t = tanhf(GELU_A * v * (1.0f + GELU_B * v * v));
        float du = GELU_A * (1.0f + 3.0f * GELU_B * v * v);
        dx[i] = from_f<T>(to_f(dy[i]) * (0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * du));
    }
}

// ---- LayerNorm -------------------------------------------------------------------------------

// Mean and 1/std of a row: two passes (centred variance), as the CPU kernel.
template <typename T>
__device__ void row_stats(const T* xr, int c, float eps, float* mean, float* rstd) {
    float s = 0.0f;
    for (int i = lane(); i < c; i += 32) s += to_f(xr[i]);
    float m = warp_sum(s) / c;
    float q = 0.0f;
    for (int i = lane(); i < c; i += 32) {
        float d = to_f(xr[i]) - m;
        q += d * d;
    }
    *mean = m;
    *rstd = rsqrtf(warp_sum(q) / c + eps);
}

template <typename T>
__device__ void layer_norm_fwd(const T* x, const T* w, const T* b, T* y, int rows, int c, float eps) {
    int r = warp_row();
    if (r >= rows) return;
    const T* xr = x + (size_t)r * c;
    float mean, rstd;
    row_stats(xr, c, eps, &mean, &rstd);
    for (int i = lane(); i < c; i += 32)
        y[(size_t)r * c + i] = from_f<T>((to_f(xr[i]) - mean) * rstd * to_f(w[i]) + to_f(b[i]));
}

// dx per row; saves (mean, rstd) per row for the weight-gradient kernels.
template <typename T>
__device__ void layer_norm_bwd_dx(const T* x, const T* w, const T* dy, T* dx, float* stats, int rows, int c, float eps) {
    int r = warp_row();
    if (r >= rows) return;
    const T* xr = x + (size_t)r * c;
    const T* gr = dy + (size_t)r * c;
    float mean, rstd;
    row_stats(xr, c, eps, &mean, &rstd);
    float g_sum = 0.0f, gx_sum = 0.0f;
    for (int i = lane(); i < c; i += 32) {
        float g = to_f(gr[i]) * to_f(w[i]);
        g_sum += g;
        gx_sum += g * (to_f(xr[i]) - mean) * rstd;
    }
    float g_mean = warp_sum(g_sum) / c, gx_mean = warp_sum(gx_sum) / c;
    for (int i = lane(); i < c; i += 32) {
        float xhat = (to_f(xr[i]) - mean) * rstd;
        dx[(size_t)r * c + i] = from_f<T>((to_f(gr[i]) * to_f(w[i]) - g_mean - xhat * gx_mean) * rstd);
    }
    if (lane() == 0) {
        stats[2 * r] = mean;
        stats[2 * r + 1] = rstd;
    }
}

// Partial dweight/dbias: block (column tile, row chunk) sums its rows for its columns, one
// column per thread, rows in order; partials[chunk][0..c) = dw, [c..2c) = db.
template <typename T>
__device__ void layer_norm_bwd_partial(const T* x, const T* dy, const float* stats, float* partials, int rows, int c, int rows_per_chunk) {
    int col = blockIdx.x * blockDim.x + threadIdx.x;
    int chunk = blockIdx.y;
    if (col >= c) return;
    int r0 = chunk * rows_per_chunk, r1 = min(rows, r0 + rows_per_chunk);
    float dw = 0.0f, db = 0.0f;
    for (int r = r0; r < r1; r++) {
        float g = to_f(dy[(size_t)r * c + col]);
        float xhat = (to_f(x[(size_t)r * c + col]) - stats[2 * r]) * stats[2 * r + 1];
        dw += g * xhat;
        db += g;
    }
    partials[(size_t)chunk * 2 * c + col] = dw;
    partials[(size_t)chunk * 2 * c + c + col] = db;
}

// Sums the chunks' partials in chunk order into dw (out[0..c)) and db (out[c..2c)).
template <typename T>
__device__ void layer_norm_bwd_reduce(const float* partials, T* out, int c, int chunks) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= 2 * c) return;
    float s = 0.0f;
    for (int k = 0; k < chunks; k++) s += partials[(size_t)k * 2 * c + j];
    out[j] = from_f<T>(s);
}

// ---- softmax over the last dimension -------------------------------------------------------

// The max and sum(exp(x·scale - max)) of the first n elements of a row (one warp).
template <typename T>
__device__ void row_max_sumexp(const T* xr, int n, float scale, float* max, float* sum) {
    float m = -INFINITY;
    for (int i = lane(); i < n; i += 32) m = fmaxf(m, to_f(xr[i]) * scale);
    m = warp_max(m);
    float s = 0.0f;
    for (int i = lane(); i < n; i += 32) s += expf(to_f(xr[i]) * scale - m);
    *max = m;
    *sum = warp_sum(s);
}

template <typename T>
__device__ void softmax_fwd(const T* x, T* y, int rows, int c, int log) {
    int r = warp_row();
    if (r >= rows) return;
    const T* xr = x + (size_t)r * c;
    float m, s;
    row_max_sumexp(xr, c, 1.0f, &m, &s);
    float lse = logf(s), inv = 1.0f / s;
    for (int i = lane(); i < c; i += 32) {
        float v = to_f(xr[i]) - m;
        y[(size_t)r * c + i] = from_f<T>(log ? v - lse : expf(v) * inv);
    }
}

// softmax: dx = y (dy - sum(dy y)); log-softmax: dx = dy - exp(y) sum(dy).
template <typename T>
__device__ void softmax_bwd(const T* y, const T* dy, T* dx, int rows, int c, int log) {
    int r = warp_row();
    if (r >= rows) return;
    size_t o = (size_t)r * c;
    float s = 0.0f;
    for (int i = lane(); i < c; i += 32) s += log ? to_f(dy[o + i]) : to_f(dy[o + i]) * to_f(y[o + i]);
    s = warp_sum(s);
    for (int i = lane(); i < c; i += 32) {
        float g = to_f(dy[o + i]), v = to_f(y[o + i]);
        dx[o + i] = from_f<T>(log ? g - expf(v) * s : v * (g - s));
    }
}

// Causal attention's scale-mask-softmax around the batched products: rows are (batch, head,
// query) of a (.., T, T) score tensor; query i sees keys 0..=i. Masked probabilities are
// exact zeros.
template <typename T>
__device__ void causal_softmax_fwd(const T* scores, T* probs, int rows, int t, float scale) {
    int r = warp_row();
    if (r >= rows) return;
    int q = r % t;
    size_t o = (size_t)r * t;
    float m, s;
    row_max_sumexp(scores + o, q + 1, scale, &m, &s);
    float inv = 1.0f / s;
    for (int j = lane(); j < t; j += 32)
        probs[o + j] = from_f<T>(j <= q ? expf(to_f(scores[o + j]) * scale - m) * inv : 0.0f);
}

// dscores = scale · P ⊙ (dP − rowsum(dP ⊙ P)), zero where masked.
template <typename T>
__device__ void causal_softmax_bwd(const T* probs, const T* dprobs, T* dscores, int rows, int t, float scale) {
    int r = warp_row();
    if (r >= rows) return;
    int q = r % t;
    size_t o = (size_t)r * t;
    float s = 0.0f;
    for (int j = lane(); j <= q; j += 32) s += to_f(dprobs[o + j]) * to_f(probs[o + j]);
    s = warp_sum(s);
    for (int j = lane(); j < t; j += 32) {
        float p = to_f(probs[o + j]);
        dscores[o + j] = from_f<T>(j <= q ? scale * p * (to_f(dprobs[o + j]) - s) : 0.0f);
    }
}

// ---- cross-entropy (summed), fused with its softmax ----------------------------------------

// Per-row loss logsumexp(x) - x[target]; the sum is taken by sum_rows_f32 in a fixed order.
// A target id out of range (checked on the host before upload) yields NaN, never a bad read.
template <typename T>
__device__ void cross_entropy_rows(const T* logits, const uint32_t* targets, float* row_loss, int rows, int v) {
    int r = warp_row();
    if (r >= rows) return;
    const T* xr = logits + (size_t)r * v;
    float m, s;
    row_max_sumexp(xr, v, 1.0f, &m, &s);
    if (lane() == 0) {
        uint32_t t = targets[r];
        row_loss[r] = t < (uint32_t)v ? m + logf(s) - to_f(xr[t]) : NAN;
    }
}

// One block sums n floats (each thread a strided run, then a fixed tree) into out[0].
template <typename T>
__device__ void sum_to_scalar(const float* x, T* out, int n) {
    __shared__ float part[32];
    float s = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += x[i];
    s = warp_sum(s);
    if (lane() == 0) part[threadIdx.x / 32] = s;
    __syncthreads();
    if (threadIdx.x < 32) {
        float v = threadIdx.x < blockDim.x / 32 ? part[threadIdx.x] : 0.0f;
        v = warp_sum(v);
        if (threadIdx.x == 0) out[0] = from_f<T>(v);
    }
}

// dlogits = g (softmax(logits) - onehot(target)), g a device scalar.
template <typename T>
__device__ void cross_entropy_bwd(const T* logits, const uint32_t* targets, const T* g, T* d, int rows, int v) {
    int r = warp_row();
    if (r >= rows) return;
    const T* xr = logits + (size_t)r * v;
    float m, s;
    row_max_sumexp(xr, v, 1.0f, &m, &s);
    float gs = to_f(g[0]), inv = 1.0f / s;
    uint32_t t = targets[r];
    for (int i = lane(); i < v; i += 32)
        d[(size_t)r * v + i] = from_f<T>(gs * (expf(to_f(xr[i]) - m) * inv - (i == (int)t ? 1.0f : 0.0f)));
}

// ---- instantiations ---------------------------------------------------------------------------

#define INSTANTIATE(T, S)                                                                                        \
    extern "C" __global__ void gelu_tanh_fwd_##S(const T* x, T* y, size_t n) { gelu_tanh_fwd(x, y, n); }         \
    extern "C" __global__ void gelu_tanh_bwd_##S(const T* x, const T* dy, T* dx, size_t n) {                    \
        gelu_tanh_bwd(x, dy, dx, n);                                                                             \
    }                                                                                                            \
    extern "C" __global__ void layer_norm_fwd_##S(const T* x, const T* w, const T* b, T* y, int rows, int c,    \
                                                  float eps) {                                                   \
        layer_norm_fwd(x, w, b, y, rows, c, eps);                                                                \
    }                                                                                                            \
    extern "C" __global__ void layer_norm_bwd_dx_##S(const T* x, const T* w, const T* dy, T* dx, float* stats,  \
                                                     int rows, int c, float eps) {                               \
        layer_norm_bwd_dx(x, w, dy, dx, stats, rows, c, eps);                                                    \
    }                                                                                                            \
    extern "C" __global__ void layer_norm_bwd_partial_##S(const T* x, const T* dy, const float* stats,          \
                                                          float* partials, int rows, int c, int per_chunk) {     \
        layer_norm_bwd_partial(x, dy, stats, partials, rows, c, per_chunk);                                      \
    }                                                                                                            \
    extern "C" __global__ void layer_norm_bwd_reduce_##S(const float* partials, T* out, int c, int chunks) {    \
        layer_norm_bwd_reduce(partials, out, c, chunks);                                                         \
    }                                                                                                            \
    extern "C" __global__ void softmax_fwd_##S(const T* x, T* y, int rows, int c, int log) {                    \
        softmax_fwd(x, y, rows, c, log);                                                                         \
    }                                                                                                            \
    extern "C" __global__ void softmax_bwd_##S(const T* y, const T* dy, T* dx, int rows, int c, int log) {      \
        softmax_bwd(y, dy, dx, rows, c, log);                                                                    \
    }                                                                                                            \
    extern "C" __global__ void causal_softmax_fwd_##S(const T* s, T* p, int rows, int t, float scale) {         \
        causal_softmax_fwd(s, p, rows, t, scale);                                                                \
    }                                                                                                            \
    extern "C" __global__ void causal_softmax_bwd_##S(const T* p, const T* dp, T* ds, int rows, int t,          \
                                                      float scale) {                                             \
        causal_softmax_bwd(p, dp, ds, rows, t, scale);                                                           \
    }                                                                                                            \
    extern "C" __global__ void cross_entropy_rows_##S(const T* logits, const uint32_t* targets, float* loss,    \
                                                      int rows, int v) {                                         \
        cross_entropy_rows(logits, targets, loss, rows, v);                                                      \
    }                                                                                                            \
    extern "C" __global__ void sum_to_scalar_##S(const float* x, T* out, int n) { sum_to_scalar(x, out, n); }   \
    extern "C" __global__ void cross_entropy_bwd_##S(const T* logits, const uint32_t* targets, const T* g, T* d, \
                                                     int rows, int v) {                                          \
        cross_entropy_bwd(logits, targets, g, d, rows, v);                                                       \
    }

INSTANTIATE(float, f32)
INSTANTIATE(__nv_bfloat16, bf16)
