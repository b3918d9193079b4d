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

// One block sums n floats (each thread a strided run, then a fixed tree) into out[0]. The loss
// stays f32 for bf16 logits too: a bf16 scalar would keep only ~3 significant digits of it.
__device__ void sum_to_scalar(const float* x, float* out, int n) {
    __shared__ float part[32];
    float s = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += x[i];
    s = warp_sum(s);
    if (lane() == 0) part[threadIdx.x / 32] = s;
    __syncthreads();
    if (threadIdx.x < 32) {
        float v = threadIdx.x < blockDim.x / 32 ? part[threadIdx.x] : 0.0f;
        v = warp_sum(v);
        if (threadIdx.x == 0) out[0] = v;
    }
}

// dlogits = g (softmax(logits) - onehot(target)), g an f32 device scalar (the loss's dtype), so
// each gradient is rounded to T once, from f32.
template <typename T>
__device__ void cross_entropy_bwd(const T* logits, const uint32_t* targets, const float* g, T* d, int rows, int v) {
    int r = warp_row();
    if (r >= rows) return;
    const T* xr = logits + (size_t)r * v;
    float m, s;
    row_max_sumexp(xr, v, 1.0f, &m, &s);
    float gs = g[0], inv = 1.0f / s;
    uint32_t t = targets[r];
    for (int i = lane(); i < v; i += 32)
        d[(size_t)r * v + i] = from_f<T>(gs * (expf(to_f(xr[i]) - m) * inv - (i == (int)t ? 1.0f : 0.0f)));
}

// ---- flash attention (FlashAttention-2, causal) ---------------------------------------------
//
// Causal self-attention straight from the fused projection qkv (B, T, 3C) without a T×T matrix
// in memory: the forward walks key tiles of FA_BK keys with an online softmax and saves each
// row's log-sum-exp (f32); the backward recomputes P = exp(scale·QKᵀ − lse) tile by tile.
// The CPU twin is kernels/src/flash.rs (same algorithm; its tiles are 64 keys where these are
// 32, which moves the softmax's rescaling points and so the last bits of rounding).
//
// Design, for head widths d ≤ FA_DMAX (GPT-2's 64): plain f32 FMAs on CUDA cores with the
// tiles in shared memory (no tensor cores yet), and every sum owned by one thread or one warp
// in a fixed order, so no atomics and no run-to-run differences:
// - forward: a block owns FA_BQ query rows (8 per warp, interleaved so the diagonal tile's
//   work is spread over the warps); per key tile each lane scores one key, the warp takes the
//   tile's max and sum by shuffles, and each lane accumulates two output dims;
// - backward: `delta` = rowsum(dO ∘ O) per row (one warp per row); then dK, dV per key tile
//   (a block owns 32 keys and walks the query chunks below the diagonal in order) and, in a
//   separate kernel, dQ per query chunk (walking the key tiles in order), so every gradient
//   element is a sum one thread owns. Both recompute the 32×32 tiles of P and dS into shared
//   memory, then accumulate from there.
// Blocks with the most causal work run first (reversed block order).

#define FA_DMAX 64
#define FA_BK 32
#define FA_BQ 64
#define FA_BR 32

// rows × FA_DMAX floats of a (.., row_stride) matrix into shared memory, zero-padded past the
// sequence end and the head width.
template <typename T>
__device__ void fa_load_rows(const T* src, size_t row_stride, int row0, int rows, int t, int d, float (*dst)[FA_DMAX + 1]) {
    for (int idx = threadIdx.x; idx < rows * FA_DMAX; idx += blockDim.x) {
        int r = idx / FA_DMAX, x = idx % FA_DMAX;
        dst[r][x] = (row0 + r < t && x < d) ? to_f(src[(size_t)(row0 + r) * row_stride + x]) : 0.0f;
    }
}

