"""Shared fixtures: a tiny fake Omniglot written with Pillow, the real data when present, and an
isolated decode cache so tests never touch ``~/.cache``."""

from __future__ import annotations

import io
import os
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch
from PIL import Image

# The tests use tiny tensors: one intra-op thread is far faster than two competing for two cores.
torch.set_num_threads(1)

SHARED_OMNIGLOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"
"""``../shared/data/omniglot`` beside the repository (the 242-class background subset's zips)."""


class FakeOmniglot:
    """Writes ``<alphabet>/<character>/<drawer>.png`` trees and official-style zips of random glyphs.

    Glyphs are black (0) strokes on white (255), like Omniglot's PNGs; each is a pure function of
    its (alphabet, character, drawer, variant), so tests can compute what a loader must return.
    """

    def __init__(self, base: Path, size: int = 12) -> None:
        self.base = base
        self.size = size

    def glyph(self, alphabet: str, character: str, drawer: int, variant: int = 0) -> np.ndarray:
        """``[size, size]`` uint8, about a third of the pixels ink; asymmetric under rotation."""
        seed = zlib.crc32(f"{alphabet}/{character}/{drawer}/{variant}".encode())
        ink = np.random.default_rng(seed).random((self.size, self.size)) < 0.35
        return np.where(ink, 0, 255).astype(np.uint8)

    def png(self, array: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        return buffer.getvalue()

    def files(
        self, classes: Mapping[str, Sequence[str]], drawers: int | Mapping[str, int], variant: int = 0
    ) -> Iterator[tuple[str, bytes]]:
        """``(alphabet/character/NN.png, bytes)``; ``drawers`` may differ per ``alphabet/character``."""
        for alphabet, characters in classes.items():
            for character in characters:
                key = f"{alphabet}/{character}"
                count = drawers if isinstance(drawers, int) else drawers.get(key, max(drawers.values()))
                for drawer in range(count):
                    yield (
                        f"{key}/{drawer + 1:02d}.png",
                        self.png(self.glyph(alphabet, character, drawer, variant)),
                    )

    def folder(
        self,
        classes: Mapping[str, Sequence[str]],
        drawers: int | Mapping[str, int] = 4,
        root: Optional[Path] = None,
        variant: int = 0,
    ) -> Path:
        """The layout as a plain folder tree; returns its root."""
        root = root or self.base / "folder"
        for name, data in self.files(classes, drawers, variant):
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        return root

    def zip(
        self,
        classes: Mapping[str, Sequence[str]],
        drawers: int | Mapping[str, int] = 4,
        root: Optional[Path] = None,
        name: str = "images_background_small1",
        variant: int = 0,
    ) -> Path:
        """``root/<name>.zip`` holding ``<name>/<alphabet>/<character>/*.png`` with folder entries,
        as the official zips do; returns ``root``."""
        root = root or self.base / "zips"
        root.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(root / f"{name}.zip", "w") as archive:
            folders: set[str] = set()
            for member, data in self.files(classes, drawers, variant):
                parts = f"{name}/{member}".split("/")
                for depth in range(1, len(parts)):
                    folder = "/".join(parts[:depth]) + "/"
                    if folder not in folders:
                        folders.add(folder)
                        archive.writestr(folder, b"")
                archive.writestr("/".join(parts), data)
        return root


@pytest.fixture
def fake_omniglot(tmp_path: Path) -> FakeOmniglot:
    return FakeOmniglot(tmp_path)


@pytest.fixture
def lthmaml_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh decode cache (``LTHMAML_CACHE``) and an empty in-memory Omniglot cache."""
    from lthmaml.data.omniglot import clear_memory_cache

    cache = tmp_path / "cache"
    monkeypatch.setenv("LTHMAML_CACHE", str(cache))
    clear_memory_cache()
    yield cache
    clear_memory_cache()


@pytest.fixture(scope="session")
def shared_omniglot() -> Path:
    """The real data (``$LTHMAML_OMNIGLOT`` or ``../shared/data/omniglot``); skips when absent."""
    root = Path(os.environ.get("LTHMAML_OMNIGLOT") or SHARED_OMNIGLOT)
    if not root.is_dir():
        pytest.skip(
            f"no Omniglot data at {root}: set LTHMAML_OMNIGLOT or run `lthmaml-data omniglot --root DIR`"
        )
    return root


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The test runs in its own temporary folder (commands that write ``runs/`` there)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def resolved_config(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> Callable[..., dict]:
    """``lthmaml fit <args> --print_config`` as a dict: what the CLI makes of stacked configs and
    overrides, without data or a fit. A config that does not resolve fails the test."""
    import yaml

    from lthmaml.cli import main

    monkeypatch.setattr("sys.argv", ["lthmaml"])  # pytest's own arguments are not the CLI's

    def resolve(*args: object) -> dict:
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", *map(str, args), "--print_config"])
        assert exit_info.value.code == 0
        return yaml.safe_load(capsys.readouterr().out)

    return resolve


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Commands under test may set torch's threads (pi.yaml asks for 4): back to one after each."""
    yield
    torch.set_num_threads(1)
