"""Kipf & Welling's graph convolutional network (2017), of stock layers: the lottery-ticket
project's graph net, here to show that the strategies prune more than image nets.

A layer is ``H' = act(A_hat H W + b)`` with ``A_hat = D^-1/2 (A + I) D^-1/2``: the features of
each node averaged with its neighbours' (the renormalisation keeps repeated products stable), then
an ``nn.Linear``. The graph (its normalised adjacency and node features) is held as buffers, so an
example is a node index and the forward pass returns logits for the nodes asked for: the supervised
Classifier and every strategy treat it as any net, and prune the two Linear weights.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lthmaml.errors import ConfigError


def normalized_adjacency(adjacency: Tensor) -> Tensor:
    """``D^-1/2 (A + I) D^-1/2`` of a ``[nodes, nodes]`` adjacency (the renormalisation trick: every
    node its own neighbour, every product scaled by both ends' degrees)."""
    looped = adjacency + torch.eye(len(adjacency), dtype=adjacency.dtype)
    scale = looped.sum(1).rsqrt()
    return scale[:, None] * looped * scale[None, :]


class GCN(nn.Module):
    """Two graph convolutions (ReLU and dropout between) over a named graph's nodes.

    Args:
        out_features: classes (the graph's: the karate club has 2).
        graph: the graph, by name (:data:`lthmaml.data.graph.GRAPHS`); rebuilt from the name when a
            checkpoint is loaded, so checkpoints hold only the weights.
        hidden_features: width of the first layer (16 in Kipf & Welling).
        dropout: dropout probability on the input features and the hidden layer (0.5 in the paper).
    """

    def __init__(
        self,
        out_features: int = 2,
        graph: str = "karate_club",
        hidden_features: int = 16,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        from lthmaml.data.graph import load_graph  # the one place graphs are read (networkx)

        option = "model.init_args.net.init_args"
        loaded = load_graph(graph, f"{option}.graph")
        if out_features != loaded.classes:
            raise ConfigError(
                f"{option}.out_features={out_features} but the {graph} graph has {loaded.classes} classes: "
                "set them equal"
            )
        if hidden_features < 1 or not 0.0 <= dropout < 1.0:
            raise ConfigError(
                f"{option}.hidden_features must be >= 1 and dropout in [0, 1), got {hidden_features} "
                f"and {dropout}"
            )
        self.out_features = out_features
        self.architecture = {
            "out_features": out_features,
            "graph": graph,
            "hidden_features": hidden_features,
            "dropout": dropout,
        }
        self.register_buffer("adjacency", normalized_adjacency(loaded.adjacency), persistent=False)
        self.register_buffer("features", loaded.features, persistent=False)
        self.hidden = nn.Linear(loaded.features.shape[1], hidden_features)
        self.head = nn.Linear(hidden_features, out_features)
        self.dropout = nn.Dropout(dropout)

    def forward(self, nodes: Tensor) -> Tensor:
        """Logits ``[len(nodes), out_features]`` of the nodes indexed by ``nodes`` (a LongTensor);
        every node is computed, as a graph convolution needs its neighbours."""
        h = torch.relu(self.hidden(self.adjacency @ self.dropout(self.features)))
        return self.head(self.adjacency @ self.dropout(h))[nodes]