template <typename T>
__device__ void flash_attention_fwd(const T* qkv, T* out, float* lse, int t, int c, int h, int d, float scale) {
    __shared__ float q_s[FA_BQ][FA_DMAX];
    __shared__ float kt_s[FA_DMAX][FA_BK + 1]; // keys transposed: lane j reads column j
    __shared__ float v_s[FA_BK][FA_DMAX];
    const int RPW = FA_BQ / WARPS;
    int bh = blockIdx.y, b = bh / h, hh = bh % h;
    int r0 = (gridDim.x - 1 - blockIdx.x) * FA_BQ;
    size_t rs = 3 * (size_t)c;
    const T* base = qkv + (size_t)b * t * rs + (size_t)hh * d;
    int warp = threadIdx.x / 32, ln = lane();
    for (int idx = threadIdx.x; idx < FA_BQ * FA_DMAX; idx += blockDim.x) {
        int i = idx / FA_DMAX, x = idx % FA_DMAX;
        q_s[i][x] = (r0 + i < t && x < d) ? to_f(base[(size_t)(r0 + i) * rs + x]) : 0.0f;
    }
    float m[RPW], l[RPW], acc0[RPW], acc1[RPW];
#pragma unroll
    for (int rr = 0; rr < RPW; rr++) {
        m[rr] = -INFINITY;
        l[rr] = 0.0f;
        acc0[rr] = 0.0f;
        acc1[rr] = 0.0f;
    }
    int last = min(t, r0 + FA_BQ) - 1;
    for (int c0 = 0; c0 <= last; c0 += FA_BK) {
        __syncthreads(); // the previous tile is used up (and q_s is complete, the first time)
        for (int idx = threadIdx.x; idx < FA_BK * FA_DMAX; idx += blockDim.x) {
            int j = idx / FA_DMAX, x = idx % FA_DMAX;
            bool ok = c0 + j < t && x < d;
            size_t o = (size_t)(c0 + j) * rs + x;
            kt_s[x][j] = ok ? to_f(base[o + c]) : 0.0f;
            v_s[j][x] = ok ? to_f(base[o + 2 * (size_t)c]) : 0.0f;
        }
        __syncthreads();
        int j = c0 + ln;
#pragma unroll
        for (int rr = 0; rr < RPW; rr++) {
            int il = rr * WARPS + warp, i = r0 + il;
            if (i >= t || c0 > i) continue; // warp-uniform
            float s = 0.0f;
            for (int x = 0; x < d; x++) s += q_s[il][x] * kt_s[x][ln];
            s = j <= i ? s * scale : -INFINITY;
            // Key c0 <= i is live, so the max is finite; the first tile's alpha is exp(-inf) = 0.
            float m_new = fmaxf(m[rr], warp_max(s));
            float p = j <= i ? expf(s - m_new) : 0.0f;
            float alpha = expf(m[rr] - m_new);
            l[rr] = l[rr] * alpha + warp_sum(p);
            float a0 = acc0[rr] * alpha, a1 = acc1[rr] * alpha;
            for (int jj = 0; jj < FA_BK; jj++) {
                float pj = __shfl_sync(FULL_MASK, p, jj);
                a0 += pj * v_s[jj][ln];
                a1 += pj * v_s[jj][ln + 32];
            }
            acc0[rr] = a0;
            acc1[rr] = a1;
            m[rr] = m_new;
        }
    }
#pragma unroll
    for (int rr = 0; rr < RPW; rr++) {
        int i = r0 + rr * WARPS + warp;
        if (i >= t) continue;
        float inv = 1.0f / l[rr];
        T* o = out + ((size_t)b * t + i) * c + (size_t)hh * d;
        if (ln < d) o[ln] = from_f<T>(acc0[rr] * inv);
        if (ln + 32 < d) o[ln + 32] = from_f<T>(acc1[rr] * inv);
        if (ln == 0) lse[(size_t)bh * t + i] = m[rr] + logf(l[rr]);
    }
}

// delta[b, h, i] = dO_i · O_i over the head's d columns: one warp per (b, h, i) row.
template <typename T>
__device__ void flash_attention_bwd_delta(const T* out, const T* dout, float* delta, int rows, int t, int c, int h, int d) {
    int r = warp_row();
    if (r >= rows) return;
    int bh = r / t, i = r % t, b = bh / h, hh = bh % h;
    size_t o = ((size_t)b * t + i) * c + (size_t)hh * d;
    float s = 0.0f;
    for (int x = lane(); x < d; x += 32) s += to_f(dout[o + x]) * to_f(out[o + x]);
    s = warp_sum(s);
    if (lane() == 0) delta[r] = s;
}

