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
// time (vec.h's exp_nonpositive, within 2 ulp of expf). A tile is 32 visible picks (masked ones are skipped when the
// tile is gathered); its logits are taken four picks against two heads at a time and its weighted sum four heads
// against 16 columns at a time, so that each vector loaded meets several FMAs (one pick against eight heads, then
// eight heads' sums of one 8-column vector, loaded a vector an FMA): 1,024 queries x 8 heads x 128 against 512
// random picks of 8,192 entries, 30 against 34 us a query on 2 threads; with 30% of the picks masked, 19 against
// 28 (the same results within 5e-7 of their magnitude).

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
constexpr int64_t TILE = 32;        // visible picks per tile: 32 x c floats in L1 between the logits and the sum
constexpr int64_t SPAN_LEAST = 128; // attend_picks: the fewest picks a thread takes of one query

#if DSV4_AVX2
// z[h * TILE + p] = q[h] . e[p] for the NH heads (q [NH, c], row stride c) and four picks e[0..4) (c a multiple of
// 8): NH x 4 accumulators, each pick's vector read once for the heads and each head's once for the picks
template <int NH>
inline void dots4(const float* q, const float* const* e, int64_t c, float* z) {
  __m256 a[NH][4];
  for (int h = 0; h < NH; ++h)
    for (int p = 0; p < 4; ++p) a[h][p] = _mm256_setzero_ps();
  for (int64_t d = 0; d < c; d += 8) {
    __m256 qv[NH];
    for (int h = 0; h < NH; ++h) qv[h] = _mm256_loadu_ps(q + h * c + d);
    for (int p = 0; p < 4; ++p) {
      const __m256 ev = _mm256_loadu_ps(e[p] + d);
      for (int h = 0; h < NH; ++h) a[h][p] = _mm256_fmadd_ps(qv[h], ev, a[h][p]);
    }
  }
  for (int h = 0; h < NH; ++h) _mm_storeu_ps(z + h * TILE, hsum4(a[h][0], a[h][1], a[h][2], a[h][3]));
}

// z[h * TILE] = q[h] . e for one pick and the H heads
inline void dots1(const float* q, const float* e, int64_t H, int64_t c, float* z) {
  for (int64_t h = 0; h < H; ++h) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t d = 0; d < c; d += 8)
      acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + h * c + d), _mm256_loadu_ps(e + d), acc);
    z[h * TILE] = hsum(acc);
  }
}

// out[h, d0 .. d0 + 8 ND) += sum_j p[h * TILE + j] e_j[d0 ..] for the NH heads (out row stride c): NH x ND sums in
// registers while the tile's picks go by, each pick's vectors read once for the heads
template <int NH, int ND>
inline void weighted_block(const float* p, const float* const* ents, int64_t n, int64_t c, int64_t d0, float* out) {
  __m256 acc[NH][ND];
  for (int h = 0; h < NH; ++h)
    for (int i = 0; i < ND; ++i) acc[h][i] = _mm256_loadu_ps(out + h * c + d0 + 8 * i);
  for (int64_t j = 0; j < n; ++j) {
    __m256 ev[ND];
    for (int i = 0; i < ND; ++i) ev[i] = _mm256_loadu_ps(ents[j] + d0 + 8 * i);
    for (int h = 0; h < NH; ++h) {
      const __m256 pb = _mm256_broadcast_ss(p + h * TILE + j);
      for (int i = 0; i < ND; ++i) acc[h][i] = _mm256_fmadd_ps(pb, ev[i], acc[h][i]);
    }
  }
  for (int h = 0; h < NH; ++h)
    for (int i = 0; i < ND; ++i) _mm256_storeu_ps(out + h * c + d0 + 8 * i, acc[h][i]);
}

template <int NH>
inline void weighted(const float* p, const float* const* ents, int64_t n, int64_t c, float* out) {
  int64_t d = 0;
  for (; d + 16 <= c; d += 16) weighted_block<NH, 2>(p, ents, n, c, d, out);
  if (d < c) weighted_block<NH, 1>(p, ents, n, c, d, out);
}
#endif

