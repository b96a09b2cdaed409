"""Training checkpoints: everything needed to resume exactly, written atomically, the last few kept.

A checkpoint is a directory ``step-XXXXXXXX`` holding ``model.safetensors`` (float32 masters, dsv4 names),
``trainer.pt`` (optimizer state, data-loader state, step, RNG states; loaded with ``weights_only=True``) and
``meta.json``. It is written into a temporary sibling and renamed into place, so a crash mid-write never leaves a
half checkpoint, and older ones are pruned only after the new one is complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

_STEP_DIR = re.compile(r"^step-(\d{8})$")


def list_checkpoints(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and (p / "meta.json").exists()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def save_checkpoint(root: str | Path, step: int, model: torch.nn.Module, trainer_state: dict, meta: dict,
                    keep: int = 3) -> Path:
    from safetensors.torch import save_file

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-step-", dir=root))
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        torch.save(trainer_state, tmp / "trainer.pt")
        (tmp / "meta.json").write_text(json.dumps({**meta, "step": step}, indent=2))  # written last: the marker
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path, model: torch.nn.Module) -> tuple[dict, dict]:
    """Load weights into ``model``; return (trainer_state, meta). A missing or truncated checkpoint is an error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from dsv4.checkpoint import load_state

    path = Path(path)
    for name in ("meta.json", "model.safetensors", "trainer.pt"):
        if not (path / name).exists():
            raise FileNotFoundError(f"checkpoint {path} is incomplete: {name} is missing")
    try:
        meta = json.loads((path / "meta.json").read_text())
        state = load_file(str(path / "model.safetensors"))
        trainer_state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    except (SafetensorError, json.JSONDecodeError, RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"checkpoint {path} is corrupt or truncated: {e}") from None
    load_state(model, state)
    return trainer_state, meta


def latest_checkpoint(root: str | Path) -> Path:
    found = list_checkpoints(root)
    if not found:
        raise FileNotFoundError(f"no checkpoint to resume from in {root}")
    return found[-1]
