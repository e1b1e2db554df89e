"""The ``lthmaml`` command: LightningCLI over any LightningModule and DataModule (fit, validate,
test, predict), with the defaults a MAML run needs and one-line errors for bad input."""

from __future__ import annotations

import json
import logging
import re
import warnings
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info

from lthmaml.checkpointing import LastCheckpoint
from lthmaml.environment import FailedRunMarker, MachineRecord, release_process_group
from lthmaml.errors import ConfigError, DataError, one_line_errors
from lthmaml.progress import EpochProgress

TRAINER_DEFAULTS = {
    # MAML adapts with gradients inside validation and test: inference mode would forbid it.
    "inference_mode": False,
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "default"},
    },
}
PARSER_KWARGS = {"exit_on_error": False}
"""jsonargparse raises its errors instead of printing the usage: :func:`one_line_errors` prints them."""


class MetaCLI(LightningCLI):
    """LightningCLI with a configurable best-checkpoint callback (``--checkpoint.*``), a
    ``last.ckpt`` written every epoch (resume with ``--ckpt_path .../last.ckpt``),
    ``--test_after_fit`` to test the best checkpoint when ``fit`` ends, and the machine recorded
    beside the logs (``machine.json``).

    Before anything trains it refuses what would fail late or silently: a ``--ckpt_path`` that is
    missing, unreadable or of another net (``last``: the newest run's ``last.ckpt``), ``predict``
    without one, and a checkpoint monitor the module never logs. Without a progress bar it prints
    a line per epoch (:class:`~lthmaml.progress.EpochProgress`).
    """

    needs_checkpoint: tuple[str, ...] = ("predict",)
    """Subcommands that would run a randomly initialised net without ``--ckpt_path``."""

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

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then check ``--ckpt_path`` before LightningCLI reads its hyperparameters."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand is not None:
            check_ckpt_path(self.config[subcommand], subcommand, self.needs_checkpoint)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config  # run=False: no subcommand
        threads = config.get("threads")
        if threads is not None:
            if threads < 1:
                raise ConfigError(f"--threads must be >= 1, got {threads}")
            torch.set_num_threads(threads)

    def instantiate_trainer(self, **kwargs) -> pl.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks.extend([MachineRecord(), FailedRunMarker()])
        if trainer.checkpoint_callback is not None:  # checkpointing can be switched off
            trainer.callbacks.append(LastCheckpoint())
        if trainer.progress_bar_callback is None:
            monitor = getattr(trainer.checkpoint_callback, "monitor", None)
            trainer.callbacks.append(EpochProgress(monitor))
        return trainer

    def before_fit(self) -> None:
        check_monitors(self.trainer, self.model, self.datamodule)

    def after_fit(self) -> None:
        # A callback that records levels (the pruning strategies' ``test_rounds``) tests them now,
        # with the public trainer.test; nothing here knows the callbacks package.
        for callback in list(self.trainer.callbacks):
            test_rounds = getattr(callback, "test_rounds", None)
            if callable(test_rounds):
                test_rounds(self.trainer, self.model, self.datamodule)
        if self.config[self.subcommand].get("test_after_fit"):
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path="best")


class RunConfig(SaveConfigCallback):
    """Writes the run's ``config.yaml``, but a fit that resumes from a checkpoint of the same run
    folder (a fixed logger version, as ``make experiments`` uses) keeps the one written when the run
    began; any other fit into a folder that holds a run is refused in one line, not overwritten."""

    def setup(self, trainer: pl.Trainer, pl_module: LightningModule, stage: str) -> None:
        log_dir = Path(trainer.log_dir or ".")
        if self.already_saved or not (log_dir / self.config_filename).is_file():
            return super().setup(trainer, pl_module, stage)
        ckpt = self.config.get("ckpt_path")
        if ckpt and log_dir.resolve() in Path(ckpt).resolve().parents:
            self.already_saved = True  # resuming this run: its config.yaml stays the record
            return None
        raise ConfigError(
            f"{log_dir} already holds a run ({self.config_filename}): resume it with --ckpt_path "
            f"{log_dir / 'checkpoints' / 'last.ckpt'}, or choose another "
            "--trainer.logger.init_args.version or save_dir"
        )


