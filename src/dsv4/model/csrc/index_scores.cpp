// The lightning indexer's scores in one pass (dsv4.model.fused.index_scores; dsv4.model.indexer.chunk_scores and
// select_topk call it without autograd): for query i with heads q[i] [H, c], head weights w[i] [H] and the
// entries' keys given transposed, keys_t [c, T],
//
//   s[i, t] = sum_h w[i, h] relu(q[i, h] . keys_t[:, t])
//
// The operators make the [Q H, T] dots in one matmul, then read them back for the ReLU and again for the weighted
// head sum (a batched product with one row a query). Here each 16-entry panel of keys meets four heads at a time
// in registers (8 accumulators: 4 heads x 2 vectors of 8 entries; each key vector loaded once for the four heads,
// so that the FMAs and not the loads set the pace), the ReLU and the head weight are applied there and only the
// [Q, T] scores are written. Panels are taken PANELS at a time, packed into a contiguous buffer (96 x c floats,
// which stay in L1 while every query of the block passes over them: the cache's rows lie a power-of-two stride
// apart, whose lines would share a few L1 sets), the blocks spread over the threads. Only the order of the sums
// differs from the reference: each dot is summed over c in order, the heads are added in order to +0.0 (so a
// score is never -0.0, which the tie rule would tell from +0.0); a NaN dot propagates, as torch.relu's does.
//
// 256 queries x 8 heads x 64 against 4096 / 8192 entries, 2 threads: 6.6 / 12.9 ms against 7.0 / 15.3 ms for
// chunk_scores' operators, near the measured matmul peak (python benchmarks/index_scores.py).

#include "ops.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "vec.h"

namespace {

constexpr int64_t NR = 16;     // entries per panel: two vectors of 8
constexpr int64_t PANELS = 6;  // panels a thread's block passes every query over (6 x 16 x c floats in L1)

// sum_h w[h] relu(q[h] . k) of one entry, portable: its c values `step` floats apart (1 where the cache stores
// them, T in a transposed view), the heads added in order to +0.0, a NaN dot kept as torch.relu keeps it
inline float one_entry(const float* q, const float* w, const float* k, int64_t step, int64_t H, int64_t c) {
  float s = 0.f;
  for (int64_t h = 0; h < H; ++h) {
    float dot = 0.f;
    for (int64_t d = 0; d < c; ++d) dot += q[h * c + d] * k[d * step];
    s += w[h] * (dot > 0.f || dot != dot ? dot : 0.f);
  }
  return s;
}

#if DSV4_AVX2
constexpr int NV = NR / 8;  // vectors a panel

// acc[j] += sum over the NH heads of w[h] relu(q[h] . kt[:, 8 j .. 8 j + 8]) for a packed panel kt [c, NR]
template <int NH>
inline void head_group(const float* q, const float* w, const float* kt, int64_t c, __m256* acc) {
  __m256 dot[NH][NV];
  for (int h = 0; h < NH; ++h)
    for (int j = 0; j < NV; ++j) dot[h][j] = _mm256_setzero_ps();
  for (int64_t d = 0; d < c; ++d, kt += NR) {
    __m256 kv[NV];
    for (int j = 0; j < NV; ++j) {
      kv[j] = _mm256_loadu_ps(kt + 8 * j);
      // held in a register: else the compiler folds a load of kt into every head's FMA, and the loads, not the
      // FMAs, set the pace
      asm("" : "+x"(kv[j]));
    }
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

// out[0 .. NR) of one query against a packed panel: heads four at a time, then the remaining one to three
inline void panel(const float* q, const float* w, const float* kt, int64_t H, int64_t c, float* out) {
  __m256 acc[NV];
  for (int j = 0; j < NV; ++j) acc[j] = _mm256_setzero_ps();
  int64_t h = 0;
  for (; h + 4 <= H; h += 4) head_group<4>(q + h * c, w + h, kt, c, acc);
  switch (H - h) {
    case 3: head_group<3>(q + h * c, w + h, kt, c, acc); break;
    case 2: head_group<2>(q + h * c, w + h, kt, c, acc); break;
    case 1: head_group<1>(q + h * c, w + h, kt, c, acc); break;
    default: break;
  }
  for (int j = 0; j < NV; ++j) _mm256_storeu_ps(out + 8 * j, acc[j]);
}
#endif

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
#if DSV4_AVX2
    // the block's keys packed panel by panel ([panel][c][NR], zeros past T)
    std::vector<float> packed(PANELS * c * NR);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t t0 = b * block, n = std::min(block, T - t0), panels = (n + NR - 1) / NR;
      for (int64_t p = 0; p < panels; ++p)
        for (int64_t d = 0; d < c; ++d)
          for (int64_t j = 0; j < NR; ++j) {
            const int64_t t = t0 + p * NR + j;
            packed[(p * c + d) * NR + j] = t < T ? kp[d * ldk + t] : 0.f;
          }
      for (int64_t i = 0; i < Q; ++i) {
        const float* qi = qp + i * H * c;
        const float* wi = wp + i * H;
        for (int64_t p = 0; p < panels; ++p) {
          float* o = op + i * ldo + t0 + p * NR;
          const int64_t valid = std::min(NR, T - t0 - p * NR);
          if (valid == NR) {
            panel(qi, wi, packed.data() + p * c * NR, H, c, o);
          } else {  // the last panel: the padding's scores are dropped
            float tail[NR];
            panel(qi, wi, packed.data() + p * c * NR, H, c, tail);
            std::copy(tail, tail + valid, o);
          }
        }
      }
    }
#else
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t t0 = b * block, t1 = std::min(T, t0 + block);
      for (int64_t i = 0; i < Q; ++i)
        for (int64_t t = t0; t < t1; ++t) op[i * ldo + t] = one_entry(qp + i * H * c, wp + i * H, kp + t, ldk, H, c);
    }
#endif
  });
}

