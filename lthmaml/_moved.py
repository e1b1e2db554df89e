"""Old module paths that configs and checkpoints name, kept importable after the package was split
into rooms (``lthmaml.meta``, ``lthmaml.nets``, ``lthmaml.edge``, ``lthmaml.reporting``).

A checkpoint stores its net and module as ``class_path`` strings (``lthmaml.models.Conv4``), and a
user's YAML names them too: both keep working, with one warning naming the new path to write.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from typing import Any

MOVED: dict[str, tuple[str, ...]] = {
    "lthmaml.maml": ("lthmaml.meta.maml",),
    "lthmaml.module": ("lthmaml.meta.module",),
    "lthmaml.supervised": ("lthmaml.meta.classifier", "lthmaml.data.classification"),
    "lthmaml.layers": ("lthmaml.nets.layers",),
    "lthmaml.models": ("lthmaml.nets.models",),
    "lthmaml.finetune": ("lthmaml.edge.finetune",),
    "lthmaml.export": ("lthmaml.edge.export", "lthmaml.edge.artifact"),
}
"""Old module -> the modules that now hold its names (searched in order)."""


class _MovedModule(types.ModuleType):
    def __init__(self, name: str, targets: tuple[str, ...]) -> None:
        super().__init__(name)
        self._targets = targets

    def __getattr__(self, attribute: str) -> Any:
        for target in self._targets:
            module = importlib.import_module(target)
            if hasattr(module, attribute):
                warnings.warn(
                    f"{self.__name__}.{attribute} is now {target}.{attribute}; "
                    "the old name still loads old configs and checkpoints",
                    FutureWarning,
                    stacklevel=2,
                )
                return getattr(module, attribute)
        raise AttributeError(
            f"module {self.__name__!r} (moved to {', '.join(self._targets)}) has no {attribute!r}"
        )


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None):
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _MovedModule(spec.name, MOVED[spec.name])

    def exec_module(self, module: types.ModuleType) -> None:
        """Nothing to run: names resolve lazily through ``__getattr__``."""


def install_moved_modules() -> None:
    if not any(isinstance(finder, _MovedFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())
