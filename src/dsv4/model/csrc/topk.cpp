// The indexer's top-k with ties broken toward the lower index, exactly, in one pass a row (dsv4.model.fused.
// topk_lower; dsv4.model.indexer.topk_lower_index calls it without autograd): the k-th largest score found by a
// selection (std::nth_element on a copy of the row, linear on average), then the row read once in index order,
// taking every score above it and the first ones equal to it until k are taken. torch.topk sorts toward its k-th
// and leaves the tie rule to a second pass; this has none. Picks come in index order.

#include "ops.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

torch::Tensor topk_lower(torch::Tensor scores, int64_t k) {
  TORCH_CHECK(scores.dim() == 2 && scores.scalar_type() == torch::kFloat32 && scores.device().is_cpu(),
              "topk_lower: scores must be a float32 CPU matrix [M, T], got ", scores.sizes(), " ",
              scores.scalar_type());
  const int64_t M = scores.size(0), T = scores.size(1);
  TORCH_CHECK(k >= 1 && k <= T, "topk_lower: k must be in [1, ", T, "] (the scores of a row), got ", k);
  scores = scores.contiguous();
  auto idx = torch::empty({M, k}, scores.options().dtype(torch::kInt64));
  const float* sp = scores.data_ptr<float>();
  int64_t* ip = idx.data_ptr<int64_t>();
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    std::vector<float> buf(T);
    for (int64_t m = m0; m < m1; ++m) {
      const float* row = sp + m * T;
      std::copy(row, row + T, buf.begin());
      std::nth_element(buf.begin(), buf.begin() + (T - k), buf.end());
      const float kth = buf[T - k];  // the k-th largest: T - k scores at or below it come first
      int64_t above = 0;
      for (int64_t j = 0; j < T; ++j) above += row[j] > kth;
      int64_t ties = k - above, n = 0;
      int64_t* out = ip + m * k;
      for (int64_t j = 0; j < T && n < k; ++j) {
        if (row[j] > kth) {
          out[n++] = j;
        } else if (row[j] == kth && ties > 0) {
          out[n++] = j;
          --ties;
        }
      }
    }
  });
  return idx;
}
