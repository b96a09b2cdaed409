"""Training checkpoints: everything needed to resume exactly, written atomically, the last few kept.

A checkpoint is a directory ``step-XXXXXXXX`` holding ``model.safetensors`` (float32 masters, dsv4 names),
``trainer.pt`` (optimizer state, data-loader state, step, RNG states; loaded with ``weights_only=True``) and
``meta.json`` (written last). It is written with ``dsv4.atomic.write_directory_atomically``: into a temporary
sibling, fsynced, and renamed into place, so a process killed at any point leaves the previous checkpoint of that
step or the new one, complete, never a mix. Older ones are pruned only once the new one is in place, each renamed
away before it is deleted (``remove_directory``), so a cut-short pruning leaves no half-deleted ``step-`` directory.
The loaders (``latest_checkpoint``, ``load_checkpoint``) first recover what a killed writer left
(``recover_directory``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from dsv4.atomic import recover_directories, recover_directory, remove_directory, write_directory_atomically

_STEP_DIR = re.compile(r"^step-(\d{8})$")


def list_checkpoints(root: str | Path) -> list[Path]:
    """The complete checkpoints (``step-XXXXXXXX`` with a ``meta.json``) in ``root``, oldest first. Reads only: a
    checkpoint whose rewrite was killed between its two renames is listed after ``recover_checkpoints(root)``."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and (p / "meta.json").exists()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def recover_checkpoints(root: str | Path) -> None:
    """Put back every checkpoint of ``root`` that a killed writer left moved aside, and remove the leftovers of
    killed writers and prunings (``dsv4.atomic.recover_directory``)."""
    recover_directories(root)


def prune_checkpoints(root: str | Path, keep: int, newest: Path | None = None) -> None:
    """Delete all but the last ``keep`` complete checkpoints of ``root`` (none if ``keep <= 0``), never ``newest``
    (the one just written, which may have a lower step than older ones after a resume from an earlier one). Call it
    only once ``newest`` is complete."""
    if keep <= 0:
        return
    for old in list_checkpoints(root)[:-keep]:
        if newest is None or old.name != Path(newest).name:
            remove_directory(old)


def save_checkpoint(root: str | Path, step: int, model: torch.nn.Module, trainer_state: dict, meta: dict,
                    keep: int = 3) -> Path:
    """Write ``root/step-XXXXXXXX`` atomically (replacing one of the same step), then prune to the last ``keep``."""
    from safetensors.torch import save_file

    root = Path(root)
    final = root / f"step-{step:08d}"
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}

    def write(tmp: Path) -> None:
        save_file(state, str(tmp / "model.safetensors"))
        torch.save(trainer_state, tmp / "trainer.pt")
        (tmp / "meta.json").write_text(json.dumps({**meta, "step": step}, indent=2))  # written last: the marker

    write_directory_atomically(final, write)
    prune_checkpoints(root, keep, final)
    return final


def load_checkpoint(path: str | Path, model: torch.nn.Module) -> tuple[dict, dict]:
    """Load weights into ``model``; return (trainer_state, meta). A missing or truncated checkpoint is an error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from dsv4.weights import load_state

    path = Path(path)
    recover_directory(path)
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
    """The newest complete checkpoint of ``root``, after ``recover_checkpoints(root)``."""
    recover_checkpoints(root)
    found = list_checkpoints(root)
    if not found:
        raise FileNotFoundError(f"no checkpoint to resume from in {root}")
    return found[-1]
