// CSA's sparse attention in one pass (dsv4.model.fused.sparse_attend; dsv4.model.prefill calls it for long
// prefills): each query against its own top-k compressed entries, which every head of the query shares (one K=V
// head). For query i with heads q[i] [H, c] and entry rows rows[i] [k] of entries [R, c]:
//
//   z_hj = q[i, h] . entries[rows[i, j]]   (masked picks skipped)
//   m_h = max_j z_hj (-1e30 when no pick is visible), e_hj = exp(max(z_hj - m_h, -80)),
//   s_h = sum_j e_hj, out_h = sum_j e_hj entries[rows[i, j]]
//
// which is dsv4.model.kernels.attend's Partial of the gathered entries (the softmax is finished by kernels.merge
// with the window and the sink). The gather, the logits, the exponentials and the weighted sum of the values run
// tile by tile (flash attention's running maximum, rescaling what was summed when it grows), so each picked entry is
// read from memory once, no [k, c] copy of the picks is written and no [H, k] tensor of weights is kept. Only the
// order of the sums differs from the reference; the weights below e^-80 of the running maximum are floored as the
// reference floors them at the final maximum (their share is below 2e-35). The exponentials are taken eight at a
// time (vec.h's exp_nonpositive, within 2 ulp of expf).

#include "ops.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "vec.h"

namespace {

constexpr float MASKED = -1e30f;    // kernels._MASKED: the maximum of a query with no visible pick
constexpr float EXP_FLOOR = -80.f;  // kernels._EXP_FLOOR
constexpr int64_t TILE = 32;        // picks per tile: their 32 x c floats stay in L1 between the logits and the sum
constexpr int G = 8;                // heads per group: one accumulator register each

#if DSV4_AVX2
// z[g * TILE] = q[g] . e for the NG heads of a group (q [NG, c] with row stride c, c a multiple of 8)
template <int NG>
inline void dots(const float* q, const float* e, int64_t c, float* z) {
  __m256 acc[NG];
  for (int g = 0; g < NG; ++g) acc[g] = _mm256_setzero_ps();
  for (int64_t d = 0; d < c; d += 8) {
    const __m256 ev = _mm256_loadu_ps(e + d);
    for (int g = 0; g < NG; ++g) acc[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * c + d), ev, acc[g]);
  }
  for (int g = 0; g < NG; ++g) z[g * TILE] = hsum(acc[g]);
}

// out[g] += sum_j p[g * TILE + j] e_j over a tile's picks (out [NG, c] row stride c): each 8 columns of the NG
// heads' sums held in registers while the tile's picks go by
template <int NG>
inline void weighted(const float* p, const float* const* ents, int64_t n, int64_t c, float* out) {
  for (int64_t d = 0; d < c; d += 8) {
    __m256 acc[NG];
    for (int g = 0; g < NG; ++g) acc[g] = _mm256_loadu_ps(out + g * c + d);
    for (int64_t j = 0; j < n; ++j) {
      if (!ents[j]) continue;
      const __m256 ev = _mm256_loadu_ps(ents[j] + d);
      for (int g = 0; g < NG; ++g) acc[g] = _mm256_fmadd_ps(_mm256_broadcast_ss(p + g * TILE + j), ev, acc[g]);
    }
    for (int g = 0; g < NG; ++g) _mm256_storeu_ps(out + g * c + d, acc[g]);
  }
}

template <int NG>
inline void group_dots(const float* q, const float* e, int64_t c, int ng, float* z) {
  if constexpr (NG > 1) {
    if (ng < NG) return group_dots<NG - 1>(q, e, c, ng, z);
  }
  dots<NG>(q, e, c, z);
}

template <int NG>
inline void group_weighted(const float* p, const float* const* ents, int64_t n, int64_t c, int ng, float* out) {
  if constexpr (NG > 1) {
    if (ng < NG) return group_weighted<NG - 1>(p, ents, n, c, ng, out);
  }
  weighted<NG>(p, ents, n, c, out);
}
#endif

