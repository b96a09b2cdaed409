// The Python module of the fused kernels (dsv4.model.fused loads it): every call releases the GIL. The operators a
// compiled graph calls are registered with PyTorch's dispatcher instead (torch.ops.dsv4.*), which inductor's code
// calls without going through Python.
#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("packed_matmul", &packed_matmul, "x [M, K] @ W^T for W stored as BF16, FP8 E4M3 or packed FP4 E2M1",
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("scale"), pybind11::arg("fmt"),
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("dequant", &dequant, "a stored weight's rows decoded into a float32 matrix", pybind11::arg("weight"),
        pybind11::arg("scale"), pybind11::arg("fmt"), pybind11::arg("out"),
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("act_round", &act_round, "FP8 E4M3 quantize-dequantize of x [M, n] in 1 x block power-of-two-scaled tiles",
        pybind11::arg("x"), pybind11::arg("block"), pybind11::arg("amax_floor"),
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("sparse_attend", &sparse_attend,
        "each query's attention over its own picks of the entries: (out [N, H, c], m [N, H], s [N, H])",
        pybind11::arg("q"), pybind11::arg("entries"), pybind11::arg("rows"), pybind11::arg("mask"),
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("hc_expand", &hc_expand, "mHC: post_k F + sum_j comb[j, k] X_j per token", pybind11::arg("streams"),
        pybind11::arg("out"), pybind11::arg("post"), pybind11::arg("comb"),
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("index_scores", &index_scores, "the indexer's scores sum_h w[i, h] relu(q[i, h] . keys_t[:, t]) into out",
        pybind11::arg("q"), pybind11::arg("w"), pybind11::arg("keys_t"), pybind11::arg("out"),
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("vectorized", &vectorized, "whether it was built with AVX2 + FMA");
}

TORCH_LIBRARY(dsv4, m) {
  m.def("expert_matvec(Tensor x, Tensor w, Tensor idx) -> Tensor");
  m.def("topk_lower(Tensor scores, int k) -> Tensor");
  m.def("hc_sinkhorn(Tensor logits, int iters, float eps) -> Tensor");
  m.def("index_scores_rows(Tensor q, Tensor w, Tensor keys) -> Tensor");
  m.def("attend_picks(Tensor q, Tensor window, Tensor entries, Tensor rows, Tensor? mask, Tensor sink) -> Tensor");
}

TORCH_LIBRARY_IMPL(dsv4, CPU, m) {
  m.impl("expert_matvec", &expert_matvec);
  m.impl("topk_lower", &topk_lower);
  m.impl("hc_sinkhorn", &hc_sinkhorn);
  m.impl("index_scores_rows", &index_scores_rows);
  m.impl("attend_picks", &attend_picks);
}
