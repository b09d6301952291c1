// Bidirectional attention within each sequence of a packed batch, on the CPU: poolsvc's own
// kernel, built and loaded by poolsvc/engine/native.py.
//
// For each (sequence, head), the keys are transposed (and scaled) once into a small float32
// buffer, then each block of R query rows takes its scores in registers, a softmax, and the
// weighted sum of the values. Nothing is padded to other sequences' lengths and no score is
// computed across sequences, so a batch costs the sum of its sequences' squared lengths (a
// masked block of short sequences, or a padded bucket, costs the square of their sum or of the
// longest). float32 or bfloat16 in and out, float32 inside (bfloat16 results rounded to
// nearest even, as PyTorch rounds). Pairs run in parallel on PyTorch's OpenMP team (the same
// libgomp) when the batch is large enough to pay for it.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "vector.h"

namespace {

using poolsvc::splat;
using poolsvc::vexp;
using poolsvc::vf;
using poolsvc::vi;
using poolsvc::W;

inline float reduce_max(vf x) {
#ifdef __AVX512F__
    return _mm512_reduce_max_ps((__m512)x);
#else
    float m = x[0];
    for (int l = 1; l < W; ++l) m = std::max(m, x[l]);
    return m;
#endif
}

inline float reduce_add(vf x) {
#ifdef __AVX512F__
    return _mm512_reduce_add_ps((__m512)x);
#else
    float t = 0.0f;
    for (int l = 0; l < W; ++l) t += x[l];
    return t;
#endif
}

inline float load(const float* p) { return *p; }
inline float load(const uint16_t* p) { return poolsvc::from_bf16(*p); }
inline void store(float* p, float f) { *p = f; }
inline void store(uint16_t* p, float f) { *p = poolsvc::to_bf16(f); }

struct Scratch {
    std::vector<vf> kt, v, s;
};

constexpr int R = 4;  // query rows at a time: independent sums for the FMA units

// s[r][0:NV] = row r of q ([R][d]) . the key columns u.. of kt ([d][kpv] vectors)
template <int NV>
inline void scores(const float* q, int64_t d, const vf* kt, int64_t kpv, vf* s) {
    vf a[R][NV] = {};
    for (int64_t c = 0; c < d; ++c) {
        const vf* row = kt + c * kpv;
        for (int n = 0; n < NV; ++n) {
            const vf kv = row[n];
            for (int r = 0; r < R; ++r) a[r][n] += q[r * d + c] * kv;
        }
    }
    for (int r = 0; r < R; ++r)
        for (int n = 0; n < NV; ++n) s[r * kpv + n] = a[r][n];
}

// softmax over the first `keys` of s ([kpv] vectors) in place, padding zeroed; returns the sum
inline float softmax(vf* s, int64_t kpv, int64_t keys) {
    vi lane;
    for (int l = 0; l < W; ++l) lane[l] = l;
    const vi valid = lane < vi{} + int32_t(keys - (kpv - 1) * W);  // of the last vector
    s[kpv - 1] = valid ? s[kpv - 1] : splat(-3.0e38f);
    vf mv = s[0];
    for (int64_t u = 1; u < kpv; ++u) mv = mv > s[u] ? mv : s[u];
    const float m = reduce_max(mv);
    vf tv = {};
    for (int64_t u = 0; u < kpv; ++u) {
        s[u] = vexp(s[u] - m);
        if (u == kpv - 1) s[u] = valid ? s[u] : vf{};
        tv += s[u];
    }
    return reduce_add(tv);
}

// out rows [RR] = p rows (s, [RR][kpv] vectors) . v ([keys][DV] vectors), times inv[r];
// the first d of each
template <int RR, int DV, typename T>
inline void weighted(const vf* s, int64_t kpv, const vf* v, int64_t keys, const float* inv,
                     int64_t d, T* out, int64_t out_stride) {
    vf acc[RR][DV] = {};
    for (int64_t j = 0; j < keys; ++j) {
        for (int u = 0; u < DV; ++u) {
            const vf vv = v[j * DV + u];
            for (int r = 0; r < RR; ++r) acc[r][u] += ((const float*)(s + r * kpv))[j] * vv;
        }
    }
    for (int r = 0; r < RR; ++r)
        for (int u = 0; u < DV; ++u) {
            const vf x = acc[r][u] * inv[r];
            for (int l = 0; l < W && u * W + l < d; ++l)
                store(out + r * out_stride + u * W + l, x[l]);
        }
}

// One head of one sequence: `rows` queries against its first `keys` rows; head size d <= DV * W.
template <int DV, typename T>
void attend_one(const T* q, const T* k, const T* v, T* out, int64_t stride, int64_t out_stride,
                int64_t rows, int64_t keys, int64_t d, float scale, Scratch& sc) {
    constexpr int64_t dp = DV * W;  // head size padded to whole vectors
    const int64_t kpv = (keys + W - 1) / W, kp = kpv * W;
    if ((int64_t)sc.kt.size() < d * kpv) sc.kt.resize(d * kpv);
    if ((int64_t)sc.v.size() < keys * DV) sc.v.resize(keys * DV);
    if ((int64_t)sc.s.size() < R * kpv) sc.s.resize(R * kpv);
    float* kt = (float*)sc.kt.data();  // [d][kp]: keys side by side, scaled
    float* vv = (float*)sc.v.data();   // [keys][dp]
    vf* s = sc.s.data();               // [R][kpv]
    for (int64_t j = 0; j < keys; ++j) {
        for (int64_t c = 0; c < d; ++c) {
            kt[c * kp + j] = load(k + j * stride + c) * scale;
            vv[j * dp + c] = load(v + j * stride + c);
        }
        for (int64_t c = d; c < dp; ++c) vv[j * dp + c] = 0.0f;
    }
    for (int64_t c = 0; c < d; ++c)
        for (int64_t j = keys; j < kp; ++j) kt[c * kp + j] = 0.0f;
    const vf* ktv = sc.kt.data();
    const vf* vvv = sc.v.data();
    float qq[R * dp];
    float inv[R];
    for (int64_t i0 = 0; i0 < rows; i0 += R) {
        const int64_t nr = std::min<int64_t>(R, rows - i0);
        for (int64_t r = 0; r < R; ++r)
            for (int64_t c = 0; c < d; ++c)
                qq[r * d + c] = r < nr ? load(q + (i0 + r) * stride + c) : 0.0f;
        for (int64_t u = 0; u < kpv; u += 2) {
            if (kpv - u >= 2) scores<2>(qq, d, ktv + u, kpv, s + u);
            else scores<1>(qq, d, ktv + u, kpv, s + u);
        }
        for (int64_t r = 0; r < nr; ++r) inv[r] = 1.0f / softmax(s + r * kpv, kpv, keys);
        T* o = out + i0 * out_stride;
        if constexpr (DV <= 4) {
            if (nr == R) {
                weighted<R, DV>(s, kpv, vvv, keys, inv, d, o, out_stride);
                continue;
            }
        }
        for (int64_t r = 0; r < nr; ++r)
            weighted<1, DV>(s + r * kpv, kpv, vvv, keys, inv + r, d, o + r * out_stride,
                            out_stride);
    }
}

template <int DV, typename T>
void attend(const T* q, const T* k, const T* v, T* out, int64_t stride, int64_t out_stride,
            const int32_t* cu, const int32_t* key_cu, int64_t seqs, int64_t heads, int64_t d,
            float scale) {
    int64_t work = 0;
    for (int64_t s = 0; s < seqs; ++s) {
        const int64_t n = cu[s + 1] - cu[s];
        work += n * (key_cu ? key_cu[s + 1] - key_cu[s] : n);
    }
    work *= heads * d;
#pragma omp parallel if (work > (1 << 18))
    {
        static thread_local Scratch sc;
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < seqs * heads; ++item) {
            const int64_t s = item / heads, h = item % heads;
            const int64_t first = cu[s], rows = cu[s + 1] - cu[s];
            const int64_t keys = key_cu ? key_cu[s + 1] - key_cu[s] : rows;
            if (rows == 0) continue;
            if (keys == 0) {  // nothing to attend to: zeros, not whatever the buffer held
                for (int64_t i = 0; i < rows; ++i)
                    for (int64_t c = 0; c < d; ++c)
                        store(out + (first + i) * out_stride + h * d + c, 0.0f);
                continue;
            }
            const int64_t off = first * stride + h * d;
            attend_one<DV>(q + off, k + off, v + off, out + first * out_stride + h * d, stride,
                           out_stride, rows, keys, d, scale, sc);
        }
    }
}

