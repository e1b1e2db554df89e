"""bench/learners.py: the artifacts it times are the learners' own, pruned where it says, the
adaptation it times is the device's, and the table and speed-ups are the rows' numbers."""

from __future__ import annotations

import pytest
import torch

from bench.learners import (
    LEARNERS,
    SPARSITY,
    adapt_once,
    artifacts_from_configs,
    measure_adaptation,
    speedups,
    table,
    ways_of,
)
from lthmaml import sparsity
from lthmaml.edge.artifact import load_artifact
from lthmaml.edge.finetune import FineTuneModule


def test_each_learner_is_named_by_its_learner_and_ways_and_its_config_exists():
    from bench.learners import REPO

    for name, (config, overrides) in LEARNERS.items():
        assert (REPO / config).is_file(), name
        assert ways_of(name) in (5, 20) and len(overrides) % 2 == 0


def test_artifacts_hold_the_learner_and_the_pruned_ones_are_80_percent_sparse_and_smaller(tmp_path):
    paths = artifacts_from_configs(["protonet-5way", "maml-5way"], tmp_path)
    for name, learner in (("protonet-5way", "protonet"), ("maml-5way", "maml")):
        dense, pruned = (load_artifact(paths[(name, f)]) for f in (0.0, SPARSITY))
        assert (dense.metadata.learner, pruned.metadata.learner) == (learner, learner)
        assert dense.metadata.sparsity == 0.0
        assert pruned.metadata.sparsity == pytest.approx(SPARSITY, abs=0.01)
        assert paths[(name, SPARSITY)].stat().st_size < 0.4 * paths[(name, 0.0)].stat().st_size


def test_maml_adaptation_takes_its_evaluation_steps_and_keeps_pruned_weights_zero(tmp_path):
    path = artifacts_from_configs(["maml-5way"], tmp_path)[("maml-5way", SPARSITY)]
    artifact = FineTuneModule(artifact=str(path))
    before = {name: p.detach().clone() for name, p in artifact.net.named_parameters()}
    x, y = torch.rand(5, 1, 28, 28), torch.arange(5)
    adapt_once(artifact, x, y)
    masks = sparsity.masks_of(artifact.net)
    moved = [name for name, p in artifact.net.named_parameters() if not torch.equal(p, before[name])]
    assert moved  # it took gradient steps
    assert any(bool((mask == 0).any()) for mask in masks.values())  # the artifact is pruned
    for name, mask in masks.items():
        assert torch.all(sparsity.weight(artifact.net, name)[mask == 0] == 0), name


def test_protonet_adaptation_keeps_the_prototypes_and_changes_no_weight(tmp_path):
    path = artifacts_from_configs(["protonet-5way"], tmp_path)[("protonet-5way", 0.0)]
    artifact = load_artifact(path)
    before = {name: t.clone() for name, t in artifact.net.state_dict().items()}
    measured = measure_adaptation(path, ways=5, repeats=2)
    assert measured["learner"] == "protonet" and measured["ways"] == 5 and measured["adapt_ms"] > 0
    x, y = torch.rand(5, 1, 28, 28), torch.arange(5)
    from lthmaml.edge.amortized import SupportAdapter

    adapter = SupportAdapter.for_task(artifact.metadata, y, "test")
    adapter.adapt(artifact.net, x, y)
    assert adapter.context.shape[0] == 5  # one prototype per class
    assert all(torch.equal(artifact.net.state_dict()[n], t) for n, t in before.items())


def row(name: str, pruned: float, ms: float) -> dict:
    return {
        "name": name,
        "pruned": pruned,
        "adapt_ms": ms,
        "peak_rss_mib": 400.0,
        "adapt_rss_mib": 20.0,
        "artifact_bytes": 2048,
    }


def accuracy(mean: float, ci95: float) -> dict:
    return {"test_acc": mean, "test_acc_ci95": ci95}


def test_the_table_and_speedups_are_the_rows_numbers():
    adapt = [row("maml-20way", 0.0, 500.0), row("protonet-20way", 0.0, 10.0)]
    train = [
        {
            "name": "protonet-20way",
            "rounds": [
                {"sparsity": 0.0, "updates": 900, "train_minutes": 19.5, **accuracy(0.951, 0.004)},
                {"sparsity": 0.8, "updates": 900, "train_minutes": 19.0, **accuracy(0.94, 0.005)},
            ],
        }
    ]
    lines = table(adapt, train).splitlines()
    assert "| protonet | 20 | 0% | 95.1 ± 0.4 | 19.5 (900) | 10.0 | 400 (20.0) | 2 |" in lines
    assert "| protonet | 20 | 80% | 94.0 ± 0.5 | 19.0 (900) |  |  |  |" in lines
    assert "| maml | 20 | 0% |  |  | 500.0 | 400 (20.0) | 2 |" in lines
    assert speedups(adapt) == ["protonet 20way at 0%: 10.0 ms, 50x less than MAML's 500.0 ms"]


def test_a_round_is_the_whole_epochs_nearest_the_calibrated_updates():
    from bench.learners import epochs_for

    # 451 updates of 250-update epochs: 2 epochs, so the round ends on its second validation
    # (a 451-step round kept the validation at 250 and dropped 201 updates)
    assert [epochs_for(u, 250) for u in (451, 374, 376, 10)] == [2, 1, 2, 1]
    assert epochs_for(2727, 200) == 14


def test_a_bad_rewind_point_or_round_length_fails_before_training(capsys):
    from bench.learners import main, rewind_point

    assert [rewind_point(point) for point in ("init", "none", "250")] == ["init", "none", "250"]
    for bad in ("0", "-5", "early", "2.5"):
        with pytest.raises(SystemExit) as stop:
            main(["--part", "train", "--rewind-to", bad, "--out", "/nonexistent/never-made"])
        assert stop.value.code == 2
        expected = f"--rewind-to: expected init, none or a number of meta-updates > 0, got {bad!r}"
        assert expected in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        main(["--part", "train", "--epochs", "0", "--out", "/nonexistent/never-made"])
    assert stop.value.code == 2
    assert "--epochs: expected a number of epochs > 0, got '0'" in capsys.readouterr().err
