// Fused dequantize-and-multiply for a few rows of activations against a weight kept as the checkpoint stores it
// (dsv4.model.fused builds and loads this file; dsv4.model.packed calls it for decoding rows).
//
//   out [M, N] = x [M, K] @ W^T, W [N, K] stored as
//     fmt 0: BF16 (the weight's bytes viewed as int16 [N, K]), no scale;
//     fmt 1: FP8 E4M3 (uint8 [N, K]) with one scale per 128 x 128 block (scale [ceil(N/128), ceil(K/128)]);
//     fmt 2: FP4 E2M1 packed two per byte, the low nibble the even column (uint8 [N, K/2]), one scale per 1 x 32
//            tile along K (scale [N, K/32]).
//   Scales are E8M0 (uint8: 2^(e - 127)) or float32.
//
// Each weight byte is read once and decoded in registers (no dequantized copy of the matrix is written), so a
// decoding step is bound by the bytes of the weights, not by a float32 copy of them. The decoding is exact (every
// stored value is a float32); only the order of the sums differs from dequantize-then-matmul (8 partial sums per
// row, the block scale multiplied into the weights before the product).

#include "ops.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "vec.h"

namespace {

constexpr int FMT_BF16 = 0, FMT_FP8 = 1, FMT_FP4 = 2;
constexpr int64_t MAX_ROWS = 8;  // activation rows per pass over the weights (accumulators held in registers)

inline float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

// E4M3 -> float32: the 7 magnitude bits placed under the float32 exponent and scaled by 2^(127 - 7) (exact for
// the subnormals too), the sign bit moved to bit 31.
inline float fp8_value(uint8_t b) {
  return std::copysign(bits_to_float(uint32_t(b & 0x7F) << 20) * 0x1p120f, (b & 0x80) ? -1.f : 1.f);
}

const float FP4_MAGNITUDES[8] = {0.f, 0.5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f};

inline float fp4_value(uint8_t nibble) {
  float v = FP4_MAGNITUDES[nibble & 7];
  return (nibble & 8) ? -v : v;
}

inline float bf16_value(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

// A scale tensor read as float32, E8M0 (uint8) or float32.
struct Scales {
  const uint8_t* e8m0 = nullptr;
  const float* f32 = nullptr;
  int64_t row_stride = 0;
  float at(int64_t r, int64_t c) const {
    if (f32) return f32[r * row_stride + c];
    uint8_t e = e8m0[r * row_stride + c];
    return e == 0 ? std::ldexp(1.f, -127) : bits_to_float(uint32_t(e) << 23);
  }
};

#if DSV4_AVX2
// 8 E4M3 bytes -> float32 times 2^-120 (the caller's scale carries the 2^120): each byte sign-extended, shifted
// under the float32 exponent, and masked to its sign and its 7 magnitude bits.
inline __m256 fp8x8_unscaled(const uint8_t* p) {
  __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32(v, 20), _mm256_set1_epi32(int(0x87F00000u))));
}

// 4 bytes of packed FP4 (8 values, each byte's low nibble first) -> their E2M1 values as float32, with no byte
// shuffle (the one vector port those share was the bound): the 32 bits broadcast to every lane by a load and
// shifted right by 4 x lane, so that lane i holds value i's nibble in its low 4 bits; vpermps looks the magnitude
// up by the low 3 of them, and the nibble shifted to the top (bit 3 to the sign bit, bits 0-2 to bits 28-30) is
// XORed in. The table holds each magnitude's bits XOR its own index << 28, so those three bits cancel.
inline __m256 fp4x8(const uint8_t* p) {
  const __m256i table = _mm256_setr_epi32(0x00000000, 0x3F000000 ^ (1 << 28), 0x3F800000 ^ (2 << 28),
                                          0x3FC00000 ^ (3 << 28), 0x40000000 ^ (4 << 28), 0x40400000 ^ (5 << 28),
                                          0x40800000 ^ (6 << 28), 0x40C00000 ^ (7 << 28));  // 0 .5 1 1.5 2 3 4 6
  const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  const __m256i lanes = _mm256_srlv_epi32(_mm256_castps_si256(_mm256_broadcast_ss(reinterpret_cast<const float*>(p))),
                                          shifts);
  const __m256 looked_up = _mm256_permutevar8x32_ps(_mm256_castsi256_ps(table), lanes);
  return _mm256_xor_ps(looked_up, _mm256_castsi256_ps(_mm256_slli_epi32(lanes, 28)));
}

