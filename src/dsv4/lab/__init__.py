"""The claims lab: each finding of the V4 report reproduced at small scale by one command, ``dsv4 lab NAME``.

A lab is a module registered in ``LABS`` (name -> module path; registering a new lab is one line here). The module
defines

- ``TITLE``: a short heading;
- ``SPEC``: the report's sentence it tests, quoted from ``docs/spec.md`` (with its section);
- ``THRESHOLD``: the test, stated before the run: when the claim "holds";
- ``run(options: LabOptions) -> dict``: trains or runs what it needs (tiny sizes and few steps with
  ``options.quick``) and returns its figures as a JSON-able dict that includes ``verdict`` (``HOLDS`` or
  ``DOES_NOT_HOLD``, from ``dsv4.lab.common.verdict``) and ``reason``;

and may define

- ``THREADS``: the torch threads it runs on unless ``--threads`` says otherwise (default: PyTorch's);

- ``plot(result: dict, prefix: Path) -> list[Path]``: draws the result's figures (from the dict alone, so that the
  docs redraw them from a saved result) into PNG files named ``<prefix>-<what>.png``;
- ``figures(result: dict) -> list[tuple[str, object]]``: the (label, value) rows ``docs/claims.md`` shows (default:
  the result's top-level numbers).

``dsv4.lab.common.run_lab(name, options)`` runs one: it adds the lab's name, claim, threshold, command, commit, date
and seconds to the result, draws the plots into ``options.out``, writes ``<out>/<name>.json``, and with
``options.save`` also ``benchmarks/results/lab-<name>-<time>.json``, from which ``dsv4 lab --docs`` writes
``docs/claims.md`` (``dsv4.lab.docs``).
"""

from __future__ import annotations

import importlib
from types import ModuleType

# name -> module; the order is the order of docs/claims.md
LABS: dict[str, str] = {
    "mhc": "dsv4.lab.mhc",
    "muon": "dsv4.lab.muon",
    "routing": "dsv4.lab.routing",
    "mtp": "dsv4.lab.mtp",
    "fp4": "dsv4.lab.fp4",
    "indexer": "dsv4.lab.indexer",
    "distill": "dsv4.lab.distill",
    "million": "dsv4.lab.million",
}


def lab_module(name: str) -> ModuleType:
    """The module of a registered lab; an unknown name is an error that lists the labs."""
    if name not in LABS:
        raise ValueError(f"unknown lab {name!r}; choose one of {', '.join(LABS)}")
    return importlib.import_module(LABS[name])
