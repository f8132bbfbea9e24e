// repack_gemm: times the CPU module's GEMMs over ggml's repacked 4-bit layouts (Q4_K x Q8_K,
// Q4_0 and IQ4_NL x Q8_0; 8 columns interleaved, 4 activation rows interleaved) on random
// blocks, and checks each result against a double-precision reference of the same blocks.
// It calls the module's exported kernels, so one build compares ggml's kernels
// (GGML_CPU_VNNI_GEMM=0) with the int8 VNNI GEMMs of vendor/patches/0018 (default).
//
//   g++ -O2 -std=c++17 -mf16c benchmarks/native/repack_gemm.cpp -o repack_gemm -ldl
//   ./repack_gemm LIBGGML_CPU_SO [M N K]        (default 1024 3072 3840: rows, columns, depth)
//
// One thread; prints GFLOP/s (2*M*N*K per call, best of 5) and the largest difference from the
// reference relative to the largest result.
#include <immintrin.h>
#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

namespace {

constexpr int QK_K = 256;
constexpr int QK8_0 = 32;
using half = uint16_t;

// the layouts of ggml-cpu/repack.h
struct block_q4_Kx8 { half d[8]; half dmin[8]; uint8_t scales[96]; uint8_t qs[1024]; };
struct block_q8_Kx4 { float d[4]; int8_t qs[QK_K * 4]; int16_t bsums[QK_K / 4]; };
struct block_q4_0x8 { half d[8]; uint8_t qs[128]; };      // also block_iq4_nlx8
struct block_q8_0x4 { half d[4]; int8_t qs[128]; };

using gemm_fn = void (*)(int, float *, size_t, const void *, const void *, int, int);

float f16(half h) { return _cvtsh_ss(h); }
half to_f16(float f) { return _cvtss_sh(f, 0); }

// the 6-bit scales (s[c]) and mins (m[c]) of the 8 columns in sub-block j
void q4_K_scales(const block_q4_Kx8 & b, int j, int s[8], int m[8]) {
    const uint8_t * p = b.scales + j * 12;
    for (int c = 0; c < 4; c++) {
        s[c] = p[c] & 63;
        m[c] = p[4 + c] & 63;
        s[c + 4] = (p[8 + c] & 15) | ((p[c] >> 6) << 4);
        m[c + 4] = (p[8 + c] >> 4) | ((p[4 + c] >> 6) << 4);
    }
}

double ref_q4_K(const block_q4_Kx8 * b, const block_q8_Kx4 * a, int nb, int row, int col) {
    double sum = 0;
    for (int l = 0; l < nb; l++) {
        int s[8], m[8];
        long dot = 0, mins = 0;
        for (int j = 0; j < 8; j++) {
            q4_K_scales(b[l], j, s, m);
            const int c = j / 2, h = j % 2;             // 64-value chunk, low or high nibbles
            long part = 0, xs = 0;
            for (int g = 0; g < 4; g++) {
                for (int i = 0; i < 8; i++) {
                    const uint8_t q = b[l].qs[(c * 4 + g) * 64 + col * 8 + i];
                    const int x = a[l].qs[c * 256 + h * 128 + g * 32 + row * 8 + i];
                    part += (h ? q >> 4 : q & 15) * x;
                    xs += x;
                }
            }
            dot += s[col] * part;
            mins += m[col] * xs;
        }
        sum += a[l].d[row] * ((double) f16(b[l].d[col]) * dot - (double) f16(b[l].dmin[col]) * mins);
    }
    return sum;
}

double ref_b32(const block_q4_0x8 * b, const block_q8_0x4 * a, int nb, int row, int col, const int8_t * values) {
    double sum = 0;
    for (int l = 0; l < nb; l++) {
        long dot = 0;
        for (int k = 0; k < 2; k++) {
            for (int i = 0; i < 8; i++) {
                const uint8_t q = b[l].qs[k * 64 + col * 8 + i];
                dot += values[q & 15] * a[l].qs[k * 32 + row * 8 + i] + values[q >> 4] * a[l].qs[64 + k * 32 + row * 8 + i];
            }
        }
        sum += (double) f16(b[l].d[col]) * f16(a[l].d[row]) * dot;
    }
    return sum;
}

template <typename Ref>
void run(const char * name, gemm_fn f, const void * b, const void * a, int M, int N, int K, Ref ref) {
    std::vector<float> out((size_t) M * N);
    f(K, out.data(), N, b, a, M, N);
    double err = 0, big = 0;
    for (int r = 0; r < M; r += std::max(1, M / 37)) {          // a sample of rows, every column
        for (int c = 0; c < N; c++) {
            const double want = ref(r, c);
            err = std::max(err, std::fabs(out[(size_t) r * N + c] - want));
            big = std::max(big, std::fabs(want));
        }
    }
    double best = 1e9;
    for (int it = 0; it < 5; it++) {
        const auto t0 = std::chrono::steady_clock::now();
        f(K, out.data(), N, b, a, M, N);
        best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    std::printf("%-7s M=%d N=%d K=%d  %8.2f ms  %6.1f GFLOP/s  max |error| / max |result| = %.1e\n", name, M, N, K,
                best * 1e3, 2.0 * M * N * K / best * 1e-9, err / big);
}

}  // namespace

int main(int argc, char ** argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: %s LIBGGML_CPU_SO [M N K]\n", argv[0]);
        return 2;
    }
    const int M = argc > 2 ? std::atoi(argv[2]) : 1024, N = argc > 3 ? std::atoi(argv[3]) : 3072,
              K = argc > 4 ? std::atoi(argv[4]) : 3840;
    if (M % 4 || N % 8 || K % QK_K) {
        std::fprintf(stderr, "M must be a multiple of 4, N of 8, K of 256\n");
        return 2;
    }
    void * lib = dlopen(argv[1], RTLD_NOW);
    if (!lib) {
        std::fprintf(stderr, "%s\n", dlerror());
        return 1;
    }
    // the module's F16 -> F32 table (the kernels' scalar conversions read it) is filled here
    if (auto init = (void (*)()) dlsym(lib, "ggml_cpu_init")) {
        init();
    }
    const char * vnni = std::getenv("GGML_CPU_VNNI_GEMM");
    std::printf("%s, GGML_CPU_VNNI_GEMM=%s\n", argv[1], vnni ? vnni : "(unset)");
    std::mt19937 rng(1);

