"""lthmaml: MAML in PyTorch Lightning, made sparse by pluggable pruning callbacks, for the edge."""

from lthmaml._moved import install_moved_modules

__version__ = "0.1.0"

install_moved_modules()
