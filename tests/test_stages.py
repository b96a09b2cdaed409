"""Sequence-length stages: switching steps, resuming inside a stage, bad stage lists."""

import pytest

from dsv4.train.stages import StagedLoader, parse_stages


class Counter:
    def __init__(self, seq_len):
        self.seq_len, self.pos = seq_len, 0

    def __next__(self):
        self.pos += 1
        return (self.seq_len, self.pos)

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, s):
        self.pos = s["pos"]


def test_stages_switch_and_resume():
    stages = parse_stages("8,16@3,32@5")
    assert stages == [(0, 8), (3, 16), (5, 32)]
    loader = StagedLoader(Counter, stages)
    seen = [next(loader) for _ in range(7)]
    assert seen == [(8, 1), (8, 2), (8, 3), (16, 1), (16, 2), (32, 1), (32, 2)]
    first = StagedLoader(Counter, stages)
    for _ in range(4):
        next(first)
    resumed = StagedLoader(Counter, stages)
    resumed.load_state_dict(first.state_dict())
    assert [next(resumed) for _ in range(3)] == seen[4:]
    with pytest.raises(ValueError, match="stages"):
        StagedLoader(Counter, [(0, 8)]).load_state_dict(first.state_dict())


@pytest.mark.parametrize("bad", ["16@2", "8,16@3,32@3", "x", "8,1@4"])
def test_bad_stages(bad):
    with pytest.raises(ValueError):
        parse_stages(bad)
