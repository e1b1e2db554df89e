"""What the ``lthmaml`` and ``lthmaml-edge`` commands share: :class:`MetaCLI` (LightningCLI with
``--threads``, run folders, checks before anything trains, a line per epoch, Ctrl-C that says how
to resume), the logged config, and the quieting of third-party noise.

The commands themselves sit above it: ``lthmaml`` (:mod:`lthmaml.cli`, whose ``predict`` reads
task folders as the edge path does) and ``lthmaml-edge`` (:mod:`lthmaml.edge.cli`)."""

from __future__ import annotations

import argparse
import logging
import re
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
import yaml
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from lthmaml.checkpointing import LastCheckpoint
from lthmaml.environment import FailedRunMarker, MachineRecord
from lthmaml.errors import ConfigError, argument_error_line
from lthmaml.progress import EpochProgress
from lthmaml.runfolders import (
    PREDICTIONS,
    check_ckpt_path,
    check_log_folder,
    check_writable,
    checkpoint_run_folder,
    log_into,
    resume_command,
)

PARSER_KWARGS = {"exit_on_error": False}
"""jsonargparse raises its errors instead of printing the usage: :func:`one_line_errors` prints them."""


class MetaCLI(LightningCLI):
    """LightningCLI with a configurable best-checkpoint callback (``--checkpoint.*``), a
    ``last.ckpt`` written every epoch (resume with ``--ckpt_path .../last.ckpt``),
    ``--test_after_fit`` to test the best checkpoint when ``fit`` ends, and the machine recorded
    beside the logs (``machine.json``).

    Run folders: a fit makes ``<save_dir>/<name>/version_N``; a fit resumed from a checkpoint
    of a run folder, and ``validate`` and ``test`` of one, log into that folder (unless the
    logger's version is given), so one run's curves and tests stay together. ``predict`` logs
    nothing and writes ``predictions.csv`` there (``--output`` elsewhere; what it writes is the
    command's own: :class:`lthmaml.cli.LthmamlCLI`, :class:`lthmaml.edge.cli.EdgeCLI`).

    Before anything trains it refuses what would fail late or silently: a config file that is
    not YAML, a non-finite float, a ``--ckpt_path`` that is missing, unreadable or of another net
    (``last``: the newest run's ``last.ckpt``), ``predict`` without one, a log or output folder
    that cannot be made, and a checkpoint monitor the module never logs. Without a progress bar
    it prints a line per epoch (:class:`~lthmaml.progress.EpochProgress`); Ctrl-C prints the
    command that resumes the fit.
    """

    prog = "lthmaml"
    needs_checkpoint: tuple[str, ...] = ("predict",)
    """Subcommands that would run a randomly initialised net without ``--ckpt_path``."""
    predict_options: tuple[str, ...] = ("task_folder", "output")
    """Options only ``predict`` reads: refused elsewhere rather than ignored."""
    argv: list[str] = []

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_argument(
            "--test_after_fit", type=bool, default=False, help="After fit, test the best checkpoint."
        )
        parser.add_argument(
            "--task_folder",
            type=Optional[str],
            default=None,
            help="predict: adapt to this task folder's support set and predict its query (layout: "
            "lthmaml.data.taskfolder) instead of the config's predict tasks.",
        )
        parser.add_argument(
            "--output",
            type=Optional[str],
            default=None,
            help="predict: the predictions CSV, a .csv path or a folder for predictions.csv (default: "
            "the checkpoint's run folder).",
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
        self.argv = (
            list(sys.argv[1:] if args is None else args)
            if isinstance(args, (list, tuple, type(None)))
            else []
        )
        check_yaml_files(self.argv)
        try:
            super().parse_arguments(parser, args)
        except argparse.ArgumentError as error:
            replaced = non_finite_error(error)
            if replaced is None:
                raise
            raise replaced from None
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
        if self.subcommand is None:
            return
        given = [f"--{name}" for name in self.predict_options if config.get(name)]
        if self.subcommand != "predict" and given:
            raise ConfigError(f"{' and '.join(given)}: for predict, not {self.subcommand}")
        if self.subcommand != "fit":
            quiet_evaluation()
        ckpt = config.get("ckpt_path")
        run = checkpoint_run_folder(Path(ckpt)) if ckpt and Path(ckpt).is_file() else None
        if self.subcommand == "predict":
            config["trainer"]["logger"] = False  # it would log nothing: predictions.csv is the record
            check_writable(self.predictions_file(), "--output", "predictions file", file=True)
        elif run is not None:
            log_into(config, run)
            if self.subcommand == "fit":  # resuming in place: its checkpoints are expected there
                warnings.filterwarnings("ignore", r"Checkpoint directory .* exists and is not empty")
        check_log_folder(config)

    def predictions_file(self) -> Path:
        """Where ``predict`` writes: ``--output`` (a ``.csv`` or a folder), else the run folder of
        the checkpoint, else the checkpoint's folder."""
        config = self.config[self.subcommand]
        output, ckpt = config.get("output"), Path(config.get("ckpt_path") or ".")
        folder = Path(output) if output else checkpoint_run_folder(ckpt) or ckpt.parent
        return folder if folder.suffix.lower() == ".csv" else folder / PREDICTIONS

    def instantiate_trainer(self, **kwargs) -> pl.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks.extend([MachineRecord(), FailedRunMarker()])
        if trainer.checkpoint_callback is not None:  # checkpointing can be switched off
            trainer.callbacks.append(LastCheckpoint())
        if trainer.progress_bar_callback is None:
            monitor = getattr(trainer.checkpoint_callback, "monitor", None)
            trainer.callbacks.append(EpochProgress(monitor))
        return trainer

    def _run_subcommand(self, subcommand: str) -> None:
        """Lightning's Ctrl-C handling exits with status 1 after its own message (filtered out by
        :func:`quiet_third_party`): here one line says how to go on instead."""
        try:
            super()._run_subcommand(subcommand)
        except SystemExit:
            if not self.trainer.interrupted:
                raise
            print(f"{self.prog}: {self.interrupted_line(subcommand)}", file=sys.stderr, flush=True)
            raise SystemExit(130) from None

    def interrupted_line(self, subcommand: str) -> str:
        if subcommand != "fit":
            return f"interrupted; {subcommand} did not finish"
        last = next((c for c in self.trainer.callbacks if isinstance(c, LastCheckpoint) and c.dirpath), None)
        if last is None:
            return "interrupted; this fit keeps no checkpoint: run the command again"
        if not last.path.is_file():
            return "interrupted before the first epoch ended: nothing to resume, run the command again"
        return f"interrupted; resume with: {resume_command(self.prog, self.argv, last.path)}"

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
            # The ModelCheckpoint's best by name: "best" makes Lightning warn that LastCheckpoint,
            # a checkpoint callback too, is not the one it reads.
            best = getattr(self.trainer.checkpoint_callback, "best_model_path", "") or "best"
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best)


