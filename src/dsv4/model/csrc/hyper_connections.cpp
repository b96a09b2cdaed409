// mHC's per-token mixing for long prefills (dsv4.model.fused.hc_expand / hc_sinkhorn; dsv4.model.hyper calls them
// without autograd): a token's n x n matrices are too small for a batched matmul (one tiny GEMM per token) or for
// a dozen tensor operators over [tokens, n, n] (each a pass through memory); here each token is one pass.
//
//   hc_expand:   mixed[t, k, :] = post[t, k] F[t, :] + sum_j comb[t, j, k] X[t, j, :]   (HyperConnection.expand)
//   hc_sinkhorn: softmax over each row + eps, then a column normalization, then iters - 1 times a row and a column
//                normalization, each sum + eps                                            (hyper.sinkhorn)
//
// The same arithmetic as the operators in the same order per element, except that expand's sum over j is one
// running sum (the batched matmul's order is its own).

#include "ops.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

torch::Tensor hc_expand(torch::Tensor streams, torch::Tensor out, torch::Tensor post, torch::Tensor comb) {
  TORCH_CHECK(streams.dim() == 3 && streams.scalar_type() == torch::kFloat32 && streams.device().is_cpu(),
              "hc_expand: streams must be a float32 CPU tensor [N, n, d], got ", streams.sizes(), " ",
              streams.scalar_type());
  const int64_t N = streams.size(0), n = streams.size(1), d = streams.size(2);
  TORCH_CHECK(out.scalar_type() == torch::kFloat32 && out.sizes() == torch::IntArrayRef({N, d}),
              "hc_expand: out must be float32 [", N, ", ", d, "], got ", out.sizes(), " ", out.scalar_type());
  TORCH_CHECK(post.scalar_type() == torch::kFloat32 && post.sizes() == torch::IntArrayRef({N, n}),
              "hc_expand: post must be float32 [", N, ", ", n, "], got ", post.sizes());
  TORCH_CHECK(comb.scalar_type() == torch::kFloat32 && comb.sizes() == torch::IntArrayRef({N, n, n}),
              "hc_expand: comb must be float32 [", N, ", ", n, ", ", n, "], got ", comb.sizes());
  streams = streams.contiguous();
  out = out.contiguous();
  post = post.contiguous();
  comb = comb.contiguous();
  auto mixed = torch::empty_like(streams);
  const float *xp = streams.data_ptr<float>(), *fp = out.data_ptr<float>(), *pp = post.data_ptr<float>(),
              *cp = comb.data_ptr<float>();
  float* mp = mixed.data_ptr<float>();
  at::parallel_for(0, N, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, n * d)), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float *x = xp + t * n * d, *f = fp + t * d, *c = cp + t * n * n;
      for (int64_t k = 0; k < n; ++k) {
        float* m = mp + (t * n + k) * d;
        const float p = pp[t * n + k];
        for (int64_t e = 0; e < d; ++e) m[e] = p * f[e];
        for (int64_t j = 0; j < n; ++j) {
          const float w = c[j * n + k];
          const float* xj = x + j * d;
          for (int64_t e = 0; e < d; ++e) m[e] += w * xj[e];
        }
      }
    }
  });
  return mixed;
}

torch::Tensor hc_sinkhorn(torch::Tensor logits, int64_t iters, double eps) {
  TORCH_CHECK(logits.dim() == 3 && logits.size(1) == logits.size(2) && logits.scalar_type() == torch::kFloat32 &&
                  logits.device().is_cpu(),
              "hc_sinkhorn: logits must be float32 CPU [N, n, n], got ", logits.sizes(), " ", logits.scalar_type());
  TORCH_CHECK(iters >= 1, "hc_sinkhorn: iters must be >= 1, got ", iters);
  logits = logits.contiguous();
  const int64_t N = logits.size(0), n = logits.size(1);
  auto result = torch::empty_like(logits);
  const float* lp = logits.data_ptr<float>();
  float* rp = result.data_ptr<float>();
  const float e = float(eps);
  at::parallel_for(0, N, 256, [&](int64_t t0, int64_t t1) {
    std::vector<float> sums(n);
    for (int64_t t = t0; t < t1; ++t) {
      const float* l = lp + t * n * n;
      float* c = rp + t * n * n;
      for (int64_t i = 0; i < n; ++i) {  // softmax over the row, + eps
        float mx = l[i * n];
        for (int64_t j = 1; j < n; ++j) mx = std::max(mx, l[i * n + j]);
        float s = 0.f;
        for (int64_t j = 0; j < n; ++j) s += (c[i * n + j] = std::exp(l[i * n + j] - mx));
        for (int64_t j = 0; j < n; ++j) c[i * n + j] = c[i * n + j] / s + e;
      }
      auto columns = [&] {
        for (int64_t j = 0; j < n; ++j) {
          float s = 0.f;
          for (int64_t i = 0; i < n; ++i) s += c[i * n + j];
          sums[j] = s + e;
        }
        for (int64_t i = 0; i < n; ++i)
          for (int64_t j = 0; j < n; ++j) c[i * n + j] /= sums[j];
      };
      columns();
      for (int64_t it = 1; it < iters; ++it) {
        for (int64_t i = 0; i < n; ++i) {
          float s = 0.f;
          for (int64_t j = 0; j < n; ++j) s += c[i * n + j];
          s += e;
          for (int64_t j = 0; j < n; ++j) c[i * n + j] /= s;
        }
        columns();
      }
    }
  });
  return result;
}
