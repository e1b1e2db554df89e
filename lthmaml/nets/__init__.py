"""The networks that ship (stock layers), their reparametrisations and structured shrinking."""

from lthmaml.nets.gcn import GCN
from lthmaml.nets.models import MLP, CNPNet, Conv4
from lthmaml.nets.resnet import ResNet12, ResNet18

__all__ = ["GCN", "MLP", "CNPNet", "Conv4", "ResNet12", "ResNet18"]
