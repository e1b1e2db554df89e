"""The learners: LightningModules that adapt per task and meta-update, on the TaskBatch data layer.

The names below load their module on first use (PEP 562): a device adapting a ProtoNet artifact
imports ``lthmaml.meta.protonet``, not MAML's inner loops (``higher``, ``torch.func``).
"""

from importlib import import_module
from typing import Any

_HOMES = {
    "CNP": "cnp",
    "MAML": "maml",
    "Classifier": "classifier",
    "MatchingNet": "matching",
    "NetModule": "module",
    "ProtoNet": "protonet",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{_HOMES[name]}"), name)
    globals()[name] = value
    return value
