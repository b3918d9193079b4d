// Runs brigade.cu's kernels on the host, for checking their indexing without a GPU: every
// CUDA thread of a block is a std::thread, __syncthreads is a block barrier, warp shuffles go
// through a per-warp buffer between two warp barriers, __shared__ arrays are statics (blocks
// run one after another, so a block has them to itself). Slow (OS threads), exact in f32
// apart from libm's expf/logf against CUDA's, and only for small sizes.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
inline dim3 blockIdx, blockDim, gridDim;
inline thread_local dim3 threadIdx;

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

inline std::unique_ptr<std::barrier<>> g_block_barrier;
inline std::vector<std::unique_ptr<std::barrier<>>> g_warp_barriers;
inline std::vector<float> g_warp_buf;

inline void __syncthreads() { g_block_barrier->arrive_and_wait(); }

inline float shfl_exchange(float v, int src_lane) {
    int w = threadIdx.x / 32, l = threadIdx.x % 32;
    g_warp_buf[w * 32 + l] = v;
    g_warp_barriers[w]->arrive_and_wait();
    float r = g_warp_buf[w * 32 + (src_lane & 31)];
    g_warp_barriers[w]->arrive_and_wait();
    return r;
}
inline float __shfl_xor_sync(unsigned, float v, int o) { return shfl_exchange(v, (threadIdx.x % 32) ^ o); }
inline float __shfl_sync(unsigned, float v, int src) { return shfl_exchange(v, src); }

template <class T> inline T min(T a, T b) { return a < b ? a : b; }
template <class T> inline T max(T a, T b) { return a > b ? a : b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }

// Runs `kernel` over the grid, block by block.
inline void launch(dim3 grid, dim3 block, const std::function<void()>& kernel) {
    gridDim = grid;
    blockDim = block;
    int n = block.x;
    for (unsigned by = 0; by < grid.y; by++)
        for (unsigned bx = 0; bx < grid.x; bx++) {
            blockIdx = {bx, by, 1};
            g_block_barrier = std::make_unique<std::barrier<>>(n);
            g_warp_barriers.clear();
            for (int w = 0; w < (n + 31) / 32; w++) g_warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
            g_warp_buf.assign(n + 32, 0.0f);
            std::vector<std::thread> threads;
            for (int t = 0; t < n; t++)
                threads.emplace_back([t, &kernel] {
                    threadIdx = {unsigned(t), 0, 0};
                    kernel();
                    // An exited thread no longer holds back its block's or warp's barriers.
                    g_warp_barriers[t / 32]->arrive_and_drop();
                    g_block_barrier->arrive_and_drop();
                });
            for (auto& th : threads) th.join();
        }
}
