"""The pruning and sparse-training strategies, as Lightning callbacks: one method per file.

Configs name them ``callbacks.LotteryTicket`` (or by module, ``callbacks.lottery.LotteryTicket``).
What they share is written once: :mod:`callbacks.base` (options, the best-validation tracker, the
level's record, state, testing each level), :mod:`callbacks.schedule` (levels that end at a length
or a plateau, then prune: the lottery's rounds, pruning while training) and
:mod:`callbacks.sparse_training` (sparse from the first update: static masks, SNIP, SET, RigL,
Top-KAST).
"""

from callbacks.base import PruningCallback
from callbacks.lottery import LotteryTicket
from callbacks.metagrad import MetaGradientPruning
from callbacks.powerprop import Powerprop
from callbacks.rigl import RigL
from callbacks.schedule import LevelSchedule
from callbacks.set_sparse import SET
from callbacks.snip import SNIP
from callbacks.sparse_training import SparseTraining
from callbacks.static import StaticSparse
from callbacks.taylor import TaylorFilterPruning
from callbacks.topkast import TopKAST

__all__ = [
    "LevelSchedule",
    "LotteryTicket",
    "MetaGradientPruning",
    "Powerprop",
    "PruningCallback",
    "RigL",
    "SET",
    "SNIP",
    "SparseTraining",
    "StaticSparse",
    "TaylorFilterPruning",
    "TopKAST",
]
