// Host emulation check of brigade.cu's kernels (see cuda_shim.h): runs the kernels' own source
// (f32 instantiations; bf16 shares every line but the loads and stores) on small odd sizes,
// with the launch geometry kernels/src/cuda.rs uses, and compares with a direct f64 computation.
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
    float scale = 0.37f;  // a clipping factor
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
                float gi = g[k][i] * scale;
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
                adamw_step_bf16(table.data(), chunks.data(), n_chunks, b1, omb1, b2, omb2, inv, eps, step, decay, scale);
            else
                adamw_step_f32(table.data(), chunks.data(), n_chunks, b1, omb1, b2, omb2, inv, eps, step, decay, scale);
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

// ---- the row and elementwise kernels ----------------------------------------------------------

static dim3 rows_grid(int rows) { return {(unsigned)((rows + WARPS - 1) / WARPS), 1, 1}; }
static const dim3 ROWS_BLOCK{32 * WARPS, 1, 1};
static dim3 elems_grid(size_t n) { return {(unsigned)((n + 1023) / 1024), 1, 1}; }
static const dim3 ELEMS_BLOCK{1024, 1, 1};

static std::vector<float> randv(std::mt19937& rng, size_t n, float scale) {
    std::uniform_real_distribution<float> u(-scale, scale);
    std::vector<float> v(n);
    for (auto& x : v) x = u(rng);
    return v;
}

static void check_all(const char* what, const std::vector<float>& got, const std::vector<double>& want, double tol) {
    int before = failures;
    for (size_t i = 0; i < got.size(); i++) expect(what, got[i], want[i], tol);
    std::printf("%s: %s\n", what, failures == before ? "ok" : "FAILED");
}

static void check_gelu() {
    std::mt19937 rng(1);
    size_t n = 3000;
    auto x = randv(rng, n, 5), dy = randv(rng, n, 1);
    std::vector<float> y(n, NAN), dx(n, NAN);
    launch(elems_grid(n), ELEMS_BLOCK, [&] { gelu_tanh_fwd_f32(x.data(), y.data(), n); });
    launch(elems_grid(n), ELEMS_BLOCK, [&] { gelu_tanh_bwd_f32(x.data(), dy.data(), dx.data(), n); });
    std::vector<double> wy(n), wdx(n);
    const double a = 0.7978845608028654, b = 0.044715;
    for (size_t i = 0; i < n; i++) {
        double v = x[i], t = std::tanh(a * v * (1 + b * v * v));
        wy[i] = 0.5 * v * (1 + t);
        wdx[i] = dy[i] * (0.5 * (1 + t) + 0.5 * v * (1 - t * t) * a * (1 + 3 * b * v * v));
    }
    check_all("gelu_tanh_fwd", y, wy, 1e-5);
    check_all("gelu_tanh_bwd", dx, wdx, 1e-5);
}

static void check_layer_norm(int rows, int c) {
    std::mt19937 rng(rows * 7 + c);
    auto x = randv(rng, (size_t)rows * c, 2), w = randv(rng, c, 1), bb = randv(rng, c, 1), dy = randv(rng, (size_t)rows * c, 1);
    for (auto& v : x) v += 0.5f;
    std::vector<float> y((size_t)rows * c, NAN), dx((size_t)rows * c, NAN), stats(2 * rows, NAN);
    float eps = 1e-5f;
    launch(rows_grid(rows), ROWS_BLOCK, [&] { layer_norm_fwd_f32(x.data(), w.data(), bb.data(), y.data(), rows, c, eps); });
    launch(rows_grid(rows), ROWS_BLOCK, [&] { layer_norm_bwd_dx_f32(x.data(), w.data(), dy.data(), dx.data(), stats.data(), rows, c, eps); });
    int per = 4, chunks = (rows + per - 1) / per;
    std::vector<float> partials((size_t)chunks * 2 * c, NAN), dwb(2 * c, NAN);
    launch({(unsigned)((c + 255) / 256), (unsigned)chunks, 1}, {256, 1, 1},
           [&] { layer_norm_bwd_partial_f32(x.data(), dy.data(), stats.data(), partials.data(), rows, c, per); });
    launch(elems_grid(2 * c), ELEMS_BLOCK, [&] { layer_norm_bwd_reduce_f32(partials.data(), dwb.data(), c, chunks); });
    std::vector<double> wy((size_t)rows * c), wdx((size_t)rows * c), wdwb(2 * c, 0.0);
    for (int r = 0; r < rows; r++) {
        double m = 0, q = 0;
        for (int i = 0; i < c; i++) m += x[(size_t)r * c + i];
        m /= c;
        for (int i = 0; i < c; i++) q += (x[(size_t)r * c + i] - m) * (x[(size_t)r * c + i] - m);
        double rstd = 1 / std::sqrt(q / c + eps), gs = 0, gxs = 0;
        for (int i = 0; i < c; i++) {
            size_t k = (size_t)r * c + i;
            double xh = (x[k] - m) * rstd, g = (double)dy[k] * w[i];
            wy[k] = xh * w[i] + bb[i];
            gs += g;
            gxs += g * xh;
            wdwb[i] += dy[k] * xh;
            wdwb[c + i] += dy[k];
        }
        for (int i = 0; i < c; i++) {
            size_t k = (size_t)r * c + i;
            double xh = (x[k] - m) * rstd;
            wdx[k] = ((double)dy[k] * w[i] - gs / c - xh * gxs / c) * rstd;
        }
    }
    char what[64];
    std::snprintf(what, sizeof what, "layer_norm_fwd rows %d c %d", rows, c);
    check_all(what, y, wy, 1e-5);
    std::snprintf(what, sizeof what, "layer_norm_bwd_dx rows %d c %d", rows, c);
    check_all(what, dx, wdx, 1e-5);
    std::snprintf(what, sizeof what, "layer_norm_bwd dw/db rows %d c %d", rows, c);
    check_all(what, dwb, wdwb, 1e-5);
}

