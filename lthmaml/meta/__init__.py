"""The learners: LightningModules that adapt per task and meta-update, on the TaskBatch data layer."""

from lthmaml.meta.classifier import Classifier
from lthmaml.meta.cnp import CNP
from lthmaml.meta.maml import MAML
from lthmaml.meta.matching import MatchingNet
from lthmaml.meta.module import NetModule
from lthmaml.meta.protonet import ProtoNet

__all__ = ["CNP", "MAML", "Classifier", "MatchingNet", "NetModule", "ProtoNet"]
