"""Learn from corrections without forgetting: durable corrections, model versions, gated updates, audit.

See ``docs/continual.md``. The worker and the CLI call :func:`submit_correction` and :func:`run_update`;
inference calls :func:`resolve_model` so a model home path means "its champion".
"""

from meddl.continual.audit import AuditLog, AuditReport
from meddl.continual.registry import DEFAULT_GATE, ModelHome, is_home, resolve_model
from meddl.continual.store import (
    add_case,
    check_home,
    exclude_correction,
    init_home,
    list_corrections,
    load_correction,
    recover,
    submit_correction,
)
from meddl.continual.update import UpdateOptions, run_update

__all__ = [
    "AuditLog",
    "AuditReport",
    "DEFAULT_GATE",
    "ModelHome",
    "UpdateOptions",
    "add_case",
    "check_home",
    "exclude_correction",
    "init_home",
    "is_home",
    "list_corrections",
    "load_correction",
    "recover",
    "resolve_model",
    "run_update",
    "submit_correction",
]