inline __m256 bf16x8(const uint16_t* p) {
  __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}
#endif

// One weight row n against M activation rows (x [M, K]): out[m * N + n].
// Independent accumulators per activation row: an FMA's latency is about 4 cycles, so with one or two rows a single
// chain of FMAs, not the memory, would set the pace.
template <int M>
constexpr int unroll() { return M == 1 ? 4 : M == 2 ? 2 : 1; }

#if DSV4_AVX2
// sum of M x U accumulators into acc[M]
template <int M, int U>
inline void reduce(const __m256* part, float* acc) {
  for (int m = 0; m < M; ++m) {
    __m256 v = part[m * U];
    for (int u = 1; u < U; ++u) v = _mm256_add_ps(v, part[m * U + u]);
    acc[m] += hsum(v);
  }
}
#endif

template <int M>
void row_bf16(const uint16_t* w, const float* x, int64_t K, float* acc) {
  int64_t k = 0;
  for (int m = 0; m < M; ++m) acc[m] = 0.f;
#if DSV4_AVX2
  constexpr int U = unroll<M>();
  __m256 part[M * U];
  for (int i = 0; i < M * U; ++i) part[i] = _mm256_setzero_ps();
  for (; k + 8 * U <= K; k += 8 * U)
    for (int u = 0; u < U; ++u) {
      __m256 wv = bf16x8(w + k + 8 * u);
      for (int m = 0; m < M; ++m)
        part[m * U + u] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * K + k + 8 * u), part[m * U + u]);
    }
  for (; k + 8 <= K; k += 8) {
    __m256 wv = bf16x8(w + k);
    for (int m = 0; m < M; ++m) part[m * U] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * K + k), part[m * U]);
  }
  reduce<M, U>(part, acc);
#endif
  for (; k < K; ++k) {
    float wv = bf16_value(w[k]);
    for (int m = 0; m < M; ++m) acc[m] += wv * x[m * K + k];
  }
}

template <int M>
void row_fp8(const uint8_t* w, const float* x, int64_t K, const Scales& s, int64_t n, float* acc) {
  const int64_t blocks = (K + 127) / 128;
  for (int m = 0; m < M; ++m) acc[m] = 0.f;
#if DSV4_AVX2
  constexpr int U = unroll<M>();
  __m256 part[M * U];
  for (int i = 0; i < M * U; ++i) part[i] = _mm256_setzero_ps();
#endif
  for (int64_t b = 0; b < blocks; ++b) {
    const float scale = s.at(n / 128, b);
    const int64_t k1 = std::min(K, (b + 1) * 128);
    int64_t k = b * 128;
#if DSV4_AVX2
    const float folded = scale * 0x1p120f;  // the block scale and E4M3's exponent bias in one product
    if (std::isfinite(folded)) {
      const __m256 sv = _mm256_set1_ps(folded);
      for (; k + 8 * U <= k1; k += 8 * U)
        for (int u = 0; u < U; ++u) {
          __m256 wv = _mm256_mul_ps(fp8x8_unscaled(w + k + 8 * u), sv);
          for (int m = 0; m < M; ++m)
            part[m * U + u] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * K + k + 8 * u), part[m * U + u]);
        }
      for (; k + 8 <= k1; k += 8) {
        __m256 wv = _mm256_mul_ps(fp8x8_unscaled(w + k), sv);
        for (int m = 0; m < M; ++m) part[m * U] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * K + k), part[m * U]);
      }
    }
#endif
    for (; k < k1; ++k) {
      float wv = fp8_value(w[k]) * scale;
      for (int m = 0; m < M; ++m) acc[m] += wv * x[m * K + k];
    }
  }
#if DSV4_AVX2
  reduce<M, U>(part, acc);
#endif
}

