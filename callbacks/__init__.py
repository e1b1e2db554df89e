"""The pruning and sparse-training strategies, as Lightning callbacks: one method per file.

Configs name them ``callbacks.LotteryTicket`` (or by module, ``callbacks.lottery.LotteryTicket``).
The shared machinery is in :mod:`callbacks.base` (options, records, state, testing each level),
:mod:`callbacks.round_based` (train-a-round, prune, rewind), :mod:`callbacks.iterative` (prune
while training on a window schedule) and :mod:`callbacks.sparse_training` (sparse from the first
update: static masks, SNIP, SET, RigL, TopKAST).
"""

from callbacks.base import PruningCallback
from callbacks.iterative import IterativePruning
from callbacks.lottery import LotteryTicket
from callbacks.metagrad import MetaGradientPruning
from callbacks.powerprop import Powerprop
from callbacks.rigl import RigL
from callbacks.round_based import RoundBasedPruning
from callbacks.set_sparse import SET
from callbacks.snip import SNIP
from callbacks.sparse_training import SparseTraining
from callbacks.static import StaticSparse
from callbacks.taylor import TaylorFilterPruning
from callbacks.topkast import TopKAST

__all__ = [
    "IterativePruning",
    "LotteryTicket",
    "MetaGradientPruning",
    "Powerprop",
    "PruningCallback",
    "RigL",
    "RoundBasedPruning",
    "SET",
    "SNIP",
    "SparseTraining",
    "StaticSparse",
    "TaylorFilterPruning",
    "TopKAST",
]