// P and dS of the FA_BR query rows i0.. (q_s, do_s, lse_s, delta_s) against the FA_BK keys
// c0.. (k_s, v_s) into p_s, ds_s: P = exp(scale·q·k − lse), dS = scale·P·(dO·v − delta), both
// zero where j > i or past the sequence end. Thread (warp w, lane j) does rows w, w + 8, ...
__device__ void fa_bwd_tile(float (*q_s)[FA_DMAX + 1], float (*do_s)[FA_DMAX + 1], const float* lse_s, const float* delta_s,
                            float (*k_s)[FA_DMAX + 1], float (*v_s)[FA_DMAX + 1], float (*p_s)[FA_BK + 1], float (*ds_s)[FA_BK + 1],
                            int i0, int c0, int t, int d, float scale) {
    int j = lane();
    for (int i = threadIdx.x / 32; i < FA_BR; i += WARPS) {
        float s = 0.0f, dp = 0.0f;
        for (int x = 0; x < d; x++) {
            s += q_s[i][x] * k_s[j][x];
            dp += do_s[i][x] * v_s[j][x];
        }
        bool live = i0 + i < t && c0 + j <= i0 + i;
        float p = live ? expf(s * scale - lse_s[i]) : 0.0f;
        p_s[i][j] = p;
        ds_s[i][j] = live ? scale * p * (dp - delta_s[i]) : 0.0f;
    }
}

// lse and delta of rows i0.. into shared memory (0 past the end: those rows are masked anyway).
__device__ void fa_load_row_stats(const float* lse, const float* delta, int i0, int t, float* lse_s, float* delta_s) {
    for (int i = threadIdx.x; i < FA_BR; i += blockDim.x) {
        lse_s[i] = i0 + i < t ? lse[i0 + i] : 0.0f;
        delta_s[i] = i0 + i < t ? delta[i0 + i] : 0.0f;
    }
}

// dK and dV of one key tile: thread owns (key tid/64 + 4e, dim tid%64), e < 8, and sums the
// query rows in increasing order.
template <typename T>
__device__ void flash_attention_bwd_dkdv(const T* qkv, const T* dout, const float* lse, const float* delta, T* dqkv, int t, int c, int h, int d,
                                         float scale) {
    __shared__ float k_s[FA_BK][FA_DMAX + 1], v_s[FA_BK][FA_DMAX + 1];
    __shared__ float q_s[FA_BR][FA_DMAX + 1], do_s[FA_BR][FA_DMAX + 1];
    __shared__ float p_s[FA_BR][FA_BK + 1], ds_s[FA_BR][FA_BK + 1];
    __shared__ float lse_s[FA_BR], delta_s[FA_BR];
    const int PER = FA_BK * FA_DMAX / (32 * WARPS);
    int bh = blockIdx.y, b = bh / h, hh = bh % h;
    int c0 = blockIdx.x * FA_BK; // early keys see the most queries: they go first
    size_t rs = 3 * (size_t)c;
    const T* base = qkv + (size_t)b * t * rs + (size_t)hh * d;
    const T* dob = dout + (size_t)b * t * c + (size_t)hh * d;
    fa_load_rows(base + c, rs, c0, FA_BK, t, d, k_s);
    fa_load_rows(base + 2 * (size_t)c, rs, c0, FA_BK, t, d, v_s);
    int x = threadIdx.x % FA_DMAX, j0 = threadIdx.x / FA_DMAX;
    float dk[PER], dv[PER];
#pragma unroll
    for (int e = 0; e < PER; e++) dk[e] = dv[e] = 0.0f;
    for (int i0 = c0; i0 < t; i0 += FA_BR) {
        __syncthreads();
        fa_load_rows(base, rs, i0, FA_BR, t, d, q_s);
        fa_load_rows(dob, (size_t)c, i0, FA_BR, t, d, do_s);
        fa_load_row_stats(lse + (size_t)bh * t, delta + (size_t)bh * t, i0, t, lse_s, delta_s);
        __syncthreads();
        fa_bwd_tile(q_s, do_s, lse_s, delta_s, k_s, v_s, p_s, ds_s, i0, c0, t, d, scale);
        __syncthreads();
        for (int i = 0; i < FA_BR; i++) {
            float qx = q_s[i][x], gx = do_s[i][x];
#pragma unroll
            for (int e = 0; e < PER; e++) {
                int j = j0 + e * (32 * WARPS / FA_DMAX);
                dv[e] += p_s[i][j] * gx;
                dk[e] += ds_s[i][j] * qx;
            }
        }
    }
    if (x >= d) return;
#pragma unroll
    for (int e = 0; e < PER; e++) {
        int j = c0 + j0 + e * (32 * WARPS / FA_DMAX);
        if (j >= t) continue;
        T* row = dqkv + ((size_t)b * t + j) * rs + (size_t)hh * d + x;
        row[c] = from_f<T>(dk[e]);
        row[2 * (size_t)c] = from_f<T>(dv[e]);
    }
}