class LoggedConfig(SaveConfigCallback):
    """``config.yaml`` in the log folder, and none without a logger (``predict`` logs nothing: its
    ``predictions.csv`` is the record), where Lightning would write it into the working folder."""

    def setup(self, trainer: pl.Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.logger is not None:
            super().setup(trainer, pl_module, stage)


# ---------------------------------------------------------------------------------- checks
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


# ---------------------------------------------------------------------------------- input
YAML_SUFFIXES = (".yaml", ".yml")


def check_yaml_files(argv: list[str]) -> None:
    """Every YAML file named on the command line parses: jsonargparse's error names neither the
    file nor the line (``while parsing a flow mapping``)."""
    for arg in argv:
        value = arg.split("=", 1)[1] if arg.startswith("--") and "=" in arg else arg
        path = Path(value)
        if path.suffix.lower() not in YAML_SUFFIXES or not path.is_file():
            continue
        try:
            yaml.safe_load(path.read_text())
        except (yaml.scanner.ScannerError, yaml.parser.ParserError) as error:
            mark, start = error.problem_mark, error.context_mark
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            context = f" ({error.context} from line {start.line + 1})" if error.context and start else ""
            raise ConfigError(
                f"{path}: not valid YAML{where}: {error.problem}{context}; fix the file"
            ) from None
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"{path}: cannot read it as a YAML config ({error})") from None


_NON_FINITE = re.compile(r"Expected a <class 'float'>\. Got value: ([-+]?(?:nan|inf(?:inity)?))\b", re.I)


def non_finite_error(error: argparse.ArgumentError) -> Optional[ConfigError]:
    """jsonargparse refuses NaN and infinities for a float as ``Expected a <class 'float'>. Got
    value: nan``: the option and what it needs instead, or None for any other error."""
    line = argument_error_line(error)
    match = _NON_FINITE.search(line)
    if match is None:
        return None
    option = line.split(": ", 1)[0] if ": " in line else "a float option"
    return ConfigError(f"--{option} {match.group(1)}: must be a finite number (e.g. 0.001)")


@contextmanager
def interrupted_quietly(prog: str) -> Iterator[None]:
    """Ctrl-C outside a trainer run (reading data, building the net): one line, exit status 130."""
    try:
        yield
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        raise SystemExit(130) from None


LIGHTNING_NOISE = ("💡 Tip", "\nDetected KeyboardInterrupt")
"""Lightning log lines dropped: its advertising tips, and its Ctrl-C notice (the CLI says what to do)."""


def _not_noise(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(LIGHTNING_NOISE)


def quiet_third_party() -> None:
    """Drop Lightning's advertising tips and Ctrl-C notice, and torch's LeafSpec deprecation (raised
    inside Lightning, nothing a user can act on); our own warnings and Lightning's other messages
    stay."""
    warnings.filterwarnings("ignore", r".*isinstance\(treespec, LeafSpec\)", FutureWarning)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_not_noise)  # once: same object


def quiet_evaluation() -> None:
    """What Lightning says when validate, test or predict restore a fit's checkpoint, which is
    expected there: the pruning callbacks the fit had are not needed to evaluate its weights, and
    a checkpoint read from another folder than the fit's keeps its own best path."""
    warnings.filterwarnings("ignore", r".*callbacks used to create the checkpoint need to be provided")
    warnings.filterwarnings("ignore", r"The dirpath has changed from")
