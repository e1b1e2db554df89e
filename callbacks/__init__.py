"""Pruning strategies as Lightning Callbacks, one strategy per module."""