// dQ of one query chunk: thread owns (row tid/64 + 4e, dim tid%64), summing key tiles and keys
// in increasing order.
template <typename T>
__device__ void flash_attention_bwd_dq(const T* qkv, const T* dout, const float* lse, const float* delta, T* dqkv, int t, int c, int h, int d,
                                       float scale) {
    __shared__ float k_s[FA_BK][FA_DMAX + 1], v_s[FA_BK][FA_DMAX + 1];
    __shared__ float q_s[FA_BR][FA_DMAX + 1], do_s[FA_BR][FA_DMAX + 1];
    __shared__ float p_s[FA_BR][FA_BK + 1], ds_s[FA_BR][FA_BK + 1];
    __shared__ float lse_s[FA_BR], delta_s[FA_BR];
    const int PER = FA_BR * FA_DMAX / (32 * WARPS);
    int bh = blockIdx.y, b = bh / h, hh = bh % h;
    int i0 = (gridDim.x - 1 - blockIdx.x) * FA_BR; // late rows see the most keys: they go first
    size_t rs = 3 * (size_t)c;
    const T* base = qkv + (size_t)b * t * rs + (size_t)hh * d;
    fa_load_rows(base, rs, i0, FA_BR, t, d, q_s);
    fa_load_rows(dout + (size_t)b * t * c + (size_t)hh * d, (size_t)c, i0, FA_BR, t, d, do_s);
    fa_load_row_stats(lse + (size_t)bh * t, delta + (size_t)bh * t, i0, t, lse_s, delta_s);
    int x = threadIdx.x % FA_DMAX, r0 = threadIdx.x / FA_DMAX;
    float dq[PER];
#pragma unroll
    for (int e = 0; e < PER; e++) dq[e] = 0.0f;
    int last = min(t, i0 + FA_BR) - 1;
    for (int c0 = 0; c0 <= last; c0 += FA_BK) {
        __syncthreads();
        fa_load_rows(base + c, rs, c0, FA_BK, t, d, k_s);
        fa_load_rows(base + 2 * (size_t)c, rs, c0, FA_BK, t, d, v_s);
        __syncthreads();
        fa_bwd_tile(q_s, do_s, lse_s, delta_s, k_s, v_s, p_s, ds_s, i0, c0, t, d, scale);
        __syncthreads();
        for (int j = 0; j < FA_BK; j++) {
            float kx = k_s[j][x];
#pragma unroll
            for (int e = 0; e < PER; e++) dq[e] += ds_s[r0 + e * (32 * WARPS / FA_DMAX)][j] * kx;
        }
    }
    if (x >= d) return;
#pragma unroll
    for (int e = 0; e < PER; e++) {
        int i = i0 + r0 + e * (32 * WARPS / FA_DMAX);
        if (i < t) dqkv[((size_t)b * t + i) * rs + (size_t)hh * d + x] = from_f<T>(dq[e]);
    }
}