template <int M>
void row_fp4(const uint8_t* w, const float* x, int64_t K, const Scales& s, int64_t n, float* acc) {
  const int64_t tiles = K / 32;
  for (int m = 0; m < M; ++m) acc[m] = 0.f;
#if DSV4_AVX2
  // a tile is 16 bytes: 32 values, one scale. Its four products of 8 summed in two chains, then times its scale.
  constexpr int U = M <= 2 ? 2 : 1;  // accumulators per row, alternating tiles
  __m256 part[M * U];
  for (int i = 0; i < M * U; ++i) part[i] = _mm256_setzero_ps();
  for (int64_t t = 0; t < tiles; ++t) {
    const int u = int(t % U);
    const __m256 sv = _mm256_set1_ps(s.at(n, t));
    const uint8_t* wt = w + t * 16;
    const __m256 w0 = fp4x8(wt), w1 = fp4x8(wt + 4), w2 = fp4x8(wt + 8), w3 = fp4x8(wt + 12);
    for (int m = 0; m < M; ++m) {
      const float* xt = x + m * K + t * 32;
      __m256 a = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xt + 16), _mm256_mul_ps(w0, _mm256_loadu_ps(xt)));
      __m256 b = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xt + 24), _mm256_mul_ps(w1, _mm256_loadu_ps(xt + 8)));
      part[m * U + u] = _mm256_fmadd_ps(_mm256_add_ps(a, b), sv, part[m * U + u]);
    }
  }
  reduce<M, U>(part, acc);
#else
  for (int64_t t = 0; t < tiles; ++t) {
    const float scale = s.at(n, t);
    for (int64_t j = t * 16; j < t * 16 + 16; ++j) {
      float lo = fp4_value(w[j] & 0xF) * scale, hi = fp4_value(w[j] >> 4) * scale;
      for (int m = 0; m < M; ++m) acc[m] += lo * x[m * K + 2 * j] + hi * x[m * K + 2 * j + 1];
    }
  }
#endif
}

template <int M>
void rows_pass(int fmt, const uint8_t* w, int64_t row_bytes, const float* x, int64_t K, const Scales& s, int64_t N,
               float* out) {
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, row_bytes));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    float acc[M];
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* wr = w + n * row_bytes;
      if (fmt == FMT_BF16) row_bf16<M>(reinterpret_cast<const uint16_t*>(wr), x, K, acc);
      else if (fmt == FMT_FP8) row_fp8<M>(wr, x, K, s, n, acc);
      else row_fp4<M>(wr, x, K, s, n, acc);
      for (int m = 0; m < M; ++m) out[m * N + n] = acc[m];
    }
  });
}

using Pass = void (*)(int, const uint8_t*, int64_t, const float*, int64_t, const Scales&, int64_t, float*);
const Pass PASSES[MAX_ROWS] = {rows_pass<1>, rows_pass<2>, rows_pass<3>, rows_pass<4>,
                               rows_pass<5>, rows_pass<6>, rows_pass<7>, rows_pass<8>};

// The scales of a weight of N x K in format fmt, checked; ``keep`` holds the contiguous tensor they point into.
Scales read_scales(const c10::optional<torch::Tensor>& scale, int64_t fmt, int64_t N, int64_t K, torch::Tensor& keep) {
  Scales s;
  if (fmt == FMT_BF16) return s;
  TORCH_CHECK(scale.has_value(), "packed_matmul: format ", fmt, " needs its scales");
  keep = scale->contiguous();
  const int64_t want_r = fmt == FMT_FP8 ? (N + 127) / 128 : N, want_c = fmt == FMT_FP8 ? (K + 127) / 128 : K / 32;
  TORCH_CHECK(keep.dim() == 2 && keep.size(0) == want_r && keep.size(1) == want_c, "packed_matmul: scale of shape ",
              keep.sizes(), " for a weight of ", N, " x ", K, " (want ", want_r, " x ", want_c, ")");
  s.row_stride = want_c;
  if (keep.scalar_type() == torch::kFloat32) s.f32 = keep.data_ptr<float>();
  else {
    TORCH_CHECK(keep.element_size() == 1, "packed_matmul: scales must be E8M0 bytes or float32, got ",
                keep.scalar_type());
    s.e8m0 = static_cast<const uint8_t*>(keep.data_ptr());
  }
  return s;
}