    // Q4_K x Q8_K
    const int nbk = K / QK_K;
    std::vector<block_q4_Kx8> bk((size_t) (N / 8) * nbk);
    for (auto & b : bk) {
        for (int i = 0; i < 8; i++) {
            b.d[i] = to_f16(0.001f + (rng() % 1000) * 1e-5f);
            b.dmin[i] = to_f16((rng() % 1000) * 1e-5f);
        }
        for (auto & x : b.scales) x = rng();
        for (auto & x : b.qs) x = rng();
    }
    std::vector<block_q8_Kx4> ak((size_t) (M / 4) * nbk);
    for (auto & a : ak) {
        for (float & d : a.d) d = 0.01f + (rng() % 1000) * 1e-4f;
        for (auto & x : a.qs) x = (int8_t) ((int) (rng() % 255) - 127);
        // bsums as the quantizer writes them: per 64-value chunk c and row r, the sums over the
        // low nibbles' 16 + 16 values, then the high nibbles'
        for (int c = 0; c < 4; c++) {
            for (int r = 0; r < 4; r++) {
                for (int t = 0; t < 4; t++) {
                    int sum = 0;
                    for (int g = (t % 2) * 2; g < (t % 2) * 2 + 2; g++) {
                        for (int i = 0; i < 8; i++) sum += a.qs[c * 256 + (t / 2) * 128 + g * 32 + r * 8 + i];
                    }
                    a.bsums[c * 16 + r * 4 + t] = (int16_t) sum;
                }
            }
        }
    }
    if (auto f = (gemm_fn) dlsym(lib, "ggml_gemm_q4_K_8x8_q8_K")) {
        run("Q4_K", f, bk.data(), ak.data(), M, N, K, [&](int r, int c) {
            return ref_q4_K(bk.data() + (size_t) (c / 8) * nbk, ak.data() + (size_t) (r / 4) * nbk, nbk, r % 4, c % 8);
        });
    }

    // Q4_0 and IQ4_NL x Q8_0: the same layout, a different table of nibble values
    const int nb0 = K / QK8_0;
    std::vector<block_q4_0x8> b0((size_t) (N / 8) * nb0);
    for (auto & b : b0) {
        for (half & d : b.d) d = to_f16(0.001f + (rng() % 1000) * 1e-5f);
        for (auto & x : b.qs) x = rng();
    }
    std::vector<block_q8_0x4> a0((size_t) (M / 4) * nb0);
    for (auto & a : a0) {
        for (half & d : a.d) d = to_f16(0.01f + (rng() % 1000) * 1e-4f);
        for (auto & x : a.qs) x = (int8_t) ((int) (rng() % 255) - 127);
    }
    static const int8_t q4_0_values[16] = { 0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1 };   // nibbles q ^ 8
    static const int8_t iq4_nl_values[16] = { -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113 };
    const struct { const char * name, * symbol; const int8_t * values; } b32[] = {
        { "Q4_0", "ggml_gemm_q4_0_8x8_q8_0", q4_0_values },
        { "IQ4_NL", "ggml_gemm_iq4_nl_8x8_q8_0", iq4_nl_values },
    };
    for (const auto & t : b32) {
        if (auto f = (gemm_fn) dlsym(lib, t.symbol)) {
            run(t.name, f, b0.data(), a0.data(), M, N, K, [&](int r, int c) {
                return ref_b32(b0.data() + (size_t) (c / 8) * nb0, a0.data() + (size_t) (r / 4) * nb0, nb0, r % 4, c % 8,
                               t.values);
            });
        }
    }
    return 0;
}