// ---- AdamW over many tensors in one launch -----------------------------------------------------
//
// The update of engine/src/optim.rs (PyTorch's AdamW) on f32 master weights and moments, from
// f32 or bf16 gradients (the kernel's dtype suffix is the gradient's) first multiplied by the
// clipping factor (`grad_scale`, 1 for none), optionally writing a bf16 copy of each updated parameter. Every operation is an explicit round-to-nearest
// intrinsic so nvcc cannot contract pairs into FMAs: the result then equals the CPU twin
// (kernels/src/adamw.rs) and the engine's candle composition bit for bit. Elementwise, so
// deterministic with no reductions at all.
//
// One launch covers every tensor: `table` holds 7 u64 per tensor (param, exp_avg, exp_avg_sq,
// grad, bf16 copy or 0, length, decay flag) and `chunks` 2 u64 per block (tensor, first
// element); a block updates ADAMW_CHUNK elements of one tensor.

#define ADAMW_CHUNK 65536

template <typename G>
__device__ void adamw_step(const uint64_t* table, const uint64_t* chunks, int n_chunks, float beta1, float one_minus_beta1, float beta2,
                           float one_minus_beta2, float inv_sqrt_bc2, float eps, float step_size, float decay_factor,
                           float grad_scale) {
    int ci = blockIdx.x;
    if (ci >= n_chunks) return;
    const uint64_t* e = table + 7 * chunks[2 * ci];
    float* p = (float*)e[0];
    float* m = (float*)e[1];
    float* v = (float*)e[2];
    const G* g = (const G*)e[3];
    __nv_bfloat16* copy = (__nv_bfloat16*)e[4];
    size_t n = e[5];
    bool decay = e[6] != 0;
    size_t start = chunks[2 * ci + 1], end = min(n, (size_t)(start + ADAMW_CHUNK));
    for (size_t i = start + threadIdx.x; i < end; i += blockDim.x) {
        float gi = __fmul_rn(to_f(g[i]), grad_scale);
        float mi = __fadd_rn(__fmul_rn(m[i], beta1), __fmul_rn(gi, one_minus_beta1));
        float vi = __fadd_rn(__fmul_rn(v[i], beta2), __fmul_rn(__fmul_rn(gi, gi), one_minus_beta2));
        float denom = __fadd_rn(__fmul_rn(__fsqrt_rn(vi), inv_sqrt_bc2), eps);
        float pi = decay ? __fmul_rn(p[i], decay_factor) : p[i];
        pi = __fsub_rn(pi, __fmul_rn(__fdiv_rn(mi, denom), step_size));
        m[i] = mi;
        v[i] = vi;
        p[i] = pi;
        if (copy) copy[i] = __float2bfloat16(pi);
    }
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
    extern "C" __global__ void sum_to_scalar_##S(const float* x, float* out, int n) { sum_to_scalar(x, out, n); } \
    extern "C" __global__ void cross_entropy_bwd_##S(const T* logits, const uint32_t* targets, const float* g, T* d, \
                                                     int rows, int v) {                                          \
        cross_entropy_bwd(logits, targets, g, d, rows, v);                                                       \
    }                                                                                                            \
    extern "C" __global__ void flash_attention_fwd_##S(const T* qkv, T* out, float* lse, int t, int c, int h, int d,     \
                                                       float scale) {                                            \
        flash_attention_fwd(qkv, out, lse, t, c, h, d, scale);                                                   \
    }                                                                                                            \
    extern "C" __global__ void flash_attention_bwd_delta_##S(const T* out, const T* dout, float* delta, int rows, \
                                                             int t, int c, int h, int d) {                       \
        flash_attention_bwd_delta(out, dout, delta, rows, t, c, h, d);                                           \
    }                                                                                                            \
    extern "C" __global__ void flash_attention_bwd_dkdv_##S(const T* qkv, const T* dout, const float* lse,        \
                                                            const float* delta, T* dqkv, int t, int c, int h,    \
                                                            int d, float scale) {                                \
        flash_attention_bwd_dkdv(qkv, dout, lse, delta, dqkv, t, c, h, d, scale);                                \
    }                                                                                                            \
    extern "C" __global__ void flash_attention_bwd_dq_##S(const T* qkv, const T* dout, const float* lse,          \
                                                          const float* delta, T* dqkv, int t, int c, int h, int d, \
                                                          float scale) {                                         \
        flash_attention_bwd_dq(qkv, dout, lse, delta, dqkv, t, c, h, d, scale);                                  \
    }                                                                                                            \
    extern "C" __global__ void adamw_step_##S(const uint64_t* table, const uint64_t* chunks, int n_chunks,         \
                                              float beta1, float omb1, float beta2, float omb2, float inv_sqrt_bc2,  \
                                              float eps, float step_size, float decay_factor, float grad_scale) {   \
        adamw_step<T>(table, chunks, n_chunks, beta1, omb1, beta2, omb2, inv_sqrt_bc2, eps, step_size,           \
                      decay_factor, grad_scale);                                                                 \
    }

