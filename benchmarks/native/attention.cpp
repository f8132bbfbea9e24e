// attention: times one attention of the CPU module, ggml's flash attention (BF16 K and V: the
// vdpbf16ps tiles of vendor/patches/0020 on AVX-512 BF16 modules; F16 K and V: ggml's tiles)
// against the plain path the engine builds without flash attention (F32 K.Q, soft_max, V.P),
// and checks each against a double-precision reference on a sample of query rows.
//
//   g++ -O2 -std=c++17 benchmarks/native/attention.cpp -o attention \
//       -I vendor/stable-diffusion.cpp/ggml/include -L LIBDIR -lggml-base -l:libggml-cpu-zen4.so \
//       -Wl,-rpath,LIBDIR
//   ./attention [L_q L_k heads d_head threads]   (default 1056 1056 30 128 2: Z-Image at 512x512)
//
// Prints the best of 3 times and the largest difference from the reference relative to the
// largest output value.
#include "ggml.h"
#include "ggml-cpu.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

namespace {

struct Shape { int64_t lq, lk, heads, d; };

// out[h][i][:] for the sampled rows i, in double: softmax(q k^T * scale) v
std::vector<double> reference(const std::vector<float> & q, const std::vector<float> & k,
                              const std::vector<float> & v, const Shape & s, const std::vector<int64_t> & rows) {
    const double scale = 1.0 / std::sqrt((double) s.d);
    std::vector<double> out;
    std::vector<double> w(s.lk);
    for (int64_t h = 0; h < s.heads; h++) {
        for (int64_t i : rows) {
            const float * qi = &q[(h*s.lq + i)*s.d];
            double mx = -INFINITY;
            for (int64_t j = 0; j < s.lk; j++) {
                const float * kj = &k[(h*s.lk + j)*s.d];
                double dot = 0;
                for (int64_t c = 0; c < s.d; c++) dot += (double) qi[c] * kj[c];
                w[j] = dot * scale;
                mx = std::max(mx, w[j]);
            }
            double sum = 0;
            for (int64_t j = 0; j < s.lk; j++) { w[j] = std::exp(w[j] - mx); sum += w[j]; }
            for (int64_t c = 0; c < s.d; c++) {
                double o = 0;
                for (int64_t j = 0; j < s.lk; j++) o += w[j] * v[(h*s.lk + j)*s.d + c];
                out.push_back(o / sum);
            }
        }
    }
    return out;
}

// the engine's graph for one variant: "plain" or flash attention with K and V of kv_type
ggml_tensor * build(ggml_context * ctx, ggml_tensor * q, ggml_tensor * k, ggml_tensor * v,
                    const Shape & s, const char * variant) {
    const float scale = 1.0f / std::sqrt((float) s.d);
    if (std::strcmp(variant, "plain") == 0) {
        ggml_tensor * vt = ggml_cont(ctx, ggml_permute(ctx, v, 1, 0, 2, 3));   // [heads, d, lk]
        ggml_tensor * kq = ggml_mul_mat(ctx, k, q);                          // [heads, lq, lk]
        ggml_mul_mat_set_prec(kq, GGML_PREC_F32);
        kq = ggml_scale_inplace(ctx, kq, scale);
        kq = ggml_soft_max_inplace(ctx, kq);
        ggml_tensor * kqv = ggml_mul_mat(ctx, vt, kq);                       // [heads, lq, d]
        return ggml_cont(ctx, ggml_permute(ctx, kqv, 0, 2, 1, 3));          // [lq, heads, d]
    }
    const ggml_type t = std::strcmp(variant, "flash-bf16") == 0 ? GGML_TYPE_BF16 : GGML_TYPE_F16;
    ggml_tensor * out = ggml_flash_attn_ext(ctx, q, ggml_cast(ctx, k, t), ggml_cast(ctx, v, t), nullptr, scale, 0, 0);
    ggml_flash_attn_ext_set_prec(out, GGML_PREC_F32);
    return out;                                                              // [d, heads, lq]
}

}  // namespace

int main(int argc, char ** argv) {
    Shape s = {1056, 1056, 30, 128};
    int threads = 2;
    if (argc >= 5) {
        s = {std::atoll(argv[1]), std::atoll(argv[2]), std::atoll(argv[3]), std::atoll(argv[4])};
    }
    if (argc >= 6) threads = std::atoi(argv[5]);
    ggml_cpu_init();

    std::mt19937 rng(7);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::vector<float> q(s.heads*s.lq*s.d), k(s.heads*s.lk*s.d), v(s.heads*s.lk*s.d);
    for (float & x : q) x = nd(rng);
    for (float & x : k) x = nd(rng);
    for (float & x : v) x = nd(rng);
    std::vector<int64_t> rows;
    for (int64_t i = 0; i < s.lq; i += std::max<int64_t>(1, s.lq / 7)) rows.push_back(i);
    rows.push_back(s.lq - 1);
    const std::vector<double> ref = reference(q, k, v, s, rows);
    double ref_max = 0;
    for (double x : ref) ref_max = std::max(ref_max, std::fabs(x));

    std::printf("L_q %lld L_k %lld heads %lld d_head %lld threads %d\n", (long long) s.lq, (long long) s.lk,
                (long long) s.heads, (long long) s.d, threads);
    for (const char * variant : {"plain", "flash-f16", "flash-bf16"}) {
        const size_t mem = (size_t) (4.5 * s.heads * s.lq * s.lk * 4) + (size_t) 16 * s.heads * (s.lq + 2*s.lk) * s.d + (64u << 20);
        ggml_init_params ip = {mem, nullptr, false};
        ggml_context * ctx = ggml_init(ip);
        ggml_tensor * tq = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, s.d, s.lq, s.heads);
        ggml_tensor * tk = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, s.d, s.lk, s.heads);
        ggml_tensor * tv = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, s.d, s.lk, s.heads);
        std::memcpy(tq->data, q.data(), q.size()*4);
        std::memcpy(tk->data, k.data(), k.size()*4);
        std::memcpy(tv->data, v.data(), v.size()*4);
        ggml_tensor * out = build(ctx, tq, tk, tv, s, variant);
        ggml_cgraph * gf = ggml_new_graph(ctx);
        ggml_build_forward_expand(gf, out);
        double best = 1e30;
        for (int rep = 0; rep < 3; rep++) {
            const auto t0 = std::chrono::steady_clock::now();
            ggml_graph_compute_with_ctx(ctx, gf, threads);
            best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
        }
        // out is [d, heads, lq] in both forms
        double err = 0;
        size_t n = 0;
        for (int64_t h = 0; h < s.heads; h++) {
            for (int64_t i : rows) {
                const float * o = (const float *) out->data + (i*s.heads + h)*s.d;
                for (int64_t c = 0; c < s.d; c++) err = std::max(err, std::fabs(o[c] - ref[n++]));
            }
        }
        const double flop = 4.0 * s.heads * s.lq * s.lk * s.d;
        std::printf("%-11s %8.3f s  %7.1f GFLOP/s  max error %.2e of the largest output\n", variant, best,
                    flop / best / 1e9, err / ref_max);
        ggml_free(ctx);
    }
    return 0;
}
