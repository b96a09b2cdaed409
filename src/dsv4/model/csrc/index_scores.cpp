// The lightning indexer's scores in one pass (dsv4.model.fused.index_scores; dsv4.model.indexer.chunk_scores and
// select_topk call it without autograd): for query i with heads q[i] [H, c], head weights w[i] [H] and the
// entries' keys given transposed, keys_t [c, T],
//
//   s[i, t] = sum_h w[i, h] relu(q[i, h] . keys_t[:, t])
//
// The operators make the [Q H, T] dots in one matmul, then read them back for the ReLU and again for the weighted
// head sum (a batched product with one row a query). Here each 24-entry panel of keys is multiplied by four heads
// at a time in registers (12 accumulators: 4 heads x 3 vectors of 8 entries), the ReLU and the head weight are
// applied there and only the [Q, T] scores are written. Panels are taken PANELS at a time (their keys, 96 x c
// floats, stay in L1 while every query of the block passes over them), spread over the threads. Only the order of
// the sums differs from the reference: each dot is summed over c in order, the heads are added in order to +0.0
// (so a score is never -0.0, which the tie rule would tell from +0.0); a NaN dot propagates, as torch.relu's does.

#include "ops.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "vec.h"

namespace {

constexpr int64_t NR = 24;     // entries per panel: three vectors of 8
constexpr int64_t PANELS = 4;  // panels a thread's block passes every query over (4 x 24 x c floats in L1)

// the scores of query row (q [H, c], w [H]) against entries [t0, t0 + n) of keys_t (row stride ldk), portable
void scores_scalar(const float* q, const float* w, const float* kt, int64_t ldk, int64_t H, int64_t c, int64_t t0,
                   int64_t n, float* out) {
  for (int64_t t = t0; t < t0 + n; ++t) {
    float s = 0.f;
    for (int64_t h = 0; h < H; ++h) {
      float dot = 0.f;
      for (int64_t d = 0; d < c; ++d) dot += q[h * c + d] * kt[d * ldk + t];
      const float r = dot > 0.f || dot != dot ? dot : 0.f;  // relu, NaN kept
      s += w[h] * r;
    }
    out[t] = s + 0.f;
  }
}

#if DSV4_AVX2
// acc[j] += sum over the NH heads of w[h] relu(q[h] . keys_t[:, t0 + 8 j .. + 8]), j < NV
template <int NH, int NV>
inline void head_group(const float* q, const float* w, const float* kt, int64_t ldk, int64_t c, int64_t t0,
                       __m256* acc) {
  __m256 dot[NH][NV];
  for (int h = 0; h < NH; ++h)
    for (int j = 0; j < NV; ++j) dot[h][j] = _mm256_setzero_ps();
  const float* k = kt + t0;
  for (int64_t d = 0; d < c; ++d, k += ldk) {
    __m256 kv[NV];
    for (int j = 0; j < NV; ++j) kv[j] = _mm256_loadu_ps(k + 8 * j);
    for (int h = 0; h < NH; ++h) {
      const __m256 qb = _mm256_broadcast_ss(q + h * c + d);
      for (int j = 0; j < NV; ++j) dot[h][j] = _mm256_fmadd_ps(qb, kv[j], dot[h][j]);
    }
  }
  const __m256 zero = _mm256_setzero_ps();
  for (int h = 0; h < NH; ++h) {
    const __m256 wb = _mm256_broadcast_ss(w + h);
    for (int j = 0; j < NV; ++j) acc[j] = _mm256_fmadd_ps(wb, _mm256_max_ps(zero, dot[h][j]), acc[j]);
  }
}

// out[t0 .. t0 + 8 NV) of one query: heads four at a time, then the remaining one to three
template <int NV>
inline void panel(const float* q, const float* w, const float* kt, int64_t ldk, int64_t H, int64_t c, int64_t t0,
                  float* out) {
  __m256 acc[NV];
  for (int j = 0; j < NV; ++j) acc[j] = _mm256_setzero_ps();
  int64_t h = 0;
  for (; h + 4 <= H; h += 4) head_group<4, NV>(q + h * c, w + h, kt, ldk, c, t0, acc);
  switch (H - h) {
    case 3: head_group<3, NV>(q + h * c, w + h, kt, ldk, c, t0, acc); break;
    case 2: head_group<2, NV>(q + h * c, w + h, kt, ldk, c, t0, acc); break;
    case 1: head_group<1, NV>(q + h * c, w + h, kt, ldk, c, t0, acc); break;
    default: break;
  }
  for (int j = 0; j < NV; ++j) _mm256_storeu_ps(out + t0 + 8 * j, acc[j]);
}
#endif

// entries [t0, t1) of one query row
void scores_span(const float* q, const float* w, const float* kt, int64_t ldk, int64_t H, int64_t c, int64_t t0,
                 int64_t t1, float* out) {
#if DSV4_AVX2
  int64_t t = t0;
  for (; t + NR <= t1; t += NR) panel<3>(q, w, kt, ldk, H, c, t, out);
  if (t + 16 <= t1) {
    panel<2>(q, w, kt, ldk, H, c, t, out);
    t += 16;
  } else if (t + 8 <= t1) {
    panel<1>(q, w, kt, ldk, H, c, t, out);
    t += 8;
  }
  if (t < t1) scores_scalar(q, w, kt, ldk, H, c, t, t1 - t, out);
#else
  scores_scalar(q, w, kt, ldk, H, c, t0, t1 - t0, out);
#endif
}

}  // namespace

void index_scores(torch::Tensor q, torch::Tensor w, torch::Tensor keys_t, torch::Tensor out) {
  auto f32cpu = [](const torch::Tensor& t) { return t.scalar_type() == torch::kFloat32 && t.device().is_cpu(); };
  TORCH_CHECK(f32cpu(q) && f32cpu(w) && f32cpu(keys_t) && f32cpu(out),
              "index_scores: q, w, keys_t and out must be float32 CPU tensors");
  TORCH_CHECK(q.dim() == 3, "index_scores: q must be [Q, H, c], got ", q.sizes());
  const int64_t Q = q.size(0), H = q.size(1), c = q.size(2);
  TORCH_CHECK(w.dim() == 2 && w.size(0) == Q && w.size(1) == H, "index_scores: w must be [Q, H] = [", Q, ", ", H,
              "], got ", w.sizes());
  TORCH_CHECK(keys_t.dim() == 2 && keys_t.size(0) == c, "index_scores: keys_t must be [c, T] with c = ", c,
              ", got ", keys_t.sizes());
  const int64_t T = keys_t.size(1);
  TORCH_CHECK(out.dim() == 2 && out.size(0) == Q && out.size(1) == T,
              "index_scores: out must be [Q, T] = [", Q, ", ", T, "], got ", out.sizes());
  TORCH_CHECK(out.stride(1) == 1 && keys_t.stride(1) == 1,
              "index_scores: out and keys_t must be contiguous along the entries");
  q = q.contiguous();
  w = w.contiguous();
  const float* qp = q.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* kp = keys_t.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t ldk = keys_t.stride(0), ldo = out.stride(0);
  const int64_t block = NR * PANELS, blocks = (T + block - 1) / block;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t t0 = b * block, t1 = std::min(T, t0 + block);
      for (int64_t i = 0; i < Q; ++i) scores_span(qp + i * H * c, wp + i * H, kp, ldk, H, c, t0, t1, op + i * ldo);
    }
  });
}