// one query: q [H, c], its k picks (rows into entries [R, c], rows from ``split`` on into ``more``; mask null or
// [k]); out [H, c], m [H], s [H]; z: a scratch [H, TILE]. The visible picks are taken TILE at a time.
void one_query(const float* q, const float* entries, int64_t split, const float* more, const int64_t* rows,
               const bool* mask, int64_t H, int64_t c, int64_t k, float* out, float* m, float* s, float* z) {
  std::fill(out, out + H * c, 0.f);
  std::fill(m, m + H, MASKED);
  std::fill(s, s + H, 0.f);
  const float* ents[TILE];
#if DSV4_AVX2
  const bool vec = c % 8 == 0;
#else
  const bool vec = false;
#endif
  int64_t next = 0;  // the next pick to look at
  while (next < k) {
    int64_t n = 0;  // the tile's visible picks
    for (; next < k && n < TILE; ++next)
      if (!mask || mask[next])
        ents[n++] = rows[next] < split ? entries + rows[next] * c : more + (rows[next] - split) * c;
    if (n == 0) break;
    // the tile's logits z[h, j]
    if (vec) {
#if DSV4_AVX2
      int64_t j = 0;
      for (; j + 4 <= n; j += 4) {
        int64_t h = 0;
        for (; h + 2 <= H; h += 2) dots4<2>(q + h * c, ents + j, c, z + h * TILE + j);
        if (h < H) dots4<1>(q + h * c, ents + j, c, z + h * TILE + j);
      }
      for (; j < n; ++j) dots1(q, ents[j], H, c, z + j);
#endif
    } else {
      for (int64_t j = 0; j < n; ++j)
        for (int64_t h = 0; h < H; ++h) {
          float acc = 0.f;
          for (int64_t d = 0; d < c; ++d) acc += q[h * c + d] * ents[j][d];
          z[h * TILE + j] = acc;
        }
    }
    // each head's running maximum, what was summed rescaled when it grows, and the tile's weights in place of z
    for (int64_t h = 0; h < H; ++h) {
      float* zh = z + h * TILE;
      float tmax = MASKED;
      for (int64_t j = 0; j < n; ++j) tmax = std::max(tmax, zh[j]);
      if (tmax > m[h]) {
        const float f = std::exp(std::max(m[h] - tmax, EXP_FLOOR));
        s[h] *= f;
        for (int64_t d = 0; d < c; ++d) out[h * c + d] *= f;
        m[h] = tmax;
      }
      float sum = 0.f;
      int64_t j = 0;
#if DSV4_AVX2
      const __m256 mv = _mm256_set1_ps(m[h]), floor = _mm256_set1_ps(EXP_FLOOR);
      __m256 sv = _mm256_setzero_ps();
      for (; j + 8 <= n; j += 8) {  // eight exponentials at a time
        const __m256 e = exp_nonpositive(_mm256_max_ps(_mm256_sub_ps(_mm256_loadu_ps(zh + j), mv), floor));
        _mm256_storeu_ps(zh + j, e);
        sv = _mm256_add_ps(sv, e);
      }
      sum = hsum(sv);
#endif
      for (; j < n; ++j) {
        zh[j] = std::exp(std::max(zh[j] - m[h], EXP_FLOOR));
        sum += zh[j];
      }
      s[h] += sum;
    }
    // the weighted sum of the tile's picks (still in L1)
    if (vec) {
#if DSV4_AVX2
      int64_t h = 0;
      for (; h + 4 <= H; h += 4) weighted<4>(z + h * TILE, ents, n, c, out + h * c);
      switch (H - h) {
        case 3: weighted<3>(z + h * TILE, ents, n, c, out + h * c); break;
        case 2: weighted<2>(z + h * TILE, ents, n, c, out + h * c); break;
        case 1: weighted<1>(z + h * TILE, ents, n, c, out + h * c); break;
        default: break;
      }
#endif
    } else {
      for (int64_t j = 0; j < n; ++j)
        for (int64_t h = 0; h < H; ++h) {
          const float p = z[h * TILE + j];
          for (int64_t d = 0; d < c; ++d) out[h * c + d] += p * ents[j][d];
        }
    }
  }
}

// a mask's bools (null for none), checked to have the picks' shape; ``keep`` holds its contiguous copy
const bool* mask_data(const char* op, const c10::optional<torch::Tensor>& mask, const torch::Tensor& rows,
                      torch::Tensor& keep) {
  if (!mask.has_value()) return nullptr;
  keep = mask->contiguous();
  TORCH_CHECK(keep.scalar_type() == torch::kBool && keep.sizes() == rows.sizes(), op,
              ": mask must be bool with rows' shape ", rows.sizes(), ", got ", keep.sizes(), " ", keep.scalar_type());
  return keep.data_ptr<bool>();
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
  torch::Tensor mk;
  const bool* mp = mask_data("sparse_attend", mask, rows, mk);
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
      one_query(qp + i * H * c, ep, R, nullptr, rp + i * k, mp ? mp + i * k : nullptr, H, c, k, op + i * H * c,
                mo + i * H, so + i * H, z.data());
  });
  return {out, m, s};
}

