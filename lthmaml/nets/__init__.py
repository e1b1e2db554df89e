"""The networks that ship (stock layers), their reparametrisations and structured shrinking."""

from lthmaml.nets.models import MLP, CNPNet, Conv4

__all__ = ["MLP", "CNPNet", "Conv4"]
