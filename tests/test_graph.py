"""Kipf & Welling's GCN on Zachary's karate club (lthmaml.nets.gcn, lthmaml.data.graph): the
supervised Classifier trains it on node-index batches, and the lottery ticket prunes it as any net."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import assert_checkpoint_zeros, round_folder
from safetensors.torch import load_file

from lthmaml.cli import main
from lthmaml.data import KarateClubDataModule, load_graph
from lthmaml.errors import ConfigError
from lthmaml.meta.classifier import Classifier
from lthmaml.nets import GCN
from lthmaml.nets.gcn import normalized_adjacency

REPO = Path(__file__).resolve().parents[1]


def test_the_karate_club_is_zacharys_graph_with_its_two_clubs():
    graph = load_graph("karate_club", "graph")
    assert graph.adjacency.shape == (34, 34) and torch.equal(graph.adjacency, graph.adjacency.T)
    assert int(graph.adjacency.sum()) == 2 * 78 and float(graph.adjacency.diagonal().abs().sum()) == 0
    assert torch.equal(graph.features, torch.eye(34))
    assert graph.classes == 2 and torch.bincount(graph.labels).tolist() == [17, 17]
    assert int(graph.labels[0]) == 0 and int(graph.labels[33]) == 1  # Mr. Hi and the Officer


def test_the_split_is_per_club_disjoint_and_fixed_by_its_seed():
    def splits(seed: int) -> dict[str, list[int]]:
        data = KarateClubDataModule(train_per_class=4, val_per_class=4, seed=seed)
        data.setup()
        return {split: data.splits[split].tensors[0].tolist() for split in ("train", "val", "test")}

    labels = load_graph("karate_club", "graph").labels
    parts = splits(0)
    assert [len(parts[s]) for s in ("train", "val", "test")] == [8, 8, 18]
    assert sorted(sum(parts.values(), [])) == list(range(34))
    assert torch.bincount(labels[parts["train"]]).tolist() == [4, 4]
    assert torch.bincount(labels[parts["val"]]).tolist() == [4, 4]
    assert splits(0) == parts and splits(1) != parts
    batch = next(iter(_loaded(0).train_dataloader()))
    assert torch.equal(batch[1], labels[batch[0]]) and len(batch[0]) == 8  # one full batch


def _loaded(seed: int) -> KarateClubDataModule:
    data = KarateClubDataModule(seed=seed)
    data.setup()
    return data


def test_normalized_adjacency_is_the_renormalisation_trick():
    path = torch.tensor([[0.0, 1, 0], [1, 0, 1], [0, 1, 0]])  # 0 - 1 - 2: degrees with loops 2, 3, 2
    expected = torch.tensor([[1 / 2, 1 / 6**0.5, 0], [1 / 6**0.5, 1 / 3, 1 / 6**0.5], [0, 1 / 6**0.5, 1 / 2]])
    assert torch.allclose(normalized_adjacency(path), expected)


def test_gcn_returns_the_asked_nodes_logits_of_two_graph_convolutions():
    torch.manual_seed(0)
    net = GCN(hidden_features=5).eval()
    graph = load_graph("karate_club", "graph")
    a = normalized_adjacency(graph.adjacency)
    hidden = torch.relu(a @ graph.features @ net.hidden.weight.T + net.hidden.bias)
    logits = a @ hidden @ net.head.weight.T + net.head.bias
    nodes = torch.tensor([33, 0, 5])
    assert torch.allclose(net(nodes), logits[nodes], atol=1e-6)
    assert not any(key in net.state_dict() for key in ("adjacency", "features"))  # rebuilt from the name


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: GCN(out_features=3), "out_features=3 but the karate_club graph has 2 classes"),
        (lambda: GCN(graph="cora"), r"graph='cora' is not a graph here; choose from \['karate_club'\]"),
        (lambda: GCN(dropout=1.0), "dropout"),
        (lambda: _loaded_split(train=9, val=9), "leaves no test node"),
    ],
)
def test_bad_graph_options_are_one_line_config_errors(build, message):
    with pytest.raises(ConfigError, match=message):
        build()


def _loaded_split(train: int, val: int) -> None:
    KarateClubDataModule(train_per_class=train, val_per_class=val).setup()


def test_the_config_trains_the_gcn_and_the_lottery_prunes_it_with_its_zeros(tmp_path, monkeypatch):
    """``lthmaml fit -c configs/gcn_karate.yaml -c configs/prune/lottery.yaml``, shortened: 3
    rounds of 20% (the output layer 10%), each round 100 full-batch epochs, every level tested."""
    monkeypatch.chdir(tmp_path)
    rounds = 3
    main(
        [
            "fit",
            *("-c", str(REPO / "configs" / "gcn_karate.yaml")),
            *("-c", str(REPO / "configs" / "prune" / "lottery.yaml")),
            *("--trainer.callbacks.init_args.rounds", str(rounds)),
            *("--trainer.callbacks.init_args.epochs_per_round", "100"),
            *("--trainer.callbacks.init_args.test_each_round", "true"),
            *("--trainer.enable_progress_bar", "false"),
        ]
    )
    run = tmp_path / "runs" / "gcn_karate" / "version_0"
    records = [json.loads((round_folder(run, r) / "metrics.json").read_text()) for r in range(rounds + 1)]
    last = records[-1]
    assert last["layers"]["net.hidden"]["sparsity"] == pytest.approx(1 - 0.8**rounds, abs=0.005)
    assert last["layers"]["net.head"]["sparsity"] == pytest.approx(1 - 0.9**rounds, abs=0.04)
    masks = load_file(str(round_folder(run, rounds) / "mask.safetensors"))
    checkpoint = round_folder(run, rounds) / "model.ckpt"
    assert_checkpoint_zeros(checkpoint)
    state = torch.load(checkpoint, weights_only=False)["state_dict"]
    assert torch.equal(state["masks.net.hidden.weight"].bool(), masks["net.hidden.weight"])
    # The dense net and the ticket both tell the clubs of the 18 test members apart (all of them,
    # with this seed; the margin allows two mistakes).
    assert records[0]["test_metrics"]["test/acc"] >= 0.85
    assert last["test_metrics"]["test/acc"] >= 0.85
    # The checkpoint names the graph, not its tensors: it rebuilds the same net.
    model = Classifier.load_from_checkpoint(checkpoint).eval()
    data = _loaded(0)
    nodes, labels = data.splits["test"].tensors
    accuracy = float((model(nodes).argmax(-1) == labels).float().mean())
    assert accuracy == pytest.approx(last["test_metrics"]["test/acc"])