// one query: q [H, c], its k picks (rows into entries [R, c]; mask null or [k]); out [H, c], m [H], s [H]; z: a
// scratch [H, TILE]
void one_query(const float* q, const float* entries, const int64_t* rows, const bool* mask, int64_t H, int64_t c,
               int64_t k, float* out, float* m, float* s, float* z) {
  std::fill(out, out + H * c, 0.f);
  std::fill(m, m + H, MASKED);
  std::fill(s, s + H, 0.f);
  const float* ents[TILE];
#if DSV4_AVX2
  const bool vec = c % 8 == 0;
#else
  const bool vec = false;
#endif
  for (int64_t j0 = 0; j0 < k; j0 += TILE) {
    const int64_t n = std::min(TILE, k - j0);
    int64_t visible = 0;
    for (int64_t j = 0; j < n; ++j) {
      ents[j] = (mask && !mask[j0 + j]) ? nullptr : entries + rows[j0 + j] * c;
      visible += ents[j] != nullptr;
    }
    if (visible == 0) continue;
    // the tile's logits z[h, j]
    for (int64_t j = 0; j < n; ++j) {
      if (!ents[j]) continue;
      if (vec) {
#if DSV4_AVX2
        for (int64_t h = 0; h < H; h += G)
          group_dots<G>(q + h * c, ents[j], c, int(std::min<int64_t>(G, H - h)), z + h * TILE + j);
#endif
      } else {
        for (int64_t h = 0; h < H; ++h) {
          float acc = 0.f;
          for (int64_t d = 0; d < c; ++d) acc += q[h * c + d] * ents[j][d];
          z[h * TILE + j] = acc;
        }
      }
    }
    // each head's running maximum, what was summed rescaled when it grows, and the tile's weights in place of z
    for (int64_t h = 0; h < H; ++h) {
      float* zh = z + h * TILE;
      float tmax = MASKED;
      for (int64_t j = 0; j < n; ++j)
        if (ents[j]) tmax = std::max(tmax, zh[j]);
      if (tmax > m[h]) {
        const float f = std::exp(std::max(m[h] - tmax, EXP_FLOOR));
        s[h] *= f;
        for (int64_t d = 0; d < c; ++d) out[h * c + d] *= f;
        m[h] = tmax;
      }
      float sum = 0.f;
      int64_t j = 0;
#if DSV4_AVX2
      // eight exponentials at a time (masked picks' weights zeroed after)
      const __m256 mv = _mm256_set1_ps(m[h]), floor = _mm256_set1_ps(EXP_FLOOR);
      __m256 sv = _mm256_setzero_ps();
      for (; j + 8 <= n; j += 8) {
        __m256 e = exp_nonpositive(_mm256_max_ps(_mm256_sub_ps(_mm256_loadu_ps(zh + j), mv), floor));
        _mm256_storeu_ps(zh + j, e);
      }
      if (visible < n)
        for (int64_t i = 0; i < j; ++i)
          if (!ents[i]) zh[i] = 0.f;
      for (int64_t i = 0; i < j; i += 8) sv = _mm256_add_ps(sv, _mm256_loadu_ps(zh + i));
      sum = hsum(sv);
#endif
      for (; j < n; ++j) {
        zh[j] = ents[j] ? std::exp(std::max(zh[j] - m[h], EXP_FLOOR)) : 0.f;
        sum += zh[j];
      }
      s[h] += sum;
    }
    // the weighted sum of the tile's picks (still in L1)
    if (vec) {
#if DSV4_AVX2
      for (int64_t h = 0; h < H; h += G)
        group_weighted<G>(z + h * TILE, ents, n, c, int(std::min<int64_t>(G, H - h)), out + h * c);
#endif
    } else {
      for (int64_t j = 0; j < n; ++j) {
        if (!ents[j]) continue;
        for (int64_t h = 0; h < H; ++h) {
          const float p = z[h * TILE + j];
          for (int64_t d = 0; d < c; ++d) out[h * c + d] += p * ents[j][d];
        }
      }
    }
  }
}

}  // namespace

std::vector<torch::Tensor> sparse_attend(torch::Tensor q, torch::Tensor entries, torch::Tensor rows,
                                         c10::optional<torch::Tensor> mask) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == torch::kFloat32 && q.device().is_cpu(),
              "sparse_attend: q must be a float32 CPU tensor [N, H, c], got ", q.sizes(), " ", q.scalar_type());
  TORCH_CHECK(entries.dim() == 2 && entries.scalar_type() == torch::kFloat32 && entries.device().is_cpu() &&
                  entries.size(1) == q.size(2),
              "sparse_attend: entries must be a float32 CPU matrix [R, ", q.size(2), "], got ", entries.sizes(), " ",
              entries.scalar_type());
  TORCH_CHECK(rows.dim() == 2 && rows.scalar_type() == torch::kInt64 && rows.size(0) == q.size(0),
              "sparse_attend: rows must be int64 [", q.size(0), ", k], got ", rows.sizes(), " ", rows.scalar_type());
  const int64_t N = q.size(0), H = q.size(1), c = q.size(2), k = rows.size(1), R = entries.size(0);
  q = q.contiguous();
  entries = entries.contiguous();
  rows = rows.contiguous();
  const int64_t* rp = rows.data_ptr<int64_t>();
  const bool* mp = nullptr;
  torch::Tensor mk;
  if (mask.has_value()) {
    mk = mask->contiguous();
    TORCH_CHECK(mk.scalar_type() == torch::kBool && mk.sizes() == rows.sizes(),
                "sparse_attend: mask must be bool with rows' shape ", rows.sizes(), ", got ", mk.sizes(), " ",
                mk.scalar_type());
    mp = mk.data_ptr<bool>();
  }
  for (int64_t i = 0; i < N * k; ++i)
    TORCH_CHECK(rp[i] >= 0 && rp[i] < R, "sparse_attend: pick ", rp[i], " is not a row of the ", R, " entries");
  auto out = torch::empty({N, H, c}, q.options());
  auto m = torch::empty({N, H}, q.options());
  auto s = torch::empty({N, H}, q.options());
  const float *qp = q.data_ptr<float>(), *ep = entries.data_ptr<float>();
  float *op = out.data_ptr<float>(), *mo = m.data_ptr<float>(), *so = s.data_ptr<float>();
  at::parallel_for(0, N, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> z(H * TILE);
    for (int64_t i = i0; i < i1; ++i)
      one_query(qp + i * H * c, ep, rp + i * k, mp ? mp + i * k : nullptr, H, c, k, op + i * H * c, mo + i * H,
                so + i * H, z.data());
  });
  return {out, m, s};
}
