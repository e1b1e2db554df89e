"""What the LightningModules here share: a net, its masks beside it, a configurable optimizer,
portable hyperparameters."""

from __future__ import annotations

import importlib
import inspect
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lthmaml.errors import ConfigError, DataError, checked_values
from lthmaml.masks import MaskSet, apply_masks, gradient_masks, load_masks, mask_gradients, masks_within
from lthmaml.nets.reparam import ORIGINAL, checkpoint_alpha, install_power, reparametrized_layers


def missing_class(hparams: Any) -> Optional[str]:
    """The first ``lthmaml.*`` class path in a checkpoint's hyperparameters (the net's, the module's
    ``_class_path``, at any depth) that this lthmaml does not have: the checkpoint was written
    before that class reached the module it lives in now, and cannot be rebuilt."""
    if isinstance(hparams, Mapping):
        for key, value in hparams.items():
            if key in ("class_path", "_class_path") and isinstance(value, str) and not _resolves(value):
                return value
        values = hparams.values()
    elif isinstance(hparams, (list, tuple)):
        values = hparams
    else:
        return None
    return next((found for found in map(missing_class, values) if found is not None), None)


def _resolves(class_path: str) -> bool:
    """False only for an ``lthmaml.*`` path whose module or name is gone; a missing third-party
    package, or a class outside lthmaml, is left for the loader to report."""
    module, _, name = class_path.rpartition(".")
    if not module.startswith("lthmaml.") and module != "lthmaml":
        return True
    try:
        return hasattr(importlib.import_module(module), name)
    except ModuleNotFoundError as error:
        return not (error.name and (module == error.name or module.startswith(f"{error.name}.")))


def _saved_hparams(checkpoint_path: Any) -> Any:
    """A checkpoint file's hyperparameters, or None where it cannot be read as plain tensors and types."""
    if not isinstance(checkpoint_path, (str, os.PathLike)) or not Path(checkpoint_path).is_file():
        return None
    try:
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    return checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None


def predates_format(where: str, detail: str) -> str:
    """The one line that refuses a checkpoint written before this version's format."""
    return f"{where} predates this version's checkpoint format ({detail}): train it again with this version"


class NetModule(pl.LightningModule):
    """A LightningModule around ``net`` with the optimizer and scheduler given the LightningCLI way.

    ``net`` is any ``nn.Module``; it keeps the layers it was built with. Its masks are kept beside
    it in ``masks`` (:class:`~lthmaml.masks.MaskSet`, empty until a strategy prunes), which
    ride in every checkpoint; the module enforces them whatever strategy set them: the gradient
    of a pruned entry is zeroed before each optimizer step, and the entry and its optimizer state
    after it.

    Under LightningCLI the given config (``net`` as class_path/init_args) is saved as
    hyperparameters, so ``load_from_checkpoint`` rebuilds the net; outside it the module objects
    are left out instead of being pickled into the checkpoint.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.masks = MaskSet()
        adopted = masks_within(net)  # a net pruned before it was handed over
        if adopted:
            del net.masks
            load_masks(self, {f"net.{name}": mask for name, mask in adopted.items()})
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler

    def save_portable_hyperparameters(self) -> None:
        """``save_hyperparameters()`` for the subclass ``__init__`` that calls it, keeping the net,
        optimizer and scheduler only as configs (what LightningCLI gives), never as pickled objects."""
        with warnings.catch_warnings():  # the module objects are dropped just below, as it advises
            warnings.filterwarnings("ignore", r"Attribute '\w+' is an instance of `nn.Module`")
            self.save_hyperparameters(frame=inspect.currentframe().f_back)
        objects = ("net", "optimizer", "lr_scheduler")
        self.remove_ignored_hparams(
            [
                name
                for name in objects
                if self.hparams.get(name) is not None and not isinstance(self.hparams[name], Mapping)
            ]
        )

    def check_data_fits(self, datamodule: object) -> None:
        """The net's output width and input size match the data's ``ways`` (and ``train_ways``: a
        head is as wide as every episode) and ``image_size`` where both are known: a ConfigError
        naming the two options, not a shape error in torch."""
        pairs = (("out_features", "ways"), ("out_features", "train_ways"), ("image_size", "image_size"))
        for net_option, data_option in pairs:
            built = getattr(self.net, net_option, None)
            given = getattr(datamodule, data_option, None)
            if built is not None and given is not None and built != given:
                raise ConfigError(
                    f"model.init_args.net.init_args.{net_option}={built} but "
                    f"data.init_args.{data_option}={given}: set them equal"
                )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        """Lightning's, but a checkpoint that names a class this lthmaml does not have is one line
        saying it predates the format, where Lightning and jsonargparse raise their own errors."""
        try:
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
        except Exception:
            stale = missing_class(_saved_hparams(checkpoint_path))
            if stale is None:
                raise
            raise DataError(predates_format(str(checkpoint_path), f"it names {stale}")) from None

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A Powerprop checkpoint's transform, installed before its ``phi`` are loaded."""
        alpha = checkpoint_alpha(checkpoint)
        if alpha is not None:
            install_power(self, alpha, reparametrized_layers(checkpoint.get("state_dict") or {}))

    def load_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True, assign: bool = False):
        """As ``nn.Module``'s, and a plain weight given for a reparametrised layer (a fit with
        Powerprop started from a checkpoint without it) is stored through the transform."""
        state = dict(state_dict)
        own = self.state_dict(keep_vars=True)
        if any(key.endswith((".mask", ".channel_mask")) and key not in own for key in state):
            raise ConfigError(
                predates_format("this checkpoint", "masks inside its layers; they now ride beside the net")
            )
        plain = {
            key: state.pop(key)
            for key in list(state)
            if key not in own and key.endswith(".weight") and key[: -len("weight")] + ORIGINAL[1:] in own
        }
        for key in plain:
            state[key[: -len("weight")] + ORIGINAL[1:]] = own[key[: -len("weight")] + ORIGINAL[1:]]
        result = super().load_state_dict(state, strict=strict, assign=assign)
        with torch.no_grad():
            for key, value in plain.items():
                path, _, attribute = key.rpartition(".")
                setattr(self.get_submodule(path), attribute, value)
        apply_masks(self)  # the masks loaded hold wherever the weights came from
        return result

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        mask_gradients(self)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        apply_masks(self, self.trainer.optimizers)

    def net_masks(self) -> dict[str, Tensor]:
        """The masks that keep ``net``'s pruned entries zero, by ``net``'s own parameter names: what
        an inner loop multiplies its steps by."""
        return gradient_masks(self, self.net)

    def configure_optimizers(self):
        with checked_values("model.init_args.optimizer"):  # torch checks lr and the rest only here
            optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        with checked_values("model.init_args.lr_scheduler"):
            scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}
