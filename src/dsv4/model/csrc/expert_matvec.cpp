// Each token's product with its own expert's matrix, read in place from the stacked weights (dsv4.model.fused.
// expert_matvec; the compiled decoding step's routed experts call it):
//
//   out[m, n] = sum_k x[m, k] w[idx[m], n, k]      x [M, K], w [E, N, K] float32, idx [M] int64
//
// The product of a decoding step's few tokens with the k experts each picked, without the [M, N, K] copy of the
// picked matrices that tensor indexing writes and a batched matmul reads again: each picked weight row is read once,
// four rows at a time against one pass over x (independent accumulators: an FMA's latency, not the memory, would
// set the pace of a single chain). The sums run in 8 lanes per row, then across them; the reference (indexing and
// bmm) sums in another order.

#include "ops.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "vec.h"

namespace {

// out[0..R) = rows w[0..R) (row stride K) . x, R <= 4
template <int R>
inline void dot_rows(const float* w, const float* x, int64_t K, float* out) {
  int64_t k = 0;
  float tail[R] = {};
#if DSV4_AVX2
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (; k + 8 <= K; k += 8) {
    const __m256 xv = _mm256_loadu_ps(x + k);
    for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(w + r * K + k), xv, acc[r]);
  }
  for (int r = 0; r < R; ++r) tail[r] = hsum(acc[r]);
#endif
  for (; k < K; ++k)
    for (int r = 0; r < R; ++r) tail[r] += w[r * K + k] * x[k];
  for (int r = 0; r < R; ++r) out[r] = tail[r];
}

}  // namespace

torch::Tensor expert_matvec(torch::Tensor x, torch::Tensor w, torch::Tensor idx) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.device().is_cpu(),
              "expert_matvec: x must be a float32 CPU matrix [M, K], got ", x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(w.dim() == 3 && w.scalar_type() == torch::kFloat32 && w.device().is_cpu() && w.size(2) == x.size(1),
              "expert_matvec: w must be float32 [E, N, ", x.size(1), "], got ", w.sizes(), " ", w.scalar_type());
  TORCH_CHECK(idx.dim() == 1 && idx.scalar_type() == torch::kInt64 && idx.size(0) == x.size(0),
              "expert_matvec: idx must be int64 [", x.size(0), "], got ", idx.sizes(), " ", idx.scalar_type());
  const int64_t M = x.size(0), K = x.size(1), E = w.size(0), N = w.size(1);
  x = x.contiguous();
  w = w.contiguous();
  idx = idx.contiguous();
  const int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t m = 0; m < M; ++m)
    TORCH_CHECK(ip[m] >= 0 && ip[m] < E, "expert_matvec: expert ", ip[m], " is not one of the ", E);
  auto out = torch::empty({M, N}, x.options());
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  constexpr int64_t BLOCK = 64;  // weight rows per task: 64 K floats (128 KB at K = 512)
  const int64_t blocks = (N + BLOCK - 1) / BLOCK;
  at::parallel_for(0, M * blocks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t m = t / blocks, n0 = (t % blocks) * BLOCK, n1 = std::min(N, n0 + BLOCK);
      const float* wm = wp + ip[m] * N * K;
      int64_t n = n0;
      for (; n + 4 <= n1; n += 4) dot_rows<4>(wm + n * K, xp + m * K, K, op + m * N + n);
      for (; n < n1; ++n) dot_rows<1>(wm + n * K, xp + m * K, K, op + m * N + n);
    }
  });
  return out;
}
