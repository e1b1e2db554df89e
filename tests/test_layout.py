"""The package's shape: arrows one way, no import circle, a device that loads no training code."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def imports(package: str) -> dict[str, set[str]]:
    """Module -> the in-repo modules it imports (``lthmaml.*`` and ``callbacks.*``), lazily or not."""
    graph: dict[str, set[str]] = {}
    for file in (REPO / package).rglob("*.py"):
        module = ".".join(file.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        found = set()
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        graph[module] = {m for m in found if m.split(".")[0] in ("lthmaml", "callbacks")}
    return graph


def test_nothing_in_lthmaml_imports_callbacks_and_reporting_imports_no_training_code():
    graph = imports("lthmaml")
    assert not {m: deps for m, deps in graph.items() if any(d.startswith("callbacks") for d in deps)}
    for module, deps in graph.items():
        if module.startswith("lthmaml.reporting"):
            assert all(d.startswith(("lthmaml.reporting", "lthmaml.errors", "lthmaml.rounds")) for d in deps)


def test_no_import_circle():
    graph = {**imports("lthmaml"), **imports("callbacks")}

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        for dep in graph.get(start, ()):
            if dep == target or (dep not in seen and not seen.add(dep) and reaches(dep, target, seen)):
                return True
        return False

    circles = [m for m in graph if reaches(m, m, set())]
    assert circles == []


def test_the_device_imports_no_meta_training_code():
    """``lthmaml-edge`` loads what adapting an artifact needs: not MAML's inner loops (higher,
    torch.func), the Omniglot reader, the training CLI's callbacks or the reporting code."""
    import subprocess
    import sys

    probe = "import sys, lthmaml.edge.cli, lthmaml.edge.pi; print(' '.join(sorted(sys.modules)))"
    loaded = set(subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.split())  # fmt: skip
    training = {"higher", "lthmaml.meta.maml", "lthmaml.meta.functional", "lthmaml.meta.higher_loop"}
    training |= {"lthmaml.data.omniglot", "lthmaml.data.datamodule", "lthmaml.reporting", "callbacks"}
    training |= {"lthmaml.data.imageset", "lthmaml.data.folders"}  # one's own images: meta-training only
    assert loaded & training == set()
    assert {"lthmaml.edge.finetune", "lthmaml.meta.protonet"} <= loaded  # it did import the device path
