// Host emulation check of brigade.cu's flash-attention and AdamW kernels (see cuda_shim.h):
// runs the kernels' own source on small odd sizes and compares with a direct f64 computation.
// Build and run: kernels/cuda/emulate/run.sh. Exits non-zero on any mismatch.
#include "cuda_shim.h"
#include "../brigade.cu"

#include <random>

static int failures = 0;

static void expect(const char* what, double got, double want, double tol) {
    double err = std::fabs(got - want) / (1.0 + std::fabs(want));
    if (!(err <= tol)) {
        if (failures < 20) std::printf("MISMATCH %s: got %.9g want %.9g (err %.3g)\n", what, got, want, err);
        failures++;
    }
}

// Causal attention in f64 on qkv (B, T, 3C): out (B, T, C), lse (B, H, T) and, for dout,
// dqkv (B, T, 3C).
static void reference(const std::vector<float>& qkv, const std::vector<float>& dout, int b, int t, int c, int h, std::vector<double>& out,
                      std::vector<double>& lse, std::vector<double>& dqkv) {
    int d = c / h;
    double scale = 1.0 / std::sqrt((double)d);
    out.assign((size_t)b * t * c, 0);
    lse.assign((size_t)b * h * t, 0);
    dqkv.assign((size_t)b * t * 3 * c, 0);
    auto at = [&](int bi, int i, int part, int hh, int x) { return (double)qkv[((size_t)bi * t + i) * 3 * c + part * c + hh * d + x]; };
    for (int bi = 0; bi < b; bi++)
        for (int hh = 0; hh < h; hh++) {
            std::vector<double> p((size_t)t * t, 0), dp((size_t)t * t, 0);
            for (int i = 0; i < t; i++) {
                double m = -INFINITY;
                for (int j = 0; j <= i; j++) {
                    double s = 0;
                    for (int x = 0; x < d; x++) s += at(bi, i, 0, hh, x) * at(bi, j, 1, hh, x);
                    p[(size_t)i * t + j] = s * scale;
                    m = std::max(m, s * scale);
                }
                double sum = 0;
                for (int j = 0; j <= i; j++) sum += std::exp(p[(size_t)i * t + j] - m);
                lse[((size_t)bi * h + hh) * t + i] = m + std::log(sum);
                for (int j = 0; j <= i; j++) p[(size_t)i * t + j] = std::exp(p[(size_t)i * t + j] - m) / sum;
                for (int x = 0; x < d; x++) {
                    double o = 0;
                    for (int j = 0; j <= i; j++) o += p[(size_t)i * t + j] * at(bi, j, 2, hh, x);
                    out[((size_t)bi * t + i) * c + hh * d + x] = o;
                }
            }
            auto dy = [&](int i, int x) { return (double)dout[((size_t)bi * t + i) * c + hh * d + x]; };
            for (int i = 0; i < t; i++) {
                double delta = 0;
                for (int j = 0; j <= i; j++) {
                    double g = 0;
                    for (int x = 0; x < d; x++) g += dy(i, x) * at(bi, j, 2, hh, x);
                    dp[(size_t)i * t + j] = g;
                    delta += g * p[(size_t)i * t + j];
                }
                for (int j = 0; j <= i; j++) {
                    double ds = scale * p[(size_t)i * t + j] * (dp[(size_t)i * t + j] - delta);
                    for (int x = 0; x < d; x++) {
                        dqkv[((size_t)bi * t + i) * 3 * c + hh * d + x] += ds * at(bi, j, 1, hh, x);
                        dqkv[((size_t)bi * t + j) * 3 * c + c + hh * d + x] += ds * at(bi, i, 0, hh, x);
                        dqkv[((size_t)bi * t + j) * 3 * c + 2 * c + hh * d + x] += p[(size_t)i * t + j] * dy(i, x);
                    }
                }
            }
        }
}

static void check_flash(int b, int t, int c, int h) {
    int d = c / h;
    std::mt19937 rng(b * 1000 + t);
    std::uniform_real_distribution<float> u(-2.0f, 2.0f);
    std::vector<float> qkv((size_t)b * t * 3 * c), dout((size_t)b * t * c);
    for (auto& x : qkv) x = u(rng);
    for (auto& x : dout) x = u(rng) * 0.5f;
    std::vector<double> ro, rl, rd;
    reference(qkv, dout, b, t, c, h, ro, rl, rd);

    std::vector<float> out((size_t)b * t * c, NAN), lse((size_t)b * h * t, NAN), delta((size_t)b * h * t, NAN), dqkv((size_t)b * t * 3 * c, NAN);
    float scale = 1.0f / std::sqrt((float)d);
    unsigned bh = b * h;
    launch({(unsigned)((t + FA_BQ - 1) / FA_BQ), bh, 1}, {32 * WARPS, 1, 1},
           [&] { flash_attention_fwd_f32(qkv.data(), out.data(), lse.data(), t, c, h, d, scale); });
    int rows = b * h * t;
    launch({(unsigned)((rows + WARPS - 1) / WARPS), 1, 1}, {32 * WARPS, 1, 1},
           [&] { flash_attention_bwd_delta_f32(out.data(), dout.data(), delta.data(), rows, t, c, h, d); });
    dim3 tiles{(unsigned)((t + FA_BR - 1) / FA_BR), bh, 1};
    launch(tiles, {32 * WARPS, 1, 1}, [&] { flash_attention_bwd_dkdv_f32(qkv.data(), dout.data(), lse.data(), delta.data(), dqkv.data(), t, c, h, d, scale); });
    launch(tiles, {32 * WARPS, 1, 1}, [&] { flash_attention_bwd_dq_f32(qkv.data(), dout.data(), lse.data(), delta.data(), dqkv.data(), t, c, h, d, scale); });

    int before = failures;
    char what[64];
    std::snprintf(what, sizeof what, "flash out b%d t%d c%d h%d", b, t, c, h);
    for (size_t i = 0; i < out.size(); i++) expect(what, out[i], ro[i], 2e-5);
    std::snprintf(what, sizeof what, "flash lse b%d t%d c%d h%d", b, t, c, h);
    for (size_t i = 0; i < lse.size(); i++) expect(what, lse[i], rl[i], 2e-5);
    std::snprintf(what, sizeof what, "flash dqkv b%d t%d c%d h%d", b, t, c, h);
    for (size_t i = 0; i < dqkv.size(); i++) expect(what, dqkv[i], rd[i], 2e-5);
    std::printf("flash attention b=%d t=%d c=%d h=%d (d=%d): %s\n", b, t, c, h, d, failures == before ? "ok" : "FAILED");
}