// K inputs a weight row of row_bytes holds in format fmt, checked.
int64_t row_inputs(int64_t fmt, int64_t row_bytes) {
  TORCH_CHECK(fmt == FMT_BF16 || fmt == FMT_FP8 || fmt == FMT_FP4, "packed_matmul: unknown format ", fmt);
  return fmt == FMT_BF16 ? row_bytes / 2 : fmt == FMT_FP8 ? row_bytes : row_bytes * 2;
}

// One stored row decoded into out[K] (float32, scales applied): the values dequantize-then-matmul would use.
void decode_row(int fmt, const uint8_t* w, int64_t K, const Scales& s, int64_t n, float* out) {
  int64_t k = 0;
  if (fmt == FMT_BF16) {
    const uint16_t* h = reinterpret_cast<const uint16_t*>(w);
#if DSV4_AVX2
    for (; k + 8 <= K; k += 8) _mm256_storeu_ps(out + k, bf16x8(h + k));
#endif
    for (; k < K; ++k) out[k] = bf16_value(h[k]);
  } else if (fmt == FMT_FP8) {
    for (int64_t b = 0; b * 128 < K; ++b) {
      const float scale = s.at(n / 128, b);
      const int64_t k1 = std::min(K, (b + 1) * 128);
      k = b * 128;
#if DSV4_AVX2
      const float folded = scale * 0x1p120f;
      if (std::isfinite(folded)) {
        const __m256 sv = _mm256_set1_ps(folded);
        for (; k + 8 <= k1; k += 8) _mm256_storeu_ps(out + k, _mm256_mul_ps(fp8x8_unscaled(w + k), sv));
      }
#endif
      for (; k < k1; ++k) out[k] = fp8_value(w[k]) * scale;
    }
  } else {
    for (int64_t t = 0; t < K / 32; ++t) {
      const float scale = s.at(n, t);
      int64_t j = t * 16;
#if DSV4_AVX2
      const __m256 sv = _mm256_set1_ps(scale);
      for (int q = 0; q < 4; ++q) _mm256_storeu_ps(out + 2 * j + 8 * q, _mm256_mul_ps(fp4x8(w + j + 4 * q), sv));
#else
      for (; j < t * 16 + 16; ++j) {
        out[2 * j] = fp4_value(w[j] & 0xF) * scale;
        out[2 * j + 1] = fp4_value(w[j] >> 4) * scale;
      }
#endif
    }
  }
}

}  // namespace

torch::Tensor packed_matmul(torch::Tensor x, torch::Tensor weight, c10::optional<torch::Tensor> scale,
                            int64_t fmt) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.device().is_cpu(),
              "packed_matmul: x must be a float32 CPU matrix [M, K], got ", x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.device().is_cpu(),
              "packed_matmul: weight must be a contiguous CPU matrix, got ", weight.sizes());
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const int64_t row_bytes = weight.size(1) * weight.element_size();
  TORCH_CHECK(row_inputs(fmt, row_bytes) == K && (fmt != FMT_FP4 || K % 32 == 0),
              "packed_matmul: a weight row of ", row_bytes, " bytes does not hold ", K, " inputs in format ", fmt);
  torch::Tensor sc;
  const Scales s = read_scales(scale, fmt, N, K, sc);
  x = x.contiguous();
  auto out = torch::empty({M, N}, x.options());
  const uint8_t* w = static_cast<const uint8_t*>(weight.data_ptr());
  for (int64_t m0 = 0; m0 < M; m0 += MAX_ROWS) {
    const int64_t rows = std::min(MAX_ROWS, M - m0);
    // rows m0.. of x and of out are contiguous: the pass reads and writes them in place
    PASSES[rows - 1](int(fmt), w, row_bytes, x.data_ptr<float>() + m0 * K, K, s, N, out.data_ptr<float>() + m0 * N);
  }
  return out;
}

