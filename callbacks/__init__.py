"""The pruning and sparse-training strategies, as Lightning callbacks: one method per file.

Configs name them ``callbacks.LotteryTicket`` (or by module, ``callbacks.lottery.LotteryTicket``).
The shared machinery is in :mod:`callbacks.base` (options, records, state, testing each level),
:mod:`callbacks.round_based` (train-a-round, prune, rewind) and :mod:`callbacks.iterative` (prune
while training on a window schedule).
"""

from callbacks.base import PruningCallback
from callbacks.iterative import IterativePruning
from callbacks.lottery import LotteryTicket
from callbacks.metagrad import MetaGradientPruning
from callbacks.powerprop import Powerprop
from callbacks.round_based import RoundBasedPruning
from callbacks.taylor import TaylorFilterPruning

__all__ = [
    "IterativePruning",
    "LotteryTicket",
    "MetaGradientPruning",
    "Powerprop",
    "PruningCallback",
    "RoundBasedPruning",
    "TaylorFilterPruning",
]
