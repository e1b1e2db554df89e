"""What the LightningModules here share: a net, a configurable optimizer, portable hyperparameters."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping
from typing import Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lthmaml.errors import ConfigError


class NetModule(pl.LightningModule):
    """A LightningModule around ``net`` with the optimizer and scheduler given the LightningCLI way.

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

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler_factory(optimizer)}
