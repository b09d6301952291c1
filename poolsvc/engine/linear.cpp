// Matrix products of the CPU path, y = post(x W^T + b), for a weight packed once: poolsvc's own
// kernel, built and loaded by poolsvc/engine/native.py.
//
// The weight is packed into panels of NB output columns, each panel's rows in the order the
// product reads them (float32: [K][NB]; bfloat16: [K/2][NB][2], the pairs AVX512-BF16's dot
// product takes), so a panel is one sequential stream. A block of up to MR rows of x keeps its
// MR x NB sums in registers through the whole of K: each weight vector loaded is used MR times
// and nothing is written until the end, where the bias and `post` (GELU, or a residual add or a
// gate's multiply) are applied before the one store. Threads take panels; for many rows, the
// rows go by chunks.
//
// For the few rows of one short text or a small batch this takes 0.45-0.9x of oneDNN's time
// (bench/products.py, MiniLM's 24 products at 11 rows: 1.70 against 2.41 ms in float32, 0.83
// against 1.34 in bfloat16; 64 rows 0.89-0.92x); from 256 rows on it runs within 4% of
// oneDNN's speed, both near the FMA units' peak. AVX-512 (float32) and AVX512-BF16 without AMX
// (bfloat16) only: poolsvc_linear_fits says which this build has; oneDNN does the rest.
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "vector.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define POOLSVC_LINEAR_F32 1
// bfloat16 with AVX512-BF16's dot products, except where the CPU has AMX: there oneDNN's AMX
// kernels are several times faster on batches
#if defined(__AVX512BF16__) && !defined(__AMX_BF16__)
#define POOLSVC_LINEAR_BF16 1
#endif
#endif

namespace {

using poolsvc::vf;
using poolsvc::vi;

constexpr int NB = 32;  // output columns per panel: two vectors
constexpr int MR = 12;  // rows per block: 24 sums in registers
// rows of x per chunk, for many rows: a chunk passes over every panel, so each chunk streams
// the weights once more (at 256 KiB, K = 3,072 made chunks of 12 rows: BERT-base at 0.93x of
// oneDNN for 256 rows; at 4 MiB, 0.97x, and MiniLM unchanged)
constexpr int64_t CHUNK_BYTES = 4 << 20;
constexpr int64_t KB = 128;  // sums over K go by blocks of KB (even), added at the end of each:
                             // float32's error grows with a block, not with all of K

enum Post { NONE = 0, GELU = 1, GELU_TANH = 2, ADD = 3, MUL = 4 };

// Packed elements of a [N, K] weight (panels padded with zero columns, bfloat16 K to pairs).
int64_t packed_size(int64_t N, int64_t K, bool bf16) {
    return (N + NB - 1) / NB * NB * (bf16 ? (K + 1) / 2 * 2 : K);
}

template <typename T>
void pack(const T* w, int64_t N, int64_t K, T* out) {
    const int64_t panels = (N + NB - 1) / NB;
    if constexpr (std::is_same_v<T, float>) {
        for (int64_t p = 0; p < panels; ++p)
            for (int64_t k = 0; k < K; ++k)
                for (int64_t j = 0; j < NB; ++j) {
                    const int64_t n = p * NB + j;
                    out[(p * K + k) * NB + j] = n < N ? w[n * K + k] : 0.0f;
                }
    } else {
        const int64_t K2 = (K + 1) / 2;
        for (int64_t p = 0; p < panels; ++p)
            for (int64_t k2 = 0; k2 < K2; ++k2)
                for (int64_t j = 0; j < NB; ++j)
                    for (int64_t e = 0; e < 2; ++e) {
                        const int64_t n = p * NB + j, k = 2 * k2 + e;
                        out[((p * K2 + k2) * NB + j) * 2 + e] = n < N && k < K ? w[n * K + k] : 0;
                    }
    }
}

#ifdef POOLSVC_LINEAR_F32

// erf as PyTorch's vectorized CPU GELU computes it (Abramowitz & Stegun 7.1.26, |error| < 1.5e-7)
inline vf verf(vf x) {
    const vi sign = (vi)x & int32_t(0x80000000u);
    const vf a = (vf)((vi)x & 0x7fffffff);
    const vf t = poolsvc::vrcp(0.3275911f * a + 1.0f);
    const vf r = (((1.061405429f * t - 1.453152027f) * t + 1.421413741f) * t - 0.284496736f) * t +
                 0.254829592f;
    const vf y = 1.0f - r * t * poolsvc::vexp(-(a * a));
    return (vf)(((vi)y & 0x7fffffff) | sign);
}

inline vf vtanh(vf u) {  // 1 - 2 / (exp(2u) + 1), exp's argument kept below overflow
    vf u2 = 2.0f * u;
    u2 = u2 > 80.0f ? poolsvc::splat(80.0f) : u2;
    return 1.0f - 2.0f * poolsvc::vrcp(poolsvc::vexp(u2) + 1.0f);
}

inline vf load(const float* p, __mmask16 m) { return (vf)_mm512_maskz_loadu_ps(m, p); }
inline vf load(const uint16_t* p, __mmask16 m) {
    const __m256i h = _mm256_maskz_loadu_epi16(m, p);
    return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
}
inline void store(float* p, vf v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, (__m512)v); }
inline void store(uint16_t* p, vf v, __mmask16 m) {
    _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16((__m512i)poolsvc::to_bf16_bits(v)));
}