static void check_softmax(int rows, int c) {
    std::mt19937 rng(rows * 11 + c);
    auto x = randv(rng, (size_t)rows * c, 3), dy = randv(rng, (size_t)rows * c, 1);
    for (int log = 0; log < 2; log++) {
        std::vector<float> y((size_t)rows * c, NAN), dx((size_t)rows * c, NAN);
        launch(rows_grid(rows), ROWS_BLOCK, [&] { softmax_fwd_f32(x.data(), y.data(), rows, c, log); });
        launch(rows_grid(rows), ROWS_BLOCK, [&] { softmax_bwd_f32(y.data(), dy.data(), dx.data(), rows, c, log); });
        std::vector<double> wy((size_t)rows * c), wdx((size_t)rows * c);
        for (int r = 0; r < rows; r++) {
            double m = -INFINITY, s = 0, dsum = 0;
            for (int i = 0; i < c; i++) m = std::max(m, (double)x[(size_t)r * c + i]);
            for (int i = 0; i < c; i++) s += std::exp(x[(size_t)r * c + i] - m);
            for (int i = 0; i < c; i++) {
                size_t k = (size_t)r * c + i;
                double p = std::exp(x[k] - m) / s;
                wy[k] = log ? x[k] - m - std::log(s) : p;
                dsum += log ? dy[k] : dy[k] * p;
            }
            for (int i = 0; i < c; i++) {
                size_t k = (size_t)r * c + i;
                double p = std::exp(x[k] - m) / s;
                // The backward reads the forward's (f32) output, as on the GPU.
                wdx[k] = log ? dy[k] - std::exp((double)y[k]) * dsum : y[k] * (dy[k] - dsum);
            }
        }
        char what[64];
        std::snprintf(what, sizeof what, "%s rows %d c %d", log ? "log_softmax" : "softmax", rows, c);
        check_all(what, y, wy, 1e-5);
        std::snprintf(what, sizeof what, "%s_bwd rows %d c %d", log ? "log_softmax" : "softmax", rows, c);
        check_all(what, dx, wdx, 1e-5);
    }
}

static void check_causal_softmax(int heads, int t) {
    std::mt19937 rng(heads * 13 + t);
    int rows = heads * t;
    float scale = 0.3f;
    auto s = randv(rng, (size_t)rows * t, 4), dp = randv(rng, (size_t)rows * t, 1);
    std::vector<float> p((size_t)rows * t, NAN), ds((size_t)rows * t, NAN);
    launch(rows_grid(rows), ROWS_BLOCK, [&] { causal_softmax_fwd_f32(s.data(), p.data(), rows, t, scale); });
    launch(rows_grid(rows), ROWS_BLOCK, [&] { causal_softmax_bwd_f32(p.data(), dp.data(), ds.data(), rows, t, scale); });
    std::vector<double> wp((size_t)rows * t, 0.0), wds((size_t)rows * t, 0.0);
    for (int r = 0; r < rows; r++) {
        int q = r % t;
        size_t o = (size_t)r * t;
        double m = -INFINITY, sum = 0, dot = 0;
        for (int j = 0; j <= q; j++) m = std::max(m, (double)s[o + j] * scale);
        for (int j = 0; j <= q; j++) sum += std::exp(s[o + j] * scale - m);
        for (int j = 0; j <= q; j++) {
            wp[o + j] = std::exp(s[o + j] * scale - m) / sum;
            dot += (double)dp[o + j] * p[o + j];
        }
        for (int j = 0; j <= q; j++) wds[o + j] = scale * p[o + j] * (dp[o + j] - dot);
    }
    char what[64];
    std::snprintf(what, sizeof what, "causal_softmax heads %d t %d", heads, t);
    check_all(what, p, wp, 1e-5);
    std::snprintf(what, sizeof what, "causal_softmax_bwd heads %d t %d", heads, t);
    check_all(what, ds, wds, 1e-5);
}

