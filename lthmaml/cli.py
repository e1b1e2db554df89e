"""The ``lthmaml`` command: LightningCLI over any LightningModule and DataModule (fit, validate,
test, predict), with the defaults a MAML run needs and one-line errors for bad input."""

from __future__ import annotations

from typing import Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lthmaml.checkpointing import LastCheckpoint
from lthmaml.environment import MachineRecord
from lthmaml.errors import ConfigError, one_line_errors

TRAINER_DEFAULTS = {
    # MAML adapts with gradients inside validation and test: inference mode would forbid it.
    "inference_mode": False,
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "default"},
    },
}


class MetaCLI(LightningCLI):
    """LightningCLI with a configurable best-checkpoint callback (``--checkpoint.*``), a
    ``last.ckpt`` written every epoch (resume with ``--ckpt_path .../last.ckpt``),
    ``--test_after_fit`` to test the best checkpoint when ``fit`` ends, and the machine recorded
    beside the logs (``machine.json``)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_argument(
            "--test_after_fit", type=bool, default=False, help="After fit, test the best checkpoint."
        )
        self.add_threads_argument(parser)

    @staticmethod
    def add_threads_argument(parser: LightningArgumentParser) -> None:
        """``--threads`` (applied before anything is built); a subclass with other options reuses it."""
        parser.add_argument(
            "--threads",
            type=Optional[int],
            default=None,
            help="torch intra-op CPU threads. Small nets (the sinusoid MLP, a Conv4 on two cores) run "
            "fastest on 1; default: torch's own choice.",
        )

    def before_instantiate_classes(self) -> None:
        threads = self.config[self.subcommand].get("threads")
        if threads is not None:
            if threads < 1:
                raise ConfigError(f"--threads must be >= 1, got {threads}")
            torch.set_num_threads(threads)

    def instantiate_trainer(self, **kwargs) -> pl.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks.append(MachineRecord())
        if trainer.checkpoint_callback is not None:  # checkpointing can be switched off
            trainer.callbacks.append(LastCheckpoint())
        return trainer

    def after_fit(self) -> None:
        if self.config[self.subcommand].get("test_after_fit"):
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path="best")


def main(args: Optional[list[str]] = None) -> None:
    with one_line_errors("lthmaml"):
        MetaCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            trainer_defaults=TRAINER_DEFAULTS,
            args=args,
            auto_configure_optimizers=False,
        )


if __name__ == "__main__":
    main()
