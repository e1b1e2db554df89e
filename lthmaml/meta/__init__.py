"""The learners: LightningModules that adapt per task and meta-update, on the TaskBatch data layer.

The names below load their module on first use (PEP 562): a device adapting a ProtoNet artifact
imports ``lthmaml.meta.protonet``, not MAML's inner loops (``higher``, ``torch.func``).
"""

from lthmaml._lazy import lazy_exports

_HOMES = {
    "CNP": "cnp",
    "MAML": "maml",
    "Classifier": "classifier",
    "MatchingNet": "matching",
    "NetModule": "module",
    "ProtoNet": "protonet",
}
__getattr__, __all__ = lazy_exports(__name__, _HOMES)
