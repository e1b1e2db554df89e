"""Files written before this version's format are refused in one line that says so and what to do;
nothing migrates them (no one outside used those formats before the first release)."""

from __future__ import annotations

from pathlib import Path

import lightning
import pytest
import torch

from lthmaml.cli import main
from lthmaml.errors import ConfigError, DataError
from lthmaml.masks import load_masks, masks_of
from lthmaml.meta.maml import MAML
from lthmaml.nets.models import MLP, Conv4

REPO = Path(__file__).resolve().parents[1]
SINUSOID = str(REPO / "configs" / "sinusoid.yaml")
MLP_ARGS = {"in_features": 1, "hidden": [40, 40], "out_features": 1}  # configs/sinusoid.yaml's net
MAML_PATH, MLP_PATH = "lthmaml.meta.maml.MAML", "lthmaml.nets.models.MLP"


def cli_checkpoint(path: Path, module_path: str = MAML_PATH, net_path: str = MLP_PATH) -> Path:
    """A checkpoint as the ``lthmaml`` CLI writes one for configs/sinusoid.yaml, naming its module
    and net by ``module_path`` and ``net_path``."""
    torch.manual_seed(0)
    model = MAML(MLP(**MLP_ARGS), inner_lr=0.01)
    hparams = {
        "_class_path": module_path,
        "net": {"class_path": net_path, "init_args": MLP_ARGS},
        "inner_lr": 0.01,
        "_instantiator": "lightning.pytorch.cli.instantiate_module",
    }
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": hparams}
    torch.save({**checkpoint, "pytorch-lightning_version": lightning.__version__}, path)
    return path


OLD_PATHS = [("lthmaml.maml.MAML", MLP_PATH), (MAML_PATH, "lthmaml.models.MLP")]
"""Where the module and the net lived before the package was split into meta, nets, edge, ..."""


def test_a_checkpoint_of_this_version_loads(tmp_path):
    model = MAML.load_from_checkpoint(cli_checkpoint(tmp_path / "new.ckpt"))
    assert isinstance(model.net, MLP) and model.inner_lr == 0.01


@pytest.mark.parametrize("module_path, net_path", OLD_PATHS)
def test_load_from_checkpoint_refuses_an_old_class_path_in_one_line(tmp_path, module_path, net_path):
    path = cli_checkpoint(tmp_path / "old.ckpt", module_path, net_path)
    old = module_path if module_path != MAML_PATH else net_path
    with pytest.raises(DataError) as error:
        MAML.load_from_checkpoint(path)
    assert str(error.value) == (
        f"{path} predates this version's checkpoint format (it names {old}): train it again with this version"
    )


@pytest.mark.parametrize("subcommand", ["test", "predict", "fit"])
@pytest.mark.parametrize("module_path, net_path", OLD_PATHS)
def test_the_cli_refuses_an_old_class_path_in_one_line_before_any_work(
    in_tmp, capsys, subcommand, module_path, net_path
):
    path = cli_checkpoint(in_tmp / "old.ckpt", module_path, net_path)
    old = module_path if module_path != MAML_PATH else net_path
    with pytest.raises(SystemExit) as exit_info:
        main([subcommand, "-c", SINUSOID, "--ckpt_path", str(path)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"lthmaml: error: --ckpt_path {path} predates this version's checkpoint format (it names {old}): "
        "train it again with this version"
    ]
    assert sorted(p.name for p in in_tmp.iterdir()) == ["old.ckpt"]  # no run folder, no predictions


def test_masks_inside_the_layers_are_refused_in_one_line():
    """Before masks rode beside the net, each prunable layer held a ``mask`` buffer and each
    BatchNorm a ``channel_mask``."""
    model = MAML(Conv4(3, hidden_channels=4, image_size=8, blocks=2))
    state = {key: value for key, value in model.state_dict().items() if not key.startswith("masks.")}
    for name, mask in masks_of(model).items():
        state[name.removesuffix("weight") + "mask"] = mask
    state["net.features.0.1.channel_mask"] = torch.ones(4)
    fresh = MAML(Conv4(3, hidden_channels=4, image_size=8, blocks=2))
    with pytest.raises(ConfigError) as error:
        fresh.load_state_dict(state)
    assert str(error.value) == (
        "this checkpoint predates this version's checkpoint format (masks inside its layers; they now "
        "ride beside the net): train it again with this version"
    )


def test_a_mask_file_keyed_by_layer_name_is_refused_naming_the_key():
    model = MAML(Conv4(3, hidden_channels=4, image_size=8, blocks=2))
    with pytest.raises(ConfigError) as error:
        load_masks(model, {"net.head": torch.ones(3, 4)})
    assert str(error.value) == (
        "mask 'net.head' of shape (3, 4) does not fit MAML: masks are keyed by parameter name "
        "('net.head.weight'); masks keyed by layer name predate this version's format: prune again to "
        "write them"
    )
