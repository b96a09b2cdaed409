"""The speculative decoding step of a ``DecodeState`` (spec 5: the MTP block drafts, the model checks): every row
takes its last token and the MTP block's draft of the next in one call of the model (``verify``: two tokens a row,
the shape a compiled step needs), then the MTP block reads the streams of those positions with the tokens after them
and drafts again (``draft``). Eager (the reference), or both compiled once for the state's (rows, capacity) with
``torch.compile``, warmed up on the free rows as ``DecodeStep`` is: the step the serving engine's ``--speculative``
and ``speculative_stream(compile=True)`` run. Which tokens to keep, and the rollback of a rejected draft's position
(``DecodeState.mark`` / ``rollback``), stay with the caller: they read values back.
"""

from __future__ import annotations

import torch

from dsv4.model.decode import (DecodeState, capturing, clear_rows, compile_step, direct_or, direct_step,
                               positions_of, unguarded, warm_up)
from dsv4.model.precision import upcast


def mtp_logits(model, streams: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
    """The MTP block on the main model's streams [B, S, n, d] at ``positions`` [S] or [B, S] with the ids after
    each [B, S], its attention through ``cache`` (a one-row cache, or a DecodeState's MTP ring): float32 logits
    [B, S, V] for the token after each next id."""
    hidden, _, _ = model.mtp[0].predict(streams, model.embed(next_ids), positions, cache)
    return upcast(model.head(hidden))


class SpeculativeStep:
    """``verify(tokens [R, 2])`` -> (streams [R, 2, n, d], logits [R, 2, V]); ``draft(streams [R, S, n, d], next
    ids [R, S], positions [R, S])`` -> the MTP block's logits [R, S, V] for the token after each next id. ``state``
    must hold the MTP block's ring (``DecodeState(..., mtp=True)``). ``compile_seconds``: how long compiling both
    and warming them up took (None: eager)."""

    def __init__(self, model, state: DecodeState, compile: bool = False, fullgraph: bool = False):
        if not len(model.mtp):
            raise ValueError("speculative decoding needs the model's MTP block (num_nextn_predict_layers >= 1)")
        if state.mtp is None:
            raise ValueError("a speculative step needs a DecodeState with the MTP block's ring (mtp=True)")
        self.model, self.state = model, state
        self.compile_seconds: float | None = None
        self.direct: dict[str, bool] = {}  # compiled parts called without dynamo (``direct_step``)
        self._verify, self._draft = self.eager_verify, self.eager_draft
        if compile:
            self.compile(fullgraph=fullgraph)

    @property
    def compiled(self) -> bool:
        return self.compile_seconds is not None

    def eager_verify(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        streams, _ = self.model.hidden_streams(tokens, cache=self.state)
        return streams, self.model.logits_from_streams(streams)

    def eager_draft(self, streams: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return mtp_logits(self.model, streams, next_ids, positions, self.state.mtp)

    def verify(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if tokens.shape != (self.state.rows, 2):
            raise ValueError(f"a speculative step takes two tokens per row [{self.state.rows}, 2] (the last token "
                             f"and the draft), got shape {tuple(tokens.shape)}")
        if self.compiled:  # the compiled step checks nothing (a check reads values back): here, as eager does
            self.model._check_ids(tokens)
            positions_of(self.state, 2, self.model.config.max_position_embeddings)
        return self._verify(tokens.to(self.model.device))

    def draft(self, streams: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if next_ids.shape != streams.shape[:2] or positions.shape != streams.shape[:2]:
            raise ValueError(f"draft: next ids {tuple(next_ids.shape)} and positions {tuple(positions.shape)} must "
                             f"match the streams' rows and positions {tuple(streams.shape[:2])}")
        if self.compiled:
            self.model._check_ids(next_ids)
        device = self.model.device
        return self._draft(streams, next_ids.to(device), positions.to(device))

    def compile(self, fullgraph: bool = False) -> bool:
        """Compile and warm up both parts on the state's free rows (cleared after); whether they are compiled. On
        the CPU each part's graph is then called without dynamo where ``direct_step`` shows that safe (``direct``:
        which parts are)."""
        dev = self.model.device
        verify = compile_step(self.eager_verify, dev, fullgraph)
        draft = compile_step(self.eager_draft, dev, fullgraph)
        tokens = torch.zeros(self.state.rows, 2, dtype=torch.long, device=dev)
        warm = {"verify": (tokens,)}
        direct = {}

        def part(name: str, fn, args: tuple):
            with capturing([]) as graphs:
                out = fn(*args)
            if dev.type == "cpu":  # on a GPU the CUDA graphs replay each part (``compile_step``)
                # the rows as before that call (verify: empty; draft: the MTP ring empty, the layers it does not
                # read cleared too): ``direct_step``'s call must return the same tensors
                clear_rows(self.state)
                direct[name] = direct_step(self, graphs, args, out)
            return out

        def run() -> None:
            clear_rows(self.state)
            streams, _ = part("verify", verify, warm["verify"])
            warm["draft"] = (streams, tokens, torch.arange(2, device=dev).expand(self.state.rows, 2).contiguous())
            part("draft", draft, warm["draft"])

        seconds = warm_up(self.state, run, "speculative step")
        if seconds is None:
            return False
        self.compile_seconds = seconds
        self._verify, self._draft = (unguarded(fn) if direct.get(name) is None
                                     else direct_or(direct[name], warm[name], unguarded(fn))
                                     for name, fn in (("verify", verify), ("draft", draft)))
        self.direct = {name: call is not None for name, call in direct.items()}
        return True