// acc[r][h] += x rows [R][K] (ldx apart) . the panel's columns 16h..16h+15
template <int R>
inline void mac(const float* x, int64_t ldx, int64_t K, const float* panel,
                __m512 (&acc)[MR][2]) {
    for (int64_t k = 0; k < K; ++k) {
        const __m512 w0 = _mm512_loadu_ps(panel + k * NB);
        const __m512 w1 = _mm512_loadu_ps(panel + k * NB + 16);
#pragma GCC unroll 12
        for (int r = 0; r < R; ++r) {
            const __m512 xb = _mm512_set1_ps(x[r * ldx + k]);
            acc[r][0] = _mm512_fmadd_ps(xb, w0, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(xb, w1, acc[r][1]);
        }
    }
}

#ifdef POOLSVC_LINEAR_BF16
template <int R>
inline void mac(const uint16_t* x, int64_t ldx, int64_t K, const uint16_t* panel,
                __m512 (&acc)[MR][2]) {
    const int64_t K2 = K / 2;
    for (int64_t k = 0; k < K2; ++k) {
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512(panel + k * 2 * NB);
        const __m512bh w1 = (__m512bh)_mm512_loadu_si512(panel + k * 2 * NB + 32);
#pragma GCC unroll 12
        for (int r = 0; r < R; ++r) {
            int32_t pair;  // x[r][2k], x[r][2k + 1]
            std::memcpy(&pair, x + r * ldx + 2 * k, 4);
            const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], xb, w0);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], xb, w1);
        }
    }
    if (K & 1) {  // the last column of x with a zero
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512(panel + K2 * 2 * NB);
        const __m512bh w1 = (__m512bh)_mm512_loadu_si512(panel + K2 * 2 * NB + 32);
        for (int r = 0; r < R; ++r) {
            const __m512bh xb = (__m512bh)_mm512_set1_epi32(int32_t(x[r * ldx + K - 1]));
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], xb, w0);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], xb, w1);
        }
    }
}
#endif

// R rows of x ([R][K]) through one panel into out's columns n..n+cols (cols <= NB); `other`
// and `out` rows N apart, bias (float32) at column n.
template <int POST, typename T, int R>
void block(const T* x, int64_t K, const T* panel, const float* bias, const T* other, T* out,
           int64_t N, int64_t cols) {
    __m512 sum[MR][2], acc[MR][2];
    for (int r = 0; r < R; ++r) sum[r][0] = sum[r][1] = _mm512_setzero_ps();
    for (int64_t k0 = 0; k0 < K; k0 += KB) {  // a panel's row k0 (a pair's first) at k0 * NB
        for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
        mac<R>(x + k0, K, K - k0 < KB ? K - k0 : KB, panel + k0 * NB, acc);
        for (int r = 0; r < R; ++r)
            for (int h = 0; h < 2; ++h) sum[r][h] = _mm512_add_ps(sum[r][h], acc[r][h]);
    }
    __mmask16 mask[2];
    vf b[2];
    for (int h = 0; h < 2; ++h) {
        const int64_t valid = cols - 16 * h;
        mask[h] = valid >= 16 ? __mmask16(0xffff) : valid <= 0 ? 0 : __mmask16((1u << valid) - 1);
        b[h] = bias ? load(bias + 16 * h, mask[h]) : vf{};
    }
    for (int r = 0; r < R; ++r)
        for (int h = 0; h < 2; ++h) {
            if (!mask[h]) continue;
            vf v = (vf)sum[r][h] + b[h];
            if constexpr (POST == GELU) v = 0.5f * v * (1.0f + verf(v * 0.70710678118654752f));
            if constexpr (POST == GELU_TANH)
                v = 0.5f * v * (1.0f + vtanh(0.79788456080286536f * (v + 0.044715f * v * v * v)));
            if constexpr (POST == ADD) v = v + load(other + r * N + 16 * h, mask[h]);
            if constexpr (POST == MUL) v = v * load(other + r * N + 16 * h, mask[h]);
            store(out + r * N + 16 * h, v, mask[h]);
        }
}