static void check_cross_entropy(int rows, int v) {
    std::mt19937 rng(rows * 17 + v);
    auto x = randv(rng, (size_t)rows * v, 4);
    std::vector<uint32_t> targets(rows);
    for (int r = 0; r < rows; r++) targets[r] = rng() % v;
    std::vector<float> row_loss(rows, NAN), loss(1, NAN), g(1, 0.5f), d((size_t)rows * v, NAN);
    launch(rows_grid(rows), ROWS_BLOCK, [&] { cross_entropy_rows_f32(x.data(), targets.data(), row_loss.data(), rows, v); });
    launch({1, 1, 1}, {1024, 1, 1}, [&] { sum_to_scalar_f32(row_loss.data(), loss.data(), rows); });
    launch(rows_grid(rows), ROWS_BLOCK, [&] { cross_entropy_bwd_f32(x.data(), targets.data(), g.data(), d.data(), rows, v); });
    std::vector<double> wl(1, 0.0), wd((size_t)rows * v);
    for (int r = 0; r < rows; r++) {
        size_t o = (size_t)r * v;
        double m = -INFINITY, s = 0;
        for (int i = 0; i < v; i++) m = std::max(m, (double)x[o + i]);
        for (int i = 0; i < v; i++) s += std::exp(x[o + i] - m);
        wl[0] += m + std::log(s) - x[o + targets[r]];
        for (int i = 0; i < v; i++) wd[o + i] = 0.5 * (std::exp(x[o + i] - m) / s - (i == (int)targets[r]));
    }
    char what[64];
    std::snprintf(what, sizeof what, "cross_entropy sum rows %d v %d", rows, v);
    check_all(what, loss, wl, 1e-5);
    std::snprintf(what, sizeof what, "cross_entropy_bwd rows %d v %d", rows, v);
    check_all(what, d, wd, 1e-5);
}

static void check_rms_norm(int rows, int c) {
    std::mt19937 rng(rows * 11 + c);
    auto x = randv(rng, (size_t)rows * c, 2), w = randv(rng, c, 1), dy = randv(rng, (size_t)rows * c, 1);
    std::vector<float> y((size_t)rows * c, NAN), dx((size_t)rows * c, NAN), inv_rms(rows, NAN);
    float eps = 1e-5f;
    launch(rows_grid(rows), ROWS_BLOCK, [&] { rms_norm_fwd_f32(x.data(), w.data(), y.data(), rows, c, eps); });
    launch(rows_grid(rows), ROWS_BLOCK, [&] { rms_norm_bwd_dx_f32(x.data(), w.data(), dy.data(), dx.data(), inv_rms.data(), rows, c, eps); });
    int per = 4, chunks = (rows + per - 1) / per;
    std::vector<float> partials((size_t)chunks * c, NAN), dw(c, NAN);
    launch({(unsigned)((c + 255) / 256), (unsigned)chunks, 1}, {256, 1, 1},
           [&] { rms_norm_bwd_partial_f32(x.data(), dy.data(), inv_rms.data(), partials.data(), rows, c, per); });
    launch(elems_grid(c), ELEMS_BLOCK, [&] { rms_norm_bwd_reduce_f32(partials.data(), dw.data(), c, chunks); });
    std::vector<double> wy((size_t)rows * c), wdx((size_t)rows * c), wdw(c, 0.0);
    for (int r = 0; r < rows; r++) {
        double q = 0, gn = 0;
        for (int i = 0; i < c; i++) q += (double)x[(size_t)r * c + i] * x[(size_t)r * c + i];
        double inv = 1 / std::sqrt(q / c + eps);
        for (int i = 0; i < c; i++) {
            size_t k = (size_t)r * c + i;
            double n = x[k] * inv;
            wy[k] = n * w[i];
            gn += (double)dy[k] * w[i] * n;
            wdw[i] += dy[k] * n;
        }
        for (int i = 0; i < c; i++) {
            size_t k = (size_t)r * c + i;
            wdx[k] = ((double)dy[k] * w[i] - x[k] * inv * gn / c) * inv;
        }
    }
    char what[64];
    std::snprintf(what, sizeof what, "rms_norm_fwd rows %d c %d", rows, c);
    check_all(what, y, wy, 1e-5);
    std::snprintf(what, sizeof what, "rms_norm_bwd_dx rows %d c %d", rows, c);
    check_all(what, dx, wdx, 1e-5);
    std::snprintf(what, sizeof what, "rms_norm_bwd dw rows %d c %d", rows, c);
    check_all(what, dw, wdw, 1e-5);
}