# ---------------------------------------------------------------------------------- checks
def _plain(value: Any) -> Any:
    """A config value as plain JSON types, so a parsed config compares with a checkpoint's hparams."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    return json.loads(json.dumps(value, default=str))


def _describe_net(net: dict) -> str:
    name = str(net.get("class_path", "?")).rsplit(".", 1)[-1]
    return f"{name}({json.dumps(net.get('init_args') or {}, sort_keys=True)})"


def check_ckpt_path(config: Namespace, subcommand: str, needs_checkpoint: tuple[str, ...]) -> None:
    """``--ckpt_path`` names a readable checkpoint of the configured net (``last`` is resolved).

    Lightning would raise a raw ``FileNotFoundError`` or unpickling error, start afresh on a
    ``last`` it cannot find, or silently swap the checkpoint's net in for the configured one.
    """
    ckpt = config.get("ckpt_path")
    if ckpt is None:
        if subcommand in needs_checkpoint:
            raise ConfigError(
                f"{subcommand} needs --ckpt_path <run>/checkpoints/<file>.ckpt: without it the net is "
                "randomly initialised"
            )
        return
    if ckpt == "last":
        config["ckpt_path"] = ckpt = str(last_checkpoint(config))
        rank_zero_info(f"--ckpt_path last: {ckpt}")
    elif ckpt in ("best", "hpc", "registry") or "://" in ckpt:
        return  # Lightning's own lookups
    path = Path(ckpt)
    if not path.is_file():
        raise DataError(f"--ckpt_path {path}: no such checkpoint file")
    try:
        checkpoint = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DataError(
            f"--ckpt_path {path}: not a readable checkpoint ({reason}); it may be truncated: give an "
            "earlier one, e.g. <run>/checkpoints/last.ckpt"
        ) from None
    saved = (checkpoint.get("hyper_parameters") or {}).get("net") if isinstance(checkpoint, dict) else None
    model = config.get("model")
    configured = model.get("init_args", Namespace()).get("net") if isinstance(model, Namespace) else None
    if not isinstance(saved, dict) or configured is None:
        return
    saved, configured = _plain(saved), _plain(configured)
    same_class = (
        str(saved.get("class_path")).rsplit(".", 1)[-1]
        == str(configured.get("class_path")).rsplit(".", 1)[-1]
    )
    if not same_class or (saved.get("init_args") or {}) != (configured.get("init_args") or {}):
        raise ConfigError(
            f"--ckpt_path {path} holds a {_describe_net(saved)} but the config builds "
            f"{_describe_net(configured)}: pass the config the checkpoint was trained with "
            "(config.yaml in its run folder)"
        )


def _version(path: Path) -> int:
    match = re.fullmatch(r"version_(\d+)", path.name)
    return int(match.group(1)) if match else -1


def last_checkpoint(config: Namespace) -> Path:
    """What ``--ckpt_path last`` means here: ``last.ckpt`` of the newest run of the same logger
    name (``<save_dir>/<name>/version_N/checkpoints``), or of ``--checkpoint.dirpath``."""
    dirpath = (config.get("checkpoint") or Namespace()).get("dirpath")
    trainer = config.get("trainer") or Namespace()
    logger = trainer.get("logger")
    init = logger.get("init_args") if isinstance(logger, Namespace) else None
    if dirpath:
        candidates, where = [Path(dirpath) / "last.ckpt"], Path(dirpath) / "last.ckpt"
    elif isinstance(init, Namespace) and init.get("save_dir") is not None:
        root = Path(init.get("save_dir")) / (init.get("name") or "")
        runs = sorted((p.parent.parent for p in root.glob("version_*/checkpoints/last.ckpt")), key=_version)
        candidates = [run / "checkpoints" / "last.ckpt" for run in reversed(runs)]
        where = root / "version_*" / "checkpoints" / "last.ckpt"
    else:
        root = Path(trainer.get("default_root_dir") or ".")
        candidates, where = [root / "checkpoints" / "last.ckpt"], root / "checkpoints" / "last.ckpt"
    found = next((path for path in candidates if path.is_file()), None)
    if found is None:
        raise ConfigError(f"--ckpt_path last: there is no {where}: give the path of the run's last.ckpt")
    return found


def check_monitors(trainer: pl.Trainer, model: LightningModule, datamodule: Any) -> None:
    """Every checkpoint and early-stopping monitor is a metric the module logs during fit.

    Lightning finds out only at the first epoch's end, after a whole epoch and with no checkpoint.
    """
    names = getattr(model, "monitorable_metrics", None)
    if names is None:
        return
    valid = names(datamodule)
    for callback in [*trainer.checkpoint_callbacks, *trainer.early_stopping_callbacks]:
        monitor = getattr(callback, "monitor", None)
        if monitor is not None and monitor not in valid:
            option = (
                "--checkpoint.monitor"
                if type(callback) is ModelCheckpoint
                else f"the {type(callback).__name__} monitor"
            )
            raise ConfigError(
                f"{option} {monitor!r} is never logged by {type(model).__name__} on this data: use one of "
                f"{', '.join(valid)}"
            )


def _no_tips(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("💡 Tip")


def quiet_third_party() -> None:
    """Drop Lightning's advertising tips and torch's LeafSpec deprecation (raised inside Lightning,
    nothing a user can act on); our own warnings and Lightning's other messages stay."""
    warnings.filterwarnings("ignore", r".*isinstance\(treespec, LeafSpec\)", FutureWarning)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_no_tips)  # once: same object


def main(args: Optional[list[str]] = None) -> None:
    quiet_third_party()
    with one_line_errors("lthmaml"):
        MetaCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            trainer_defaults=TRAINER_DEFAULTS,
            args=args,
            auto_configure_optimizers=False,
            save_config_callback=RunConfig,
            parser_kwargs=PARSER_KWARGS,
        )
    release_process_group()


if __name__ == "__main__":
    main()