// The weight's rows decoded into out [N, K] float32 (the tile path of many-row products: decoded here, multiplied
// by a matmul).
void dequant(torch::Tensor weight, c10::optional<torch::Tensor> scale, int64_t fmt, torch::Tensor out) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.device().is_cpu(),
              "dequant: weight must be a contiguous CPU matrix, got ", weight.sizes());
  const int64_t N = weight.size(0), row_bytes = weight.size(1) * weight.element_size();
  const int64_t K = row_inputs(fmt, row_bytes);
  TORCH_CHECK(fmt != FMT_FP4 || K % 32 == 0, "dequant: FP4 rows of ", K, " inputs are not whole 1 x 32 tiles");
  TORCH_CHECK(out.scalar_type() == torch::kFloat32 && out.is_contiguous() && out.dim() == 2 && out.size(0) == N &&
              out.size(1) == K, "dequant: out must be a contiguous float32 [", N, ", ", K, "], got ", out.sizes());
  torch::Tensor sc;
  const Scales s = read_scales(scale, fmt, N, K, sc);
  const uint8_t* w = static_cast<const uint8_t*>(weight.data_ptr());
  float* o = out.data_ptr<float>();
  at::parallel_for(0, N, std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, row_bytes)),
                   [&](int64_t n0, int64_t n1) {
                     for (int64_t n = n0; n < n1; ++n) decode_row(int(fmt), w + n * row_bytes, K, s, n, o + n * K);
                   });
}

// Rule 4 of the official numerics (dsv4.quant.fp8_act_round, whose arithmetic this repeats, so that the two agree
// bit for bit): each 1 x block tile of a row of x (the last one shorter when block does not divide the row) gets the
// power-of-two scale 2^ceil(log2(max(amax, amax_floor) / 448)); each value is divided by it, clamped to +-448,
// rounded to the nearest E4M3 value (4 significant bits, subnormal step 2^-9, ties to even) and multiplied back. A
// tile holding a NaN or an infinity gets the scale 1 (torch.frexp gives such an amax the exponent 0).
namespace {

constexpr float E4M3_MAX = 448.f;

inline uint32_t float_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

// |v| <= 448 to the nearest E4M3 value: the step 2^(e - 4) of v's binary exponent e (|v| in [2^(e-1), 2^e), from
// its float32 exponent field), at least 2^-9; v / step by a power of two is exact, nearbyint rounds half to even
inline float e4m3_round(float v) {
  const int step_exp = std::max(int((float_bits(v) >> 23) & 0xFF) - 130, -9);
  const float step = bits_to_float(uint32_t(step_exp + 127) << 23), inv = bits_to_float(uint32_t(127 - step_exp) << 23);
  return std::nearbyint(v * inv) * step;
}

void round_tile(const float* x, float* out, int64_t n, float amax_floor) {
  float amax = 0.f;
  bool finite = true;
  for (int64_t i = 0; i < n; ++i) {
    const float a = std::fabs(x[i]);
    finite &= a <= std::numeric_limits<float>::max();
    amax = a > amax ? a : amax;
  }
  int e = 0;
  if (finite) {
    amax = std::max(std::max(amax, amax_floor), E4M3_MAX * 0x1p-126f);
    if (std::frexp(amax / E4M3_MAX, &e) == 0.5f) e -= 1;  // an exact power of two is its own ceiling
  }
  const float scale = std::ldexp(1.f, std::max(e, -126)), inv = 1.f / scale;  // both powers of two: exact
  for (int64_t i = 0; i < n; ++i)
    out[i] = e4m3_round(std::min(std::max(x[i] * inv, -E4M3_MAX), E4M3_MAX)) * scale;
}

}  // namespace

torch::Tensor act_round(torch::Tensor x, int64_t block, double amax_floor) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.device().is_cpu(),
              "act_round: x must be a float32 CPU matrix [M, n], got ", x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(block > 0, "act_round: block must be positive, got ", block);
  x = x.contiguous();
  auto out = torch::empty_like(x);
  const int64_t M = x.size(0), n = x.size(1);
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float floor = float(amax_floor);
  at::parallel_for(0, M, std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(1, n)),
                   [&](int64_t m0, int64_t m1) {
                     for (int64_t m = m0; m < m1; ++m)
                       for (int64_t j = 0; j < n; j += block)
                         round_tile(xp + m * n + j, op + m * n + j, std::min(block, n - j), floor);
                   });
  return out;
}

bool vectorized() { return DSV4_AVX2; }
