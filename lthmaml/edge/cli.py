"""The ``lthmaml-edge`` command: fine-tune an exported (pruned) artifact on a local task folder,
then test or predict with the result, the LightningCLI way::

    lthmaml-edge fit -c configs/edge/pi.yaml --model.artifact model.safetensors --data.root task/
    lthmaml-edge test -c configs/edge/pi.yaml --model.artifact runs/edge/task/finetuned.safetensors \\
        --data.root task/
    lthmaml-edge predict -c configs/edge/pi.yaml --model.artifact runs/edge/task/finetuned.safetensors \\
        --data.root task/

One folder per task folder: every command on ``--data.root task/`` works in ``runs/edge/task/``
(the logger's ``save_dir``/``name``, and the task folder's name as its version unless one is
given). ``fit`` keeps no checkpoints (a Pi's SD card is slow and small); it writes the fine-tuned
net as a compact artifact, ``finetuned.safetensors`` there (or ``--output``), with its
``metrics.csv`` and ``config.yaml``, replacing those of the task's previous fit; ``test`` and
``predict`` load it like any artifact; ``test`` prints its result and logs nothing, ``predict``
writes ``predictions.csv`` there (or ``--output``). Every launch pays Python's, torch's and Lightning's
start-up (seconds on a Pi), so ``fit --predict_after_fit true`` adapts and writes
``predictions.csv`` in one launch, and the log gives start-up, fit and predict times apart.
``--model.checkpoint run.ckpt`` starts from a ``lthmaml`` checkpoint instead of an artifact.
``--threads``, and one-line errors, are shared with the ``lthmaml`` command
(:class:`lthmaml.commands.MetaCLI`).

A ProtoNet or MatchingNet artifact (its metadata's ``learner``) is adapted by embedding the
support set: ``fit`` computes the prototypes / support embeddings (0 epochs, no backward pass)
unless ``--model.fine_tune_embedding true``; ``test`` and ``predict`` score the query with the
learner's rule, the classes being the task folder's labels in its order.

Images are decoded in the artifact's look (``ink``, ``gray``, ``rgb``) and normalised by the
meta-train statistics it carries (:meth:`~lthmaml.data.taskfolder.TaskFolderDataModule.follow`);
at the artifact's image size (``--data.image_size`` only overrides it, and must then agree).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Optional

from lightning.pytorch.cli import LightningArgumentParser
from lightning.pytorch.utilities import rank_zero_info

from lthmaml.commands import PARSER_KWARGS, LoggedConfig, MetaCLI, interrupted_quietly, quiet_third_party
from lthmaml.data.taskfolder import TaskFolderDataModule
from lthmaml.edge.finetune import FineTuneModule
from lthmaml.edge.launch import process_start
from lthmaml.errors import ConfigError, one_line_errors
from lthmaml.runfolders import PREDICTIONS, check_writable, configured_log_dir, logger_args

PROG = "lthmaml-edge"
DESCRIPTION = (
    "Fine-tune an exported artifact on a task folder (fit), then test or predict with it. Every command "
    "on --data.root task/ works in runs/edge/task/: fit writes finetuned.safetensors and metrics.csv "
    "there (replacing the task's previous fit), predict writes predictions.csv there, test prints."
)
FINETUNED = "finetuned.safetensors"
EDGE_TRAINER_DEFAULTS = {
    "enable_checkpointing": False,
    "num_sanity_val_steps": 0,
    # CSV, not TensorBoard: importing tensorboard's protobuf stack costs a Pi seconds and memory
    "logger": {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": "runs", "name": "edge"},
    },
}


class EdgeCLI(MetaCLI):
    """:class:`~lthmaml.commands.MetaCLI` for fine-tuning: its ``--threads``, no checkpoint callbacks,
    ``--output`` (fit: the fine-tuned artifact; predict: ``predictions.csv`` or its folder) and
    ``--test_after_fit`` (tests the fine-tuned weights in memory); one folder per task folder
    (:meth:`task_dir`)."""

    prog = PROG
    needs_checkpoint = ()  # the net comes from model.artifact or model.checkpoint
    predict_options = ()  # --output is fit's too: checked below

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        self.add_threads_argument(parser)
        parser.add_argument(
            "--output",
            type=Optional[str],
            default=None,
            help=f"fit: where the fine-tuned artifact goes (default runs/edge/<task folder name>/"
            f"{FINETUNED}); predict: the predictions CSV, a .csv path or a folder for predictions.csv "
            "(default: runs/edge/<task folder name>/)",
        )
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="After fit, test the fine-tuned weights on the labelled query.",
        )
        parser.add_argument(
            "--predict_after_fit",
            type=bool,
            default=False,
            help="After fit, write predictions.csv of the query (beside the fine-tuned net) in one launch.",
        )

    def before_fit(self) -> None:
        super().before_fit()
        self.fit_started = time.perf_counter()

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        self.edge_dir = self.task_dir(config)
        if self.subcommand != "fit":
            config["trainer"]["logger"] = False  # test prints its result; predict writes its CSV
        super().before_instantiate_classes()
        output = config.get("output")
        if output and self.subcommand not in ("fit", "predict"):
            raise ConfigError(f"--output is for fit and predict, not {self.subcommand}")
        if self.subcommand == "fit":
            if output:
                check_writable(Path(output), "--output", "fine-tuned artifact", file=True)
            # The folder is the task's: a fit replaces the previous fit's log there, as it says.
            warnings.filterwarnings("ignore", r"Experiment logs directory .* exists and is not empty")

    @staticmethod
    def task_dir(config) -> Path:
        """``<save_dir>/<name>/<task folder name>``: the logger's version, unless one is given."""
        init = logger_args(config)
        if init is not None and init.get("version") is None:
            root = Path(str((config.get("data") or {}).get("root") or "task")).expanduser()
            init["version"] = root.resolve().name or "task"
        return configured_log_dir(config) or Path(".")

    def predictions_file(self) -> Path:
        output = self.config[self.subcommand].get("output")
        folder = Path(output) if output else self.edge_dir
        return folder if folder.suffix.lower() == ".csv" else folder / PREDICTIONS

    def before_predict(self) -> None:
        self.model.predictions_path = self.predictions_file()

    def predict(self, **kwargs) -> None:
        """Lightning's: :class:`~lthmaml.edge.finetune.FineTuneModule` writes its own CSV."""
        self.trainer.predict(**kwargs)

    def after_fit(self) -> None:
        model, trainer = self.model, self.trainer
        output = self.config[self.subcommand].get("output")
        log_dir = trainer.log_dir  # a broadcast under DDP: on every rank, before the rank-zero branch
        if trainer.is_global_zero:
            path = Path(output) if output else Path(log_dir or trainer.default_root_dir) / FINETUNED
            model.export(path)
            rank_zero_info(f"Wrote the fine-tuned net to {path}")
        fitted = time.perf_counter()
        if self.config[self.subcommand].get("test_after_fit"):
            trainer.test(model, datamodule=self.datamodule)
        predicted = ""
        if self.config[self.subcommand].get("predict_after_fit"):
            start = time.perf_counter()
            trainer.predict(model, datamodule=self.datamodule)
            predicted = f", predict {time.perf_counter() - start:.2f} s"
        rank_zero_info(
            f"Timings: start-up {self.fit_started - process_start():.2f} s (Python, imports, parsing), "
            f"fit {fitted - self.fit_started:.2f} s{predicted}"
        )


def run_cli(args: Optional[list[str]] = None, cli_class: type[EdgeCLI] = EdgeCLI) -> EdgeCLI:
    """Parse ``args`` and run the subcommand with ``cli_class`` (``lthmaml.edge.pi`` extends it)."""
    # A task without val/ has no validation loader on purpose: Lightning's notice is noise there.
    warnings.filterwarnings("ignore", ".*Total length of `list` across ranks is zero.*")
    # A metric-learner artifact adapts without an optimizer on purpose (FineTuneModule.adapt_only).
    warnings.filterwarnings("ignore", ".*configure_optimizers` returned `None`.*")
    return cli_class(
        FineTuneModule,
        TaskFolderDataModule,
        trainer_defaults=EDGE_TRAINER_DEFAULTS,
        args=args,
        auto_configure_optimizers=False,
        save_config_callback=LoggedConfig,
        save_config_kwargs={"overwrite": True},  # the task folder's previous fit is replaced
        parser_kwargs={**PARSER_KWARGS, "description": DESCRIPTION},
    )


def main(args: Optional[list[str]] = None) -> None:
    quiet_third_party()
    with interrupted_quietly(PROG), one_line_errors(PROG):
        run_cli(args)


if __name__ == "__main__":
    main()
