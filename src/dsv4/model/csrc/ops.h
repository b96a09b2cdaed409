// The entry points of the fused kernels (dsv4.model.fused builds every source of this folder into one module,
// bindings.cpp exposes them).
#pragma once

#include <torch/extension.h>

#include <vector>

// packed_matmul.cpp: products against weights kept as the checkpoint stores them, and FP8 activation rounding
torch::Tensor packed_matmul(torch::Tensor x, torch::Tensor weight, c10::optional<torch::Tensor> scale, int64_t fmt);
void dequant(torch::Tensor weight, c10::optional<torch::Tensor> scale, int64_t fmt, torch::Tensor out);
torch::Tensor act_round(torch::Tensor x, int64_t block, double amax_floor);
bool vectorized();

// sparse_attention.cpp: CSA's attention over each query's own picks, (out, m, s) of kernels.Partial
std::vector<torch::Tensor> sparse_attend(torch::Tensor q, torch::Tensor entries, torch::Tensor rows,
                                         c10::optional<torch::Tensor> mask);
// and a decoding step's attention over its picks of a row's window and entries and the sink, finished, the picks of
// a query split over the threads
torch::Tensor attend_picks(torch::Tensor q, torch::Tensor window, torch::Tensor entries, torch::Tensor rows,
                           c10::optional<torch::Tensor> mask, torch::Tensor sink);

// expert_matvec.cpp: each token's product with its own expert's matrix of stacked weights
torch::Tensor expert_matvec(torch::Tensor x, torch::Tensor w, torch::Tensor idx);

// hyper_connections.cpp: mHC's per-token mixing (HyperConnection.expand) and Sinkhorn projection, one pass a token
torch::Tensor hc_expand(torch::Tensor streams, torch::Tensor out, torch::Tensor post, torch::Tensor comb);
torch::Tensor hc_sinkhorn(torch::Tensor logits, int64_t iters, double eps);

// topk.cpp: the top-k of each row with ties broken toward the lower index
torch::Tensor topk_lower(torch::Tensor scores, int64_t k);

// index_scores.cpp: the lightning indexer's scores sum_h w_h relu(q_h . k) of a block of queries, into out [Q, T]
void index_scores(torch::Tensor q, torch::Tensor w, torch::Tensor keys_t, torch::Tensor out);
// and of a decoding step's few queries a row against the keys as the cache stores them, [B, T, c]
torch::Tensor index_scores_rows(torch::Tensor q, torch::Tensor w, torch::Tensor keys);