// Tables whose halves differ, so a kernel pairing the wrong entries fails.
static void check_rope(int b, int t, int h, int d) {
    std::mt19937 rng(b * 100 + t * 10 + d);
    size_t n = (size_t)b * t * h * d;
    auto x = randv(rng, n, 2), cs = randv(rng, (size_t)t * d, 1), sn = randv(rng, (size_t)t * d, 1);
    std::vector<float> y(n, NAN), dx(n, NAN);
    launch(elems_grid(n), ELEMS_BLOCK, [&] { rope_f32(x.data(), cs.data(), sn.data(), y.data(), n, t, h, d, 0); });
    launch(elems_grid(n), ELEMS_BLOCK, [&] { rope_f32(x.data(), cs.data(), sn.data(), dx.data(), n, t, h, d, 1); });
    std::vector<double> wy(n), wdx(n);
    int half = d / 2;
    for (size_t row = 0; row < n / d; row++) {
        int p = (int)((row / h) % t);
        const float* xr = &x[row * d];
        const float* c = &cs[(size_t)p * d];
        const float* s = &sn[(size_t)p * d];
        for (int j = 0; j < d; j++) {
            // rotate_half(x) = [-x2, x1]; the transpose: dx = dy cos - rotate_half(dy sin).
            double rot = j < half ? -(double)xr[j + half] : xr[j - half];
            wy[row * d + j] = (double)xr[j] * c[j] + rot * s[j];
            double rot_ds = j < half ? -(double)xr[j + half] * s[j + half] : (double)xr[j - half] * s[j - half];
            wdx[row * d + j] = (double)xr[j] * c[j] - rot_ds;
        }
    }
    char what[64];
    std::snprintf(what, sizeof what, "rope %dx%dx%dx%d", b, t, h, d);
    check_all(what, y, wy, 1e-5);
    std::snprintf(what, sizeof what, "rope backward %dx%dx%dx%d", b, t, h, d);
    check_all(what, dx, wdx, 1e-5);
}

static void check_swiglu(int rows, int f) {
    std::mt19937 rng(rows * 13 + f);
    size_t n = (size_t)rows * f;
    auto gu = randv(rng, 2 * n, 8), da = randv(rng, n, 1);
    std::vector<float> a(n, NAN), dgu(2 * n, NAN);
    launch(elems_grid(n), ELEMS_BLOCK, [&] { swiglu_fwd_f32(gu.data(), a.data(), n, f); });
    launch(elems_grid(n), ELEMS_BLOCK, [&] { swiglu_bwd_f32(gu.data(), da.data(), dgu.data(), n, f); });
    std::vector<double> wa(n), wdgu(2 * n);
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < f; j++) {
            double g = gu[(size_t)r * 2 * f + j], u = gu[(size_t)r * 2 * f + f + j], d = da[(size_t)r * f + j];
            double s = 1 / (1 + std::exp(-g));
            wa[(size_t)r * f + j] = g * s * u;
            wdgu[(size_t)r * 2 * f + j] = d * u * s * (1 + g * (1 - s));
            wdgu[(size_t)r * 2 * f + f + j] = d * g * s;
        }
    char what[64];
    std::snprintf(what, sizeof what, "swiglu_fwd rows %d f %d", rows, f);
    check_all(what, a, wa, 1e-5);
    std::snprintf(what, sizeof what, "swiglu_bwd rows %d f %d", rows, f);
    check_all(what, dgu, wdgu, 1e-5);
}

int main() {
    check_gelu();
    check_layer_norm(13, 37);
    check_layer_norm(9, 300);
    check_layer_norm(1, 5);
    check_softmax(11, 33);
    check_softmax(3, 257);
    check_causal_softmax(2, 37);
    check_causal_softmax(1, 1);
    check_cross_entropy(7, 1000);
    check_cross_entropy(1, 1);
    check_flash(1, 1, 64, 1);
    check_flash(2, 5, 16, 2);
    check_flash(1, 33, 64, 1);
    check_flash(1, 70, 64, 2);
    check_flash(2, 97, 96, 3);
    check_flash(1, 70, 128, 2);
    check_adamw();
    check_rms_norm(13, 37);
    check_rms_norm(1, 5);
    check_rms_norm(9, 300);
    check_rope(1, 1, 1, 2);
    check_rope(2, 7, 3, 8);
    check_swiglu(3, 700);
    check_swiglu(1, 1);
    std::printf("%s\n", failures ? "FAILED" : "all ok");
    return failures ? 1 : 0;
}
