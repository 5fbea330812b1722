"""Test harness, not part of the package: hold a training at a checkpoint until the test sends its signal.

A test that interrupts a training must not race it: a poll against the clock loses on a faster machine (the
training ends first) or a slower one. With this folder first on PYTHONPATH and HOLD_MARKER set (see
`fault_helpers.hold_env`), Python imports this file at start-up, as it does any `sitecustomize`. In a process that
imports `image_classifier.train_state` (a stage under `dvc repro`, `tune`) it then

- makes training write its resumable checkpoint after every epoch (CHECKPOINT_SECONDS = 0), so the epoch held
  at does not depend on the machine's speed, and
- after the first checkpoint whose file name matches HOLD_CHECKPOINT (a glob; default `*`) and whose epoch is at
  least HOLD_EPOCH (default 1), creates HOLD_MARKER (its text: that epoch) and sleeps until a signal ends the
  process or the test deletes the marker (then the training goes on), or HOLD_SECONDS pass (600 by default, so
  that a broken test cannot hang for ever).

The test waits for the marker, then signals (or does what must happen while the training runs, and releases it):
the signal lands at the point the test chose, every time.
"""

import fnmatch
import importlib.abc
import importlib.machinery
import os
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

TARGET = "image_classifier.train_state"


def _patch(module: ModuleType) -> None:
    """Checkpoint every epoch, and hold after the chosen checkpoint."""
    for name in ("CHECKPOINT_SECONDS", "save_tensors"):
        if not hasattr(module, name):  # the training core moved: fail loudly, not by a test timing out
            raise RuntimeError(f"tests/hold/sitecustomize.py: {TARGET} has no {name}; update the harness")
    marker = Path(os.environ["HOLD_MARKER"])
    pattern = os.environ.get("HOLD_CHECKPOINT", "*")
    epoch = int(os.environ.get("HOLD_EPOCH", "1"))
    seconds = float(os.environ.get("HOLD_SECONDS", "600"))
    save, held = module.save_tensors, []

    def save_then_hold(obj: Any, path: Path) -> None:
        save(obj, path)
        if held or not fnmatch.fnmatch(Path(path).name, pattern) or obj["epoch"] < epoch:
            return
        held.append(obj["epoch"])  # once per process: a released training does not hold again
        temp = marker.with_name(f".{marker.name}.tmp")
        temp.write_text(str(obj["epoch"]))
        temp.replace(marker)  # whole or absent: the test may read it the moment it appears
        end = time.monotonic() + seconds
        while (
            marker.exists() and time.monotonic() < end
        ):  # a signal interrupts the sleep, unwinding the training
            time.sleep(0.1)

    module.CHECKPOINT_SECONDS = 0.0
    module.save_tensors = save_then_hold


class _Finder(importlib.abc.MetaPathFinder):
    """Finds the training module with the other finders and patches it right after it executes."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        execute = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            execute(module)
            _patch(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


if os.environ.get("HOLD_MARKER"):
    sys.meta_path.insert(0, _Finder())