// ---------------------------------------------------------------------------------------------------- few queries
// index_scores_rows: a decoding step's few queries a row (q [B, Q, H, c], w [B, Q, H]) against that row's keys as
// the cache stores them, keys [B, T, c] (each entry's c values contiguous) -> [B, Q, T]. The keys are read in
// place: a step has no other query to share a packed copy with, and a [c, T] view of them is what the matmul
// libraries handle worst (a [8, 64] x [64, 32768] product took 1.5 ms, some 5 GB/s, against 8 MB of keys). Here
// the entries are taken four at a time against two heads (8 accumulators of one dot's partial sums over c, the
// keys' vectors read once for the two heads), each dot summed across its lanes at the end; ReLU and the head weight
// applied there. The entries are spread over the threads in spans.
namespace {

#if DSV4_AVX2
// out[0 .. 4) = sum_h w[h] relu(q[h] . k_e) for the entries k_e = k + e LDK, e < 4; C (a multiple of 8) and LDK
// known when compiled (the cache's entries lie c apart), so that the four entries' vectors are addressed off one
// pointer and the loop over c unrolls: a runtime stride had the compiler keep the entries' pointers on the stack
template <int64_t C, int64_t LDK>
inline void four_entries(const float* q, const float* w, const float* k, int64_t H, float* out) {
  const __m128 zero = _mm_setzero_ps();
  __m128 s = _mm_setzero_ps();
  int64_t h = 0;
  for (; h + 2 <= H; h += 2) {
    __m256 a[2][4];
    for (int i = 0; i < 2; ++i)
      for (int e = 0; e < 4; ++e) a[i][e] = _mm256_setzero_ps();
    const float* q0 = q + h * C;
#pragma GCC unroll 16
    for (int64_t d = 0; d < C; d += 8) {
      const __m256 qa = _mm256_loadu_ps(q0 + d), qb = _mm256_loadu_ps(q0 + C + d);
      for (int e = 0; e < 4; ++e) {
        const __m256 kv = _mm256_loadu_ps(k + e * LDK + d);
        a[0][e] = _mm256_fmadd_ps(qa, kv, a[0][e]);
        a[1][e] = _mm256_fmadd_ps(qb, kv, a[1][e]);
      }
    }
    for (int i = 0; i < 2; ++i) {
      const __m128 dots = hsum4(a[i][0], a[i][1], a[i][2], a[i][3]);
      s = _mm_add_ps(s, _mm_mul_ps(_mm_set1_ps(w[h + i]), _mm_max_ps(zero, dots)));
    }
  }
  if (h < H) {  // an odd head
    __m256 a[4];
    for (int e = 0; e < 4; ++e) a[e] = _mm256_setzero_ps();
    for (int64_t d = 0; d < C; d += 8) {
      const __m256 qa = _mm256_loadu_ps(q + h * C + d);
      for (int e = 0; e < 4; ++e) a[e] = _mm256_fmadd_ps(qa, _mm256_loadu_ps(k + e * LDK + d), a[e]);
    }
    s = _mm_add_ps(s, _mm_mul_ps(_mm_set1_ps(w[h]), _mm_max_ps(zero, hsum4(a[0], a[1], a[2], a[3]))));
  }
  _mm_storeu_ps(out, s);
}

// The keys of a long context come from memory, not from a cache: each four entries' lines are asked for AHEAD
// entries before their turn (the hardware's prefetcher alone left the FMAs waiting): 32K entries x 64, a different
// 8 MB of keys each call, 8 heads, 2 threads: 674-688 against 911 us
constexpr int64_t AHEAD = 16;

// entries [t, t1) of one query, four at a time where the entries lie C apart; the index of the first left over
template <int64_t C>
inline int64_t fours(const float* q, const float* w, const float* k, int64_t ldk, int64_t H, int64_t t,
                     int64_t t1, float* out) {
  if (ldk != C) return t;
  for (; t + 4 <= t1; t += 4) {
    const char* ahead = reinterpret_cast<const char*>(k + (t + AHEAD) * C);  // past the keys: a hint, not a read
    for (int64_t b = 0; b < 4 * C * static_cast<int64_t>(sizeof(float)); b += 64) _mm_prefetch(ahead + b, _MM_HINT_T0);
    four_entries<C, C>(q, w, k + t * C, H, out + t);
  }
  return t;
}
#endif

constexpr int64_t ROW_SPAN = 256;  // entries a task of the thread pool takes

}  // namespace

