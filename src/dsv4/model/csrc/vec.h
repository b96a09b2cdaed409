// What the kernels share of the CPU's vector instructions: DSV4_AVX2 says whether AVX2 + FMA were enabled at build
// time (-march=native on such a CPU); the portable C++ paths run otherwise.
#pragma once

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define DSV4_AVX2 1
#else
#define DSV4_AVX2 0
#endif

#if DSV4_AVX2
// the sum of a vector's 8 lanes
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif
