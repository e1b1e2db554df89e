"""Node classification on a graph: the setting of the lottery-ticket project's GCN (Kipf & Welling
2017, semi-supervised: a few labelled nodes, the graph's edges carry the labels to the rest).

The graph here is Zachary's karate club (34 members, 78 friendships; the label is the club each
member joined when it split in two), which ships inside networkx, a dependency of torch: Cora, the
lottery-ticket papers' graph, cannot be downloaded on every machine this runs on, and the club
shows as well that the strategies prune more than image nets. networkx is imported only when a
graph is built.

An example is a node index (a LongTensor); the net holds the graph (:class:`lthmaml.nets.GCN`)
and returns the logits of the nodes it is given, so the supervised
:class:`~lthmaml.meta.classifier.Classifier` trains it on ``(nodes, labels)`` batches unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lthmaml.errors import ConfigError


@dataclass(frozen=True)
class Graph:
    """A graph's ``[nodes, nodes]`` 0/1 symmetric adjacency (no self-loops), its ``[nodes, features]``
    node features and ``[nodes]`` class labels ``0 .. classes - 1``."""

    adjacency: Tensor
    features: Tensor
    labels: Tensor

    @property
    def classes(self) -> int:
        return int(self.labels.max()) + 1


def karate_club() -> Graph:
    """Zachary's karate club: an unweighted friendship graph, identity features (a node is known
    only by its edges, as in Kipf & Welling's featureless experiments), label 0 for the members of
    Mr. Hi's club, 1 for the Officer's."""
    import networkx

    graph = networkx.karate_club_graph()
    nodes = sorted(graph.nodes)
    adjacency = torch.as_tensor(
        networkx.to_numpy_array(graph, nodelist=nodes, weight=None), dtype=torch.float32
    )
    clubs = networkx.get_node_attributes(graph, "club")
    labels = torch.tensor([0 if clubs[node] == "Mr. Hi" else 1 for node in nodes])
    return Graph(adjacency, torch.eye(len(nodes)), labels)


GRAPHS: dict[str, Callable[[], Graph]] = {"karate_club": karate_club}
"""The graphs a config can name."""


def load_graph(name: str, option: str) -> Graph:
    """The graph called ``name``; an unknown name is a ConfigError naming ``option``."""
    if name not in GRAPHS:
        raise ConfigError(f"{option}={name!r} is not a graph here; choose from {sorted(GRAPHS)}")
    return GRAPHS[name]()


class KarateClubDataModule(pl.LightningDataModule):
    """The karate club's nodes as (node index, club) examples, split per club by a seed.

    Kipf & Welling's semi-supervised setting: a few labelled nodes of each class train, a few
    validate, and every other node is a test node. Each split is one batch (full-batch training,
    as the paper: a GCN's forward pass computes every node anyway).

    Args:
        train_per_class: labelled training nodes of each club (Kipf & Welling's citation graphs:
            20; the club has 17 members in each, so 4).
        val_per_class: validation nodes of each club; the rest of the 34 are the test nodes.
        seed: the split's seed.
    """

    graph = "karate_club"

    def __init__(self, train_per_class: int = 4, val_per_class: int = 4, seed: int = 0) -> None:
        super().__init__()
        if train_per_class < 1 or val_per_class < 1:
            raise ConfigError(
                "data.init_args.train_per_class and val_per_class must be >= 1 node each, got "
                f"{train_per_class} and {val_per_class}"
            )
        self.train_per_class, self.val_per_class, self.seed = train_per_class, val_per_class, seed
        self.splits: dict[str, TensorDataset] = {}

    def setup(self, stage: Optional[str] = None) -> None:
        if self.splits:
            return
        labels = load_graph(self.graph, "KarateClubDataModule.graph").labels
        generator = torch.Generator().manual_seed(self.seed)
        parts: dict[str, list[Tensor]] = {"train": [], "val": [], "test": []}
        for label in range(int(labels.max()) + 1):
            members = torch.nonzero(labels == label).flatten()
            if len(members) <= self.train_per_class + self.val_per_class:
                raise ConfigError(
                    f"data.init_args.train_per_class + val_per_class = "
                    f"{self.train_per_class + self.val_per_class} leaves no test node of a club of "
                    f"{len(members)}: lower them"
                )
            members = members[torch.randperm(len(members), generator=generator)]
            ends = (self.train_per_class, self.train_per_class + self.val_per_class, len(members))
            parts["train"].append(members[: ends[0]])
            parts["val"].append(members[ends[0] : ends[1]])
            parts["test"].append(members[ends[1] :])
        for split, pieces in parts.items():
            nodes = torch.cat(pieces).sort().values
            self.splits[split] = TensorDataset(nodes, labels[nodes])

    def _loader(self, split: str) -> DataLoader:
        dataset = self.splits[split]
        return DataLoader(dataset, batch_size=max(1, len(dataset)))

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