// attend_picks: a decoding step's attention, finished: each row's query q [R, H, c] against its picks among the
// row's window keys window[r] [W, c] and compressed entries entries[r] [T, c] (rows[r] [k]: j < W the window's key
// j, else entry j - W; mask [R, k] which of them it sees, or none), with the attention sink (a logit with no
// value): out [R, H, c] = sum_j p_hj key_j, p the softmax over the visible picks and the sink. The window and the
// entries are the decode state's buffers, read in place (any stride between rows), so that the window, CSA's top-k
// and HCA's every entry are all picks of one pass that reads each key once, where a [H, c] x [c, K] product, a
// softmax and a [H, K] x [K, c] product read them twice and spent some 20 us a call each on a library's set-up. A
// step has one query a row, too few to keep the threads busy one query each, so a query's picks are split into
// spans (flash decoding): each span's (out, m, s) by one_query, merged with the sink at the end.
torch::Tensor attend_picks(torch::Tensor q, torch::Tensor window, torch::Tensor entries, torch::Tensor rows,
                           c10::optional<torch::Tensor> mask, torch::Tensor sink) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == torch::kFloat32 && q.device().is_cpu(),
              "attend_picks: q must be a float32 CPU tensor [R, H, c], got ", q.sizes(), " ", q.scalar_type());
  const int64_t N = q.size(0), H = q.size(1), c = q.size(2);
  for (const auto* t : {&window, &entries})
    TORCH_CHECK(t->dim() == 3 && t->scalar_type() == torch::kFloat32 && t->device().is_cpu() && t->size(0) == N &&
                    t->size(2) == c && t->stride(2) == 1 && (t->size(1) < 2 || t->stride(1) == c),
                "attend_picks: window and entries must be float32 CPU [", N, ", n, ", c, "] with each row's keys "
                "contiguous, got ", t->sizes(), " strides ", t->strides(), " ", t->scalar_type());
  TORCH_CHECK(rows.dim() == 2 && rows.scalar_type() == torch::kInt64 && rows.size(0) == N,
              "attend_picks: rows must be int64 [", N, ", k], got ", rows.sizes(), " ", rows.scalar_type());
  TORCH_CHECK(sink.dim() == 1 && sink.size(0) == H && sink.scalar_type() == torch::kFloat32,
              "attend_picks: sink must be float32 [", H, "], got ", sink.sizes(), " ", sink.scalar_type());
  const int64_t k = rows.size(1), W = window.size(1), T = entries.size(1);
  q = q.contiguous();
  rows = rows.contiguous();
  sink = sink.contiguous();
  const int64_t* rp = rows.data_ptr<int64_t>();
  torch::Tensor mk;
  const bool* mp = mask_data("attend_picks", mask, rows, mk);
  for (int64_t i = 0; i < N * k; ++i)
    TORCH_CHECK(rp[i] >= 0 && rp[i] < W + T, "attend_picks: pick ", rp[i], " is not one of the ", W, " + ", T,
                " keys of a row");
  // spans per query: enough to give every thread work, none shorter than SPAN_LEAST picks
  const int64_t threads = at::get_num_threads();
  const int64_t spans = N >= threads ? 1 : std::max<int64_t>(1, std::min((threads + N - 1) / N, k / SPAN_LEAST));
  const int64_t span = (k + spans - 1) / spans;
  auto part_out = torch::empty({N, spans, H, c}, q.options());
  auto part_m = torch::empty({N, spans, H}, q.options());
  auto part_s = torch::empty({N, spans, H}, q.options());
  const float *qp = q.data_ptr<float>(), *sp = sink.data_ptr<float>();
  const float *wp = window.data_ptr<float>(), *ep = entries.data_ptr<float>();
  const int64_t wstride = window.stride(0), estride = entries.stride(0);
  float *po = part_out.data_ptr<float>(), *pm = part_m.data_ptr<float>(), *ps = part_s.data_ptr<float>();
  at::parallel_for(0, N * spans, 1, [&](int64_t j0, int64_t j1) {
    std::vector<float> z(H * TILE);
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t i = j / spans, p0 = (j % spans) * span, n = std::max<int64_t>(0, std::min(k, p0 + span) - p0);
      one_query(qp + i * H * c, wp + i * wstride, W, ep + i * estride, rp + i * k + p0,
                mp ? mp + i * k + p0 : nullptr, H, c, n, po + j * H * c, pm + j * H, ps + j * H, z.data());
    }
  });
  auto out = torch::empty({N, H, c}, q.options());
  float* op = out.data_ptr<float>();
  for (int64_t i = 0; i < N; ++i)
    for (int64_t h = 0; h < H; ++h) {  // the spans and the sink on one scale: their maximum
      float top = sp[h];
      for (int64_t p = 0; p < spans; ++p) top = std::max(top, pm[(i * spans + p) * H + h]);
      float total = std::exp(sp[h] - top);
      float* o = op + (i * H + h) * c;
      std::fill(o, o + c, 0.f);
      for (int64_t p = 0; p < spans; ++p) {
        const int64_t j = (i * spans + p) * H + h;
        const float f = std::exp(pm[j] - top);  // 0 for a span with nothing visible (m = -1e30)
        total += f * ps[j];
        const float* src = po + j * c;
        for (int64_t d = 0; d < c; ++d) o[d] += f * src[d];
      }
      const float inv = 1.f / total;
      for (int64_t d = 0; d < c; ++d) o[d] *= inv;
    }
  return out;
}
