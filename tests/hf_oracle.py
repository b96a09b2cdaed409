"""Helpers that build HF transformers' DeepseekV4ForCausalLM as an oracle (test-only dependency)."""

from __future__ import annotations

import torch

transformers = __import__("pytest").importorskip("transformers")
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM  # noqa: E402

from dsv4.model.moe import balanced_tid2eid  # noqa: E402


def hf_config(**overrides) -> "DeepseekV4Config":
    base = dict(vocab_size=97, hidden_size=32, moe_intermediate_size=16, num_hidden_layers=4,
                num_attention_heads=4, head_dim=16, q_lora_rank=16, n_routed_experts=6, num_experts_per_tok=2,
                o_groups=2, o_lora_rank=8, index_n_heads=2, index_head_dim=8, index_topk=3, sliding_window=8,
                compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
                layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                             "compressed_sparse_attention"],
                mlp_layer_types=["hash_moe", "moe", "moe", "moe"], partial_rotary_factor=0.5,
                max_position_embeddings=4096, num_nextn_predict_layers=0)
    base.update(overrides)
    return DeepseekV4Config(**base)


def random_hf_model(config, seed: int = 0) -> "DeepseekV4ForCausalLM":
    """An HF model whose every tensor is random and non-trivial (sinks, position biases, router biases, tid2eid)."""
    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(config).float().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".scale") or name.endswith("hc_scale"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif name.endswith("sinks") or name.endswith("position_bias") or name.endswith(".base") \
                    or name.endswith("hc_base"):
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (p.shape[-1] ** -0.5))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith("tid2eid"):
                b.copy_(balanced_tid2eid(config.vocab_size, config.n_routed_experts, config.num_experts_per_tok,
                                         seed=3))
    return model
