"""A process's start: loading torch and MONAI, which costs a cold ``meddl segment`` most of its time, as cheaply as
it can be done.

The engine's modules import torch and MONAI where they need them; :func:`import_engine` loads them up front, once, for
a process that is about to run a model (the command line's inference commands, the worker's warm-up).
"""

from __future__ import annotations

import gc
import sys

__all__ = ["import_engine"]

# What running a packaged model needs: the network classes, the sliding window, and the engine's inference module.
ENGINE_MODULES = ("monai.networks.nets", "monai.inferers", "meddl.infer", "meddl.models")


def import_engine() -> None:
    """Import torch, MONAI's networks and inferers and the engine's inference modules; nothing once they are loaded.

    These imports leave some 600,000 objects that the cyclic garbage collector tracks, and they live as long as the
    process. The collector, started every few hundred new objects, walks that growing heap again and again while they
    load: pausing it took these imports from 7.77 to 5.90 s on 2 cores (``benchmarks/segment_speed.py``, best of 5).
    What they left is then frozen out of later collections (:func:`gc.freeze`), so that neither a collection during a
    job nor the interpreter's last ones at exit walk it again.
    """
    if all(name in sys.modules for name in ENGINE_MODULES):
        return
    import importlib

    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for name in ENGINE_MODULES:
            importlib.import_module(name)
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()
