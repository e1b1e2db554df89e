"""lthmaml: MAML in PyTorch Lightning, made sparse by pluggable pruning callbacks, for the edge."""

__version__ = "0.1.0"
