"""A process's start: loading torch and MONAI, which costs a cold ``meddl segment`` most of its time, as cheaply as
it can be done.

The engine's modules import torch and MONAI where they need them; :func:`import_engine` loads them up front, once, for
a process that is about to run a model (the command line's inference commands, the worker's warm-up).
"""

from __future__ import annotations

import gc
import sys

__all__ = ["ENGINE_MODULES", "HELD_BACK_MODULES", "import_engine"]

# What running a packaged model needs: the network classes, the sliding window, and the engine's inference module.
ENGINE_MODULES = ("monai.networks.nets", "monai.inferers", "meddl.infer", "meddl.models")

# What MONAI's package init imports, through its optional imports, for features the engine never calls: scipy.signal
# (signal transforms, ultrasound confidence maps; it brings scipy.stats), scipy.optimize (panoptic quality's matching),
# pandas (CSV datasets, profiling), matplotlib (plots), sklearn (embedding metrics) and requests (TCIA downloads):
# about 0.75 of the 2 s these imports take on 2 cores (medians of four runs, 1.99 -> 1.22 s; docs/brain-model.md, "The
# start without what MONAI loads for features the engine never calls").
HELD_BACK_MODULES = (
    "scipy.signal",
    "scipy.optimize",
    "pandas",
    "matplotlib",
    "sklearn.metrics",
    "sklearn.linear_model",
    "requests",
)


def import_engine() -> None:
    """Import torch, MONAI's networks and inferers and the engine's inference modules; nothing once they are loaded.

    These imports leave some 600,000 objects that the cyclic garbage collector tracks, and they live as long as the
    process. The collector, started every few hundred new objects, walks that growing heap again and again while they
    load: pausing it took these imports from 7.77 to 5.90 s on 2 cores (``benchmarks/segment_speed.py``, best of 5).
    What they left is then frozen out of later collections (:func:`gc.freeze`), so that neither a collection during a
    job nor the interpreter's last ones at exit walk it again.

    MONAI's package init imports every subpackage, and with them :data:`HELD_BACK_MODULES`, which the engine's
    inference never calls. Those not yet loaded are held back while the engine loads: Python reads a ``None`` in
    ``sys.modules`` as a module that is not there, and MONAI's ``optional_import`` then leaves in their place a stand-in
    that raises if called. They are released afterwards, so the engine's own imports of them (plots, ROC curves) load
    them as usual; only MONAI's features built on them (``CSVDataset``, ``matshow3d``, ...) say in this process that
    they are missing. The CLI's inference commands and the worker call this; a library user's process is untouched
    unless it calls it too.
    """
    if all(name in sys.modules for name in ENGINE_MODULES):
        return
    import importlib

    held_back = [name for name in HELD_BACK_MODULES if name not in sys.modules]
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        sys.modules.update(dict.fromkeys(held_back))
        for name in ENGINE_MODULES:
            importlib.import_module(name)
    finally:
        for name in held_back:
            if sys.modules.get(name, False) is None:
                del sys.modules[name]
        gc.freeze()
        if was_enabled:
            gc.enable()