template <int POST, typename T>
void product(const T* x, int64_t M, int64_t K, const T* packed, int64_t N, const float* bias,
             const T* other, T* out, int threads) {
    const int64_t panels = (N + NB - 1) / NB;
    const int64_t panel_size = packed_size(NB, K, !std::is_same_v<T, float>);
    int64_t chunk = CHUNK_BYTES / (K * int64_t(sizeof(T))) / MR * MR;
    chunk = chunk < MR ? MR : chunk;
#pragma omp parallel num_threads(threads) if (threads > 1 && panels > 1)
    for (int64_t m0 = 0; m0 < M; m0 += chunk) {
        const int64_t m1 = m0 + chunk < M ? m0 + chunk : M;
#pragma omp for schedule(static)
        for (int64_t p = 0; p < panels; ++p) {
            const int64_t n = p * NB, cols = N - n < NB ? N - n : NB;
            const T* panel = packed + p * panel_size;
            const float* b = bias ? bias + n : nullptr;
            for (int64_t m = m0; m < m1; m += MR) {
                const T* xm = x + m * K;
                const T* om = other ? other + m * N + n : nullptr;
                T* o = out + m * N + n;
                switch (m1 - m < MR ? m1 - m : MR) {
#define CASE(R) \
    case R: block<POST, T, R>(xm, K, panel, b, om, o, N, cols); break;
                    CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6)
                    CASE(7) CASE(8) CASE(9) CASE(10) CASE(11) CASE(12)
#undef CASE
                }
            }
        }
    }
}

template <typename T>
void product(const T* x, int64_t M, int64_t K, const T* packed, int64_t N, const float* bias,
             int post, const T* other, T* out, int threads) {
    switch (post) {
        case GELU: product<GELU>(x, M, K, packed, N, bias, other, out, threads); break;
        case GELU_TANH: product<GELU_TANH>(x, M, K, packed, N, bias, other, out, threads); break;
        case ADD: product<ADD>(x, M, K, packed, N, bias, other, out, threads); break;
        case MUL: product<MUL>(x, M, K, packed, N, bias, other, out, threads); break;
        default: product<NONE>(x, M, K, packed, N, bias, other, out, threads); break;
    }
}

#endif  // POOLSVC_LINEAR_F32

}  // namespace

// Whether this build runs products in bfloat16 (bf16 = 1) or float32 (0).
extern "C" int poolsvc_linear_fits(int bf16) {
#if defined(POOLSVC_LINEAR_BF16)
    return 1;
#elif defined(POOLSVC_LINEAR_F32)
    return !bf16;
#else
    (void)bf16;
    return 0;
#endif
}

// Elements of a packed [N, K] weight.
extern "C" int64_t poolsvc_linear_packed_size(int64_t N, int64_t K, int bf16) {
    return packed_size(N, K, bf16);
}

// w: [N, K] row-major (out_features, in_features, as nn.Linear holds it) -> packed.
extern "C" void poolsvc_linear_pack(const void* w, int64_t N, int64_t K, void* packed, int bf16) {
    if (bf16) pack((const uint16_t*)w, N, K, (uint16_t*)packed);
    else pack((const float*)w, N, K, (float*)packed);
}

// out [M, N] = post(x [M, K] . W^T + bias) for a W packed by poolsvc_linear_pack; row-major,
// contiguous, float32 or bfloat16 (bf16 = 1); bias: float32 [N] or null; post: 0 none, 1 GELU
// (erf), 2 GELU (tanh), 3 + other, 4 * other (other: [M, N]). On `threads` OpenMP threads.
// Returns 0, or 1 (nothing written) where the build cannot (poolsvc_linear_fits).
extern "C" int poolsvc_linear(const void* x, int64_t M, int64_t K, const void* packed, int64_t N,
                              const float* bias, int post, const void* other, void* out,
                              int bf16, int threads) {
    if (!poolsvc_linear_fits(bf16) || post < NONE || post > MUL) return 1;
#ifdef POOLSVC_LINEAR_F32
#ifdef POOLSVC_LINEAR_BF16
    if (bf16) {
        product((const uint16_t*)x, M, K, (const uint16_t*)packed, N, bias, post,
                (const uint16_t*)other, (uint16_t*)out, threads);
        return 0;
    }
#endif
    product((const float*)x, M, K, (const float*)packed, N, bias, post, (const float*)other,
            (float*)out, threads);
#else
    (void)x, (void)M, (void)K, (void)packed, (void)N, (void)bias, (void)other, (void)out;
    (void)threads;
#endif
    return 0;
}