static void check_adamw() {
    // Two tensors, one longer than a block's chunk, one without decay; f32 and bf16 gradients.
    std::vector<size_t> sizes = {ADAMW_CHUNK + 37, 5};
    std::mt19937 rng(7);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    float b1 = 0.9f, omb1 = (float)(1.0 - 0.9), b2 = 0.95f, omb2 = (float)(1.0 - 0.95);
    double bc1 = 1 - std::pow(0.9, 3), bc2 = 1 - std::pow(0.95, 3);
    float inv = (float)(1 / std::sqrt(bc2)), eps = 1e-8f, step = (float)(6e-4 / bc1), decay = (float)(1 - 6e-4 * 0.1);
    for (int bf = 0; bf < 2; bf++) {
        std::vector<std::vector<float>> p, m, v, g;
        std::vector<std::vector<__nv_bfloat16>> g16, copy;
        std::vector<uint64_t> table, chunks;
        for (size_t k = 0; k < sizes.size(); k++) {
            size_t n = sizes[k];
            p.emplace_back(n), m.emplace_back(n), v.emplace_back(n), g.emplace_back(n), g16.emplace_back(n), copy.emplace_back(n);
            for (size_t i = 0; i < n; i++) {
                p[k][i] = u(rng), m[k][i] = u(rng) * 0.1f, v[k][i] = std::fabs(u(rng)) * 0.01f;
                g16[k][i] = __float2bfloat16(u(rng));
                g[k][i] = bf ? __bfloat162float(g16[k][i]) : u(rng);
            }
        }
        auto want_p = p, want_m = m, want_v = v;
        for (size_t k = 0; k < sizes.size(); k++)
            for (size_t i = 0; i < sizes[k]; i++) {
                float gi = g[k][i];
                float& mi = want_m[k][i];
                float& vi = want_v[k][i];
                mi = mi * b1 + gi * omb1;
                vi = vi * b2 + (gi * gi) * omb2;
                float den = std::sqrt(vi) * inv + eps;
                float pi = k == 0 ? want_p[k][i] * decay : want_p[k][i];
                want_p[k][i] = pi - (mi / den) * step;
            }
        for (size_t k = 0; k < sizes.size(); k++) {
            const void* gp = bf ? (const void*)g16[k].data() : (const void*)g[k].data();
            table.insert(table.end(), {(uint64_t)p[k].data(), (uint64_t)m[k].data(), (uint64_t)v[k].data(), (uint64_t)gp, (uint64_t)copy[k].data(),
                                       (uint64_t)sizes[k], (uint64_t)(k == 0)});
            for (size_t s = 0; s < sizes[k]; s += ADAMW_CHUNK) chunks.insert(chunks.end(), {(uint64_t)k, (uint64_t)s});
        }
        int n_chunks = chunks.size() / 2;
        launch({(unsigned)n_chunks, 1, 1}, {256, 1, 1}, [&] {
            if (bf)
                adamw_step_bf16(table.data(), chunks.data(), n_chunks, b1, omb1, b2, omb2, inv, eps, step, decay);
            else
                adamw_step_f32(table.data(), chunks.data(), n_chunks, b1, omb1, b2, omb2, inv, eps, step, decay);
        });
        int before = failures;
        for (size_t k = 0; k < sizes.size(); k++)
            for (size_t i = 0; i < sizes[k]; i++) {
                expect("adamw param", p[k][i], want_p[k][i], 0);
                expect("adamw exp_avg", m[k][i], want_m[k][i], 0);
                expect("adamw exp_avg_sq", v[k][i], want_v[k][i], 0);
                expect("adamw bf16 copy", __bfloat162float(copy[k][i]), __bfloat162float(__float2bfloat16(want_p[k][i])), 0);
            }
        std::printf("adamw (%s gradients): %s\n", bf ? "bf16" : "f32", failures == before ? "ok" : "FAILED");
    }
}

int main() {
    check_flash(1, 1, 64, 1);
    check_flash(2, 5, 16, 2);
    check_flash(1, 33, 64, 1);
    check_flash(1, 70, 64, 2);
    check_flash(2, 97, 96, 3);
    check_flash(1, 70, 128, 2);
    check_adamw();
    std::printf("%s\n", failures ? "FAILED" : "all ok");
    return failures ? 1 : 0;
}
