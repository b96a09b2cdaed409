"""Sequence length in stages (spec 6.2: 4K -> 16K -> 64K -> 1M; on a laptop e.g. 512 -> 2,048 -> 8,192).

``StagedLoader`` serves one batch per training step from the loader of the current stage and switches to a longer
sequence length at the configured steps; the learning-rate schedule, a function of the step, runs on across stages.
Its state (stage, batches served, the inner loader's cursor) goes into the checkpoint, so a resumed run continues in
the right stage at the right batch.
"""

from __future__ import annotations

from collections.abc import Callable


def parse_stages(text: str) -> list[tuple[int, int]]:
    """'512,2048@300,8192@600' -> [(0, 512), (300, 2048), (600, 8192)]: sequence length @ first step."""
    stages = []
    for i, part in enumerate(p.strip() for p in text.split(",") if p.strip()):
        length, _, start = part.partition("@")
        try:
            stages.append((int(start) if start else 0, int(length)))
        except ValueError:
            raise ValueError(f"sequence-length stage {part!r} is not LENGTH or LENGTH@STEP") from None
    validate_stages(stages)
    return stages


def validate_stages(stages: list[tuple[int, int]]) -> None:
    if not stages or stages[0][0] != 0:
        raise ValueError(f"the first sequence-length stage must start at step 0, got {stages}")
    for (a, la), (b, lb) in zip(stages, stages[1:]):
        if b <= a:
            raise ValueError(f"sequence-length stages must start at increasing steps, got {stages}")
    if any(length < 2 for _, length in stages):
        raise ValueError(f"sequence lengths must be >= 2, got {stages}")


class StagedLoader:
    """``make_loader(seq_len, rank=0, world=1)`` builds the loader of a stage (for this rank of a data-parallel run
    once ``set_rank`` has been called)."""

    def __init__(self, make_loader: Callable[..., object], stages: list[tuple[int, int]]):
        validate_stages(stages)
        self.make_loader = make_loader
        self.stages = list(stages)
        self.served = 0
        self.stage = 0
        self.rank, self.world = 0, 1
        self.loader = make_loader(self.stages[0][1])

    def set_rank(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world
        state = self.loader.state_dict()
        self.loader = self._make(self.seq_len)
        self.loader.load_state_dict(state)

    def _make(self, seq_len: int):
        if self.world == 1:
            return self.make_loader(seq_len)
        return self.make_loader(seq_len, rank=self.rank, world=self.world)

    @property
    def seq_len(self) -> int:
        return self.stages[self.stage][1]

    def _stage_at(self, step: int) -> int:
        return max(i for i, (start, _) in enumerate(self.stages) if start <= step)

    def __iter__(self):
        return self

    def __next__(self):
        stage = self._stage_at(self.served)
        if stage != self.stage:
            self.stage = stage
            self.loader = self._make(self.seq_len)
        self.served += 1
        return next(self.loader)

    def state_dict(self) -> dict:
        return {"served": self.served, "stage": self.stage, "seq_len": self.seq_len,
                "stages": [list(s) for s in self.stages], "loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if [tuple(s) for s in state["stages"]] != self.stages:
            raise ValueError(f"the checkpoint was trained with stages {state['stages']}, not {self.stages}")
        self.served = int(state["served"])
        self.stage = int(state["stage"])
        self.loader = self._make(self.seq_len)
        self.loader.load_state_dict(state["loader"])