torch::Tensor index_scores_rows(torch::Tensor q, torch::Tensor w, torch::Tensor keys) {
  auto f32cpu = [](const torch::Tensor& t) { return t.scalar_type() == torch::kFloat32 && t.device().is_cpu(); };
  TORCH_CHECK(f32cpu(q) && f32cpu(w) && f32cpu(keys), "index_scores_rows: q, w and keys must be float32 CPU tensors");
  TORCH_CHECK(q.dim() == 4, "index_scores_rows: q must be [B, Q, H, c], got ", q.sizes());
  const int64_t B = q.size(0), Q = q.size(1), H = q.size(2), c = q.size(3);
  TORCH_CHECK(w.dim() == 3 && w.size(0) == B && w.size(1) == Q && w.size(2) == H,
              "index_scores_rows: w must be [B, Q, H] = [", B, ", ", Q, ", ", H, "], got ", w.sizes());
  TORCH_CHECK(keys.dim() == 3 && keys.size(0) == B && keys.size(2) == c,
              "index_scores_rows: keys must be [B, T, c] with B = ", B, " and c = ", c, ", got ", keys.sizes());
  TORCH_CHECK(keys.stride(2) == 1, "index_scores_rows: keys must be contiguous along c");
  const int64_t T = keys.size(1);
  q = q.contiguous();
  w = w.contiguous();
  auto out = torch::empty({B, Q, T}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* kp = keys.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t ldb = keys.stride(0), ldk = keys.stride(1);
  const int64_t spans = (T + ROW_SPAN - 1) / ROW_SPAN;
  at::parallel_for(0, B * spans, 1, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t b = j / spans, t0 = (j % spans) * ROW_SPAN, t1 = std::min(T, t0 + ROW_SPAN);
      const float* kb = kp + b * ldb;
      for (int64_t i = 0; i < Q; ++i) {
        const float* qi = qp + (b * Q + i) * H * c;
        const float* wi = wp + (b * Q + i) * H;
        float* o = op + (b * Q + i) * T;
        int64_t t = t0;
#if DSV4_AVX2
        if (c == 64) t = fours<64>(qi, wi, kb, ldk, H, t, t1, o);
        if (c == 128) t = fours<128>(qi, wi, kb, ldk, H, t, t1, o);
#endif
        for (; t < t1; ++t) o[t] = one_entry(qi, wi, kb + t * ldk, 1, H, c);
      }
    }
  });
  return out;
}
