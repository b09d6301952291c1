// What attention.cpp and linear.cpp share: 16-float vectors (GCC vector extensions, one AVX-512
// register where the CPU has it), exp, and float32 <-> bfloat16 as PyTorch converts them.
#pragma once
#include <cstdint>
#include <cstring>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace poolsvc {

constexpr int W = 16;  // floats per vector
typedef float vf __attribute__((vector_size(W * 4)));
typedef int32_t vi __attribute__((vector_size(W * 4)));

inline vf splat(float c) { return vf{} + c; }

// exp: Cephes' expf (x = n ln2 + r, |r| <= ln2 / 2, a degree-7 polynomial in r), about 1 ulp;
// 0 or a denormal below -87.3, inf above 88.7 with AVX-512 (its scalef applies 2^n), and x
// clamped to -87.3 without it.
inline vf vexp(vf x) {
#ifdef __AVX512F__
    const __m512 nf = _mm512_roundscale_ps((__m512)(x * 1.44269504088896341f),
                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = x - (vf)nf * 0.693359375f;
    x = x + (vf)nf * 2.12194440e-4f;
#else
    x = x < splat(-87.3f) ? splat(-87.3f) : x;
    vf fx = x * 1.44269504088896341f;
    vi n = __builtin_convertvector(fx, vi);  // toward zero
    vf nf = __builtin_convertvector(n, vf);
    nf = nf > fx ? nf - 1.0f : nf;            // floor
    nf = (fx - nf) >= 0.5f ? nf + 1.0f : nf;  // nearest
    n = __builtin_convertvector(nf, vi);
    x = x - nf * 0.693359375f;
    x = x + nf * 2.12194440e-4f;
#endif
    vf z = x * x;
    vf y = splat(1.9875691500e-4f);
    y = y * x + 1.3981999507e-3f;
    y = y * x + 8.3334519073e-3f;
    y = y * x + 4.1665795894e-2f;
    y = y * x + 1.6666665459e-1f;
    y = y * x + 5.0000001201e-1f;
    y = y * z + x + 1.0f;
#ifdef __AVX512F__
    return (vf)_mm512_scalef_ps((__m512)y, nf);
#else
    vi e = (n + 127) << 23;
    return y * (vf)e;
#endif
}

// 1 / x, to float32's precision: AVX-512's 14-bit estimate and one Newton step where there is
// one (a division costs several times more)
inline vf vrcp(vf x) {
#ifdef __AVX512F__
    const vf r = (vf)_mm512_rcp14_ps((__m512)x);
    return r * (2.0f - x * r);
#else
    return 1.0f / x;
#endif
}

// bfloat16 is float32's upper half; float32 -> bfloat16 rounds to nearest even (NaN stays NaN).
inline float from_bf16(uint16_t h) {
    uint32_t u = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline uint16_t to_bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return uint16_t(u >> 16);
}

inline vi to_bf16_bits(vf x) {  // each lane's bfloat16 in its low 16 bits
    vi u = (vi)x;
    const vi nan = (u & 0x7fffffff) > 0x7f800000;
    const vi rounded = (u + (0x7fff + ((u >> 16) & 1))) >> 16;
    return (nan ? ((u >> 16) | 0x40) : rounded) & 0xffff;
}

}  // namespace poolsvc
