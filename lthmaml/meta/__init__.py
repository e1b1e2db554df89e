"""The learners: LightningModules that adapt per task and meta-update, on the TaskBatch data layer."""

from lthmaml.meta.classifier import Classifier
from lthmaml.meta.maml import MAML
from lthmaml.meta.module import NetModule

__all__ = ["MAML", "Classifier", "NetModule"]