template <typename T>
int dispatch(const T* q, const T* k, const T* v, T* out, int64_t stride, int64_t out_stride,
             const int32_t* cu, const int32_t* key_cu, int64_t seqs, int64_t heads,
             int64_t head_dim, float scale) {
#define CASE(DV)                                                                       \
    case DV:                                                                           \
        attend<DV>(q, k, v, out, stride, out_stride, cu, key_cu, seqs, heads, head_dim, \
                   scale);                                                             \
        return 0;
    if (head_dim < 1) return 1;
    switch ((head_dim + W - 1) / W) {
        CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
        default: return 1;
    }
#undef CASE
}

}  // namespace

// q, k, v: head 0 of token 0's query, key and value; tokens are `stride` elements apart (the
// same for the three), a token's heads side by side, head_dim each. out: the same, tokens
// out_stride apart. cu: [seqs + 1] token offsets of the sequences; key_cu: [seqs + 1] offsets
// of their keys, each sequence's first tokens (PackedBatch.key_rows; null: every token is a
// key). bf16: the tensors are bfloat16, else float32.
// Returns 0, or 1 (nothing written) when head_dim is not in 1..128.
extern "C" int poolsvc_attention(const void* q, const void* k, const void* v, void* out,
                                 int bf16, int64_t stride, int64_t out_stride,
                                 const int32_t* cu, const int32_t* key_cu, int64_t seqs,
                                 int64_t heads, int64_t head_dim, float scale) {
    if (bf16)
        return dispatch((const uint16_t*)q, (const uint16_t*)k, (const uint16_t*)v,
                        (uint16_t*)out, stride, out_stride, cu, key_cu, seqs, heads, head_dim,
                        scale);
    return dispatch((const float*)q, (const float*)k, (const float*)v, (float*)out, stride,
                    out_stride, cu, key_cu, seqs, heads, head_dim, scale);
}