INSTANTIATE(float, f32)
INSTANTIATE(__nv_bfloat16, bf16)

// ---- Llama: RMSNorm, RoPE, SwiGLU (twins of kernels/src/{rms_norm,rope,swiglu}.rs) ------------

// 1 / sqrt(mean(x²) + eps) of a row (one warp).
template <typename T>
__device__ float row_inv_rms(const T* xr, int c, float eps) {
    float s = 0.0f;
    for (int i = lane(); i < c; i += 32) {
        float v = to_f(xr[i]);
        s += v * v;
    }
    return rsqrtf(warp_sum(s) / c + eps);
}

template <typename T>
__device__ void rms_norm_fwd(const T* x, const T* w, T* y, int rows, int c, float eps) {
    int r = warp_row();
    if (r >= rows) return;
    const T* xr = x + (size_t)r * c;
    float inv = row_inv_rms(xr, c, eps);
    for (int i = lane(); i < c; i += 32) y[(size_t)r * c + i] = from_f<T>(to_f(xr[i]) * inv * to_f(w[i]));
}

// dx = r (g − n mean(g n)), n = x r, g = dy w; saves r per row for the gain's partial sums.
template <typename T>
__device__ void rms_norm_bwd_dx(const T* x, const T* w, const T* dy, T* dx, float* inv_rms, int rows, int c, float eps) {
    int r = warp_row();
    if (r >= rows) return;
    const T* xr = x + (size_t)r * c;
    const T* gr = dy + (size_t)r * c;
    float inv = row_inv_rms(xr, c, eps);
    float gx = 0.0f;
    for (int i = lane(); i < c; i += 32) gx += to_f(gr[i]) * to_f(w[i]) * to_f(xr[i]);
    float mean_gn = warp_sum(gx) * inv / c;
    for (int i = lane(); i < c; i += 32)
        dx[(size_t)r * c + i] = from_f<T>((to_f(gr[i]) * to_f(w[i]) - to_f(xr[i]) * inv * mean_gn) * inv);
    if (lane() == 0) inv_rms[r] = inv;
}

// Partial dweight: block (column tile, row chunk) sums dy · n over its rows, rows in order.
template <typename T>
__device__ void rms_norm_bwd_partial(const T* x, const T* dy, const float* inv_rms, float* partials, int rows, int c, int rows_per_chunk) {
    int col = blockIdx.x * blockDim.x + threadIdx.x;
    int chunk = blockIdx.y;
    if (col >= c) return;
    int r0 = chunk * rows_per_chunk, r1 = min(rows, r0 + rows_per_chunk);
    float dw = 0.0f;
    for (int r = r0; r < r1; r++) dw += to_f(dy[(size_t)r * c + col]) * to_f(x[(size_t)r * c + col]) * inv_rms[r];
    partials[(size_t)chunk * c + col] = dw;
}

// Sums the chunks' partials in chunk order into dweight.
template <typename T>
__device__ void rms_norm_bwd_reduce(const float* partials, T* out, int c, int chunks) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= c) return;
    float s = 0.0f;
    for (int k = 0; k < chunks; k++) s += partials[(size_t)k * c + j];
    out[j] = from_f<T>(s);
}

