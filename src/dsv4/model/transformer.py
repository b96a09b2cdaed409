"""The whole model: embedding -> hc_mult streams -> blocks -> hc head -> RMSNorm -> lm head (DESIGN: data flow).

Shapes: B batch, S sequence (queries), Q a block's queries, n residual streams (hc_mult), d hidden, H heads,
c head dim, K a query's keys, W window, T compressed entries, k top-k, R decode rows, N tokens (B S), E experts;
here also D the MTP depth.

``model(input_ids)`` returns float32 logits [B, S, vocab] (float64 for a float64 model: ``dsv4.model.precision``).
With ``cache=model.new_cache(B)`` it returns the logits of just the given positions and advances the cache; any split
of a sequence into calls gives the logits of one call.
``model.forward_train(input_ids)`` returns what training needs beyond logits (MTP logits, router statistics).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from dsv4.cache import LayerCache, ModelCache
from dsv4.config import SLIDING, ModelConfig
from dsv4.model.attention import Attention
from dsv4.model.decode import EAGER_STEP, DecodeState, advance, compiled_positions, eager_step_of, positions_of
from dsv4.model.documents import Packing
from dsv4.model.hyper import HyperConnection, HyperHead
from dsv4.model.indexer import IndexerStats
from dsv4.model.init import init_weights
from dsv4.model.linear import Linear, activation_dtype
from dsv4.model.moe import MoE, RouterOutput
from dsv4.model.norm import RMSNorm
from dsv4.model.precision import upcast


class Block(nn.Module):
    """One layer: (mHC pre -> attn_norm -> attention -> mHC post) then (mHC pre -> ffn_norm -> MoE -> mHC post)."""

    def __init__(self, config: ModelConfig, layer_type: str, layer_idx: int | None, hashed: bool):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config, layer_type)
        self.ffn = MoE(config, layer_idx, hashed=hashed)
        self.hc_attn = HyperConnection(config)
        self.hc_ffn = HyperConnection(config)

    def forward(self, streams: torch.Tensor, positions: torch.Tensor, input_ids: torch.Tensor | None,
                cache: LayerCache | None = None, packing: Packing | None = None,
                stats: list[IndexerStats] | None = None) -> tuple[torch.Tensor, RouterOutput]:
        if eager_step_of(streams, cache):  # an eager decoding step of few tokens: dsv4.model.decode's forms
            with EAGER_STEP:
                return self._forward(streams, positions, input_ids, cache, packing, stats)
        return self._forward(streams, positions, input_ids, cache, packing, stats)

    def _forward(self, streams: torch.Tensor, positions: torch.Tensor, input_ids: torch.Tensor | None,
                 cache: LayerCache | None, packing: Packing | None, stats: list[IndexerStats] | None
                 ) -> tuple[torch.Tensor, RouterOutput]:
        dtype = activation_dtype(self.attn.wq_a)
        y, post, comb = self.hc_attn(streams)
        out = self.attn(self.attn_norm(y.to(dtype)), positions, cache, packing, stats)
        streams = HyperConnection.expand(streams, out, post, comb)
        y, post, comb = self.hc_ffn(streams)
        # a DecodeState's rows are batch-invariant: each token's experts run on their own
        per_token = getattr(cache, "batch_invariant", False)
        out, route = self.ffn(self.ffn_norm(y.to(dtype)), input_ids, per_token=per_token)
        return HyperConnection.expand(streams, out, post, comb), route


class MTPBlock(Block):
    """Multi-token prediction (spec 5): from the final streams at t and the token at t+1, predict the token at t+2.

    Each stream is normed (hnorm) and projected (h_proj), the next token's embedding normed (enorm) and projected
    (e_proj) and added; then a sliding-window block with learned routing, its own hc head and norm; the embedding
    and lm head are the main model's.
    """

    def __init__(self, config: ModelConfig):
        super().__init__(config, SLIDING, None, hashed=False)
        d = config.hidden_size
        self.e_proj = Linear(d, d, bias=False)
        self.h_proj = Linear(d, d, bias=False)
        self.enorm = RMSNorm(d, config.rms_norm_eps)
        self.hnorm = RMSNorm(d, config.rms_norm_eps)
        self.norm = RMSNorm(d, config.rms_norm_eps)
        self.hc_head = HyperHead(config)

    def predict(self, streams: torch.Tensor, next_embed: torch.Tensor, positions: torch.Tensor,
                cache: LayerCache | None = None, packing: Packing | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, RouterOutput]:
        """-> (normed hidden [B, S, d] for the lm head, the block's output streams, router output)."""
        dtype = activation_dtype(self.e_proj)
        h = self.h_proj(self.hnorm(streams.to(dtype)))
        e = self.e_proj(self.enorm(next_embed.to(dtype)))
        x = upcast(h + e.unsqueeze(-2))
        x, route = self.forward(x, positions, None, cache, packing)
        return self.norm(self.hc_head(x).to(dtype)), x, route


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, S, vocab] float32
    mtp_logits: list[torch.Tensor] = field(default_factory=list)  # depth D: [B, S - D, vocab], predicts t + 1 + D
    routes: list[RouterOutput] = field(default_factory=list)  # one per main layer, then one per MTP block
    streams: torch.Tensor | None = None  # final residual streams before the hc head
    indexer_kl: torch.Tensor | None = None  # sum over CSA layers of the mean KL (with indexer training on)
    indexer_recall: float = float("nan")  # mean over CSA layers of the indexer's top-k recall (dense phase)
    indexer_stats: list[IndexerStats] = field(default_factory=list)  # per CSA layer training its indexer, this call


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            Block(config, lt, i, hashed=config.mlp_layer_types[i] == "hash_moe")
            for i, lt in enumerate(config.layer_types))
        self.hc_head = HyperHead(config)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPBlock(config) for _ in range(config.num_nextn_predict_layers))
        init_weights(self)  # dsv4.model.init: every parameter and buffer, module type by module type

    def init_nonpersistent_buffers(self) -> None:
        """Recompute buffers that are not in the state dict (RoPE tables) after ``to_empty``."""
        from dsv4.model.rope import RotaryEmbedding

        for module in self.modules():
            if isinstance(module, RotaryEmbedding):
                module.reset_buffers()

    def set_attention(self, impl: str | Callable, chunk: int | None = None, window_block: int | None = None
                      ) -> "Transformer":
        """Choose the attention path of every layer: "fast" (default), "reference", or a function with
        ``reference.reference``'s arguments returning [B, S, H, c] (a path from outside the model: the benchmarks'
        dense baseline, ``dsv4.bench_baselines.dense_attention``); optionally the fast path's CSA block (``chunk``)
        and window block sizes."""
        if impl not in ("fast", "reference") and not callable(impl):
            raise ValueError(f"attention implementation must be 'fast', 'reference' or a function, got {impl!r}")
        for module in self.modules():
            if isinstance(module, Attention):
                module.impl = impl
                if chunk is not None:
                    module.chunk = chunk
                if window_block is not None:
                    module.window_block = window_block
        return self

    def set_indexer_phase(self, sparse: bool, train_indexer: bool) -> "Transformer":
        """CSA layers: top-k attention (``sparse``) or attention to every visible compressed entry (the dense
        phase); ``train_indexer`` makes ``forward_train`` in training mode report the indexer's KL loss and recall
        (spec 6.6)."""
        for layer in self.layers:
            layer.attn.sparse = sparse
            layer.attn.indexer_training = train_indexer
        return self

    # ---------------------------------------------------------------------------------------------------- cache
    def new_cache(self, batch_size: int) -> ModelCache:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return ModelCache(batch_size, [layer.attn.new_cache() for layer in self.layers])

    # -------------------------------------------------------------------------------------------------- forward
    def _positions(self, input_ids: torch.Tensor, cache: ModelCache | None) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(f"input_ids must be integer token ids, got {input_ids.dtype}")
        start = 0
        if cache is not None:
            if input_ids.shape[0] != cache.batch_size:
                raise ValueError(f"input_ids batch {input_ids.shape[0]} != cache batch {cache.batch_size}")
            if isinstance(cache, DecodeState):  # rows at their own positions
                if torch.compiler.is_compiling():  # a compiled step: its caller checked ids and room
                    return compiled_positions(cache, input_ids.shape[1])
                self._check_ids(input_ids)
                return positions_of(cache, input_ids.shape[1], self.config.max_position_embeddings)
            start = cache.seen
        end = start + input_ids.shape[1]
        if end > self.config.max_position_embeddings:
            raise ValueError(f"sequence reaches position {end - 1}, beyond max_position_embeddings "
                             f"({self.config.max_position_embeddings})")
        self._check_ids(input_ids)
        return torch.arange(start, end, device=input_ids.device)

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        if input_ids.numel():
            low, high = (int(v) for v in torch.aminmax(input_ids))
            if low < 0 or high >= self.config.vocab_size:
                raise ValueError(f"token ids must be in [0, {self.config.vocab_size}), got [{low}, {high}]")

    @staticmethod
    def _packing(input_ids: torch.Tensor, doc_ids: torch.Tensor | None, cache: ModelCache | None = None
                 ) -> Packing | None:
        if doc_ids is None:
            return None
        if cache is not None:
            raise ValueError("doc_ids (packed documents) cannot be combined with a decode cache")
        if doc_ids.shape != input_ids.shape:
            raise ValueError(f"doc_ids shape {tuple(doc_ids.shape)} != input_ids shape {tuple(input_ids.shape)}")
        return Packing.from_doc_ids(doc_ids)

    def hidden_streams(self, input_ids: torch.Tensor, cache: ModelCache | None = None,
                       doc_ids: torch.Tensor | None = None, stats: list[IndexerStats] | None = None
                       ) -> tuple[torch.Tensor, list[RouterOutput]]:
        """Final residual streams [B, S, n, d] (float32) and the router outputs of the main layers.

        ``doc_ids`` [B, S] marks packed documents (see ``dsv4.model.documents``); not with a cache. ``stats``
        receives the ``IndexerStats`` of the CSA layers that train their indexer in this forward.
        """
        positions = self._positions(input_ids, cache)
        packing = self._packing(input_ids, doc_ids, cache)
        x = self.embed(input_ids)
        # materialized: the first unit flattens the streams anyway, and products with a stride-0 axis are slow
        streams = upcast(x).unsqueeze(-2).expand(-1, -1, self.config.hc_mult, -1).contiguous()
        routes = []
        for i, layer in enumerate(self.layers):
            streams, route = layer(streams, positions, input_ids,
                                   cache.layers[i] if cache is not None else None, packing, stats)
            routes.append(route)
        if isinstance(cache, DecodeState):
            advance(cache, input_ids.shape[1])
        elif cache is not None:
            cache.seen += input_ids.shape[1]
        return streams, routes

    def logits_from_streams(self, streams: torch.Tensor) -> torch.Tensor:
        dtype = activation_dtype(self.head)
        return upcast(self.head(self.norm(self.hc_head(streams).to(dtype))))

    def forward(self, input_ids: torch.Tensor, cache: ModelCache | None = None,
                doc_ids: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """Float32 logits [B, S, vocab]; with ``last_only`` just the last position's [B, 1, vocab] (prefill)."""
        streams, _ = self.hidden_streams(input_ids, cache, doc_ids)
        if last_only:
            streams = streams[:, -1:]
        return self.logits_from_streams(streams)

    def forward_train(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None) -> ModelOutput:
        """Logits, MTP logits (depth D predicts token t+1+D from position t) and router outputs of one full call."""
        stats: list[IndexerStats] = []
        streams, routes = self.hidden_streams(input_ids, None, doc_ids, stats)
        out = ModelOutput(self.logits_from_streams(streams), routes=routes, streams=streams, indexer_stats=stats)
        if stats:
            out.indexer_kl = sum(st.kl for st in stats)
            recalls = [st.recall for st in stats if st.recall_count]
            out.indexer_recall = sum(recalls) / len(recalls) if recalls else float("nan")
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = streams
        for k, block in enumerate(self.mtp, start=1):
            if input_ids.shape[1] <= k:
                break
            h = h[:, :-1]
            packing = self._packing(input_ids[:, :-k], doc_ids[:, :-k]) if doc_ids is not None else None
            hidden, h, route = block.predict(h, self.embed(input_ids[:, k:]), positions[:-k], None, packing)
            out.mtp_logits.append(upcast(self.head(hidden)))
            out.routes.append(route)
        return out

    # ------------------------------------------------------------------------------------------------ utilities
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def save_pretrained(self, path, **kwargs) -> None:
        from dsv4.weights import save_pretrained

        save_pretrained(self, path, **kwargs)