// x (B, T, H, D), tables (T, D): y = x cos + rotate_half(x) sin, or with `transpose` the
// backward dy cos − rotate_half(dy sin). One thread per element.
template <typename T>
__device__ void rope(const T* x, const T* cs, const T* sn, T* y, size_t n, int t, int h, int d, int transpose) {
    int half = d / 2;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        int j = (int)(i % d);
        size_t head = i / d;
        int p = (int)((head / h) % t);
        const T* cr = cs + (size_t)p * d;
        const T* sr = sn + (size_t)p * d;
        float v = to_f(x[i]);
        float out;
        if (j < half) {
            float other = to_f(x[i + half]);
            out = transpose ? v * to_f(cr[j]) + other * to_f(sr[j + half]) : v * to_f(cr[j]) - other * to_f(sr[j]);
        } else {
            float other = to_f(x[i - half]);
            out = transpose ? v * to_f(cr[j]) - other * to_f(sr[j - half]) : v * to_f(cr[j]) + other * to_f(sr[j]);
        }
        y[i] = from_f<T>(out);
    }
}

// [gate | up] (rows, 2F) -> silu(gate) up (rows, F).
template <typename T>
__device__ void swiglu_fwd(const T* gu, T* a, size_t n, int f) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        size_t r = i / f;
        int j = (int)(i % f);
        float g = to_f(gu[r * 2 * f + j]), u = to_f(gu[r * 2 * f + f + j]);
        float s = 1.0f / (1.0f + __expf(-g));
        a[i] = from_f<T>(g * s * u);
    }
}

// ([gate | up], da) -> [dgate | dup]: du = da g σ, dg = da u σ (1 + g (1 − σ)).
template <typename T>
__device__ void swiglu_bwd(const T* gu, const T* da, T* dgu, size_t n, int f) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        size_t r = i / f;
        int j = (int)(i % f);
        float g = to_f(gu[r * 2 * f + j]), u = to_f(gu[r * 2 * f + f + j]), d = to_f(da[i]);
        float s = 1.0f / (1.0f + __expf(-g));
        dgu[r * 2 * f + j] = from_f<T>(d * u * (s * (1.0f + g * (1.0f - s))));
        dgu[r * 2 * f + f + j] = from_f<T>(d * g * s);
    }
}

#define INSTANTIATE_LLAMA(T, S)                                                                                  \
    extern "C" __global__ void rms_norm_fwd_##S(const T* x, const T* w, T* y, int rows, int c, float eps) {    \
        rms_norm_fwd(x, w, y, rows, c, eps);                                                                     \
    }                                                                                                            \
    extern "C" __global__ void rms_norm_bwd_dx_##S(const T* x, const T* w, const T* dy, T* dx, float* inv_rms,  \
                                                   int rows, int c, float eps) {                                 \
        rms_norm_bwd_dx(x, w, dy, dx, inv_rms, rows, c, eps);                                                    \
    }                                                                                                            \
    extern "C" __global__ void rms_norm_bwd_partial_##S(const T* x, const T* dy, const float* inv_rms,          \
                                                        float* partials, int rows, int c, int per_chunk) {       \
        rms_norm_bwd_partial(x, dy, inv_rms, partials, rows, c, per_chunk);                                      \
    }                                                                                                            \
    extern "C" __global__ void rms_norm_bwd_reduce_##S(const float* partials, T* out, int c, int chunks) {      \
        rms_norm_bwd_reduce(partials, out, c, chunks);                                                           \
    }                                                                                                            \
    extern "C" __global__ void rope_##S(const T* x, const T* cs, const T* sn, T* y, size_t n, int t, int h,     \
                                        int d, int transpose) {                                                  \
        rope(x, cs, sn, y, n, t, h, d, transpose);                                                               \
    }                                                                                                            \
    extern "C" __global__ void swiglu_fwd_##S(const T* gu, T* a, size_t n, int f) { swiglu_fwd(gu, a, n, f); }  \
    extern "C" __global__ void swiglu_bwd_##S(const T* gu, const T* da, T* dgu, size_t n, int f) {              \
        swiglu_bwd(gu, da, dgu, n, f);                                                                           \
    }

INSTANTIATE_LLAMA(float, f32)
INSTANTIATE_LLAMA(__nv_bfloat16, bf16)
