"""The ``lthmaml`` command: LightningCLI over any LightningModule and DataModule (fit, validate,
test, predict), with the defaults a MAML run needs and one-line errors for bad input."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch import LightningDataModule, LightningModule

from lthmaml.commands import PARSER_KWARGS, LoggedConfig, MetaCLI, interrupted_quietly, quiet_third_party
from lthmaml.environment import release_process_group
from lthmaml.errors import ConfigError, one_line_errors
from lthmaml.meta.episodic import EpisodicLearner
from lthmaml.predicting import PredictionsCSV, folder_task

TRAINER_DEFAULTS = {
    # MAML adapts with gradients inside validation and test: inference mode would forbid it.
    "inference_mode": False,
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "default"},
    },
}
DESCRIPTION = (
    "Meta-train and prune (fit), evaluate (validate, test) and predict with a checkpoint. A fit writes "
    "<save_dir>/<name>/version_N; resumed with --ckpt_path <run>/checkpoints/last.ckpt (or last) it "
    "continues in that folder, and validate, test and predict of a checkpoint write into its run "
    "folder (predict: predictions.csv)."
)


class LthmamlCLI(MetaCLI):
    """:class:`~lthmaml.commands.MetaCLI` whose ``predict`` writes ``predictions.csv``: a row per
    query of the config's predict tasks, or of a task folder's query (``--task_folder``, read as
    the edge path reads it for the checkpoint)."""

    def predict(self, model: LightningModule, datamodule: Any = None, **kwargs: Any) -> None:
        """``trainer.predict`` whose rows go to ``predictions.csv`` (:class:`PredictionsCSV`)."""
        if not isinstance(model, EpisodicLearner):
            raise ConfigError(
                f"predict adapts a meta-learner to tasks; {type(model).__name__} adapts to none: use "
                "`lthmaml test`, or export it (lthmaml-export) and `lthmaml-edge predict` on a task folder"
            )
        config = self.config[self.subcommand]
        ckpt, path = config.get("ckpt_path"), self.predictions_file()
        folder = config.get("task_folder")
        if folder:
            source, loader = folder_task(Path(folder), ckpt)
            writer = PredictionsCSV(path, labels=source.labels or None, files=source.query_files)
            datamodule, kwargs["dataloaders"] = None, loader
        else:
            ways = getattr(datamodule, "ways", None)
            writer = PredictionsCSV(path, labels=None if ways is None else [str(i) for i in range(ways)])
        self.trainer.callbacks.append(writer)
        if kwargs.get("return_predictions") is None:
            kwargs["return_predictions"] = False  # the rows are written as they come
        self.trainer.predict(model, datamodule=datamodule, **kwargs)


class RunConfig(LoggedConfig):
    """Writes the run's ``config.yaml``, but a fit that resumes from a checkpoint of the same run
    folder, and a test of one, keep the one written when the run began; any other fit into a
    folder that holds a run is refused in one line, not overwritten."""

    def setup(self, trainer: pl.Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.logger is None:
            return None
        log_dir = Path(trainer.log_dir or ".")
        if self.already_saved or not (log_dir / self.config_filename).is_file():
            return super().setup(trainer, pl_module, stage)
        ckpt = self.config.get("ckpt_path")
        if ckpt and log_dir.resolve() in Path(ckpt).resolve().parents:
            self.already_saved = True  # resuming or testing this run: its config.yaml stays the record
            return None
        raise ConfigError(
            f"{log_dir} already holds a run ({self.config_filename}): resume it with --ckpt_path "
            f"{log_dir / 'checkpoints' / 'last.ckpt'}, or choose another "
            "--trainer.logger.init_args.version or save_dir"
        )


def command(args: Optional[list[str]], cli_class: type[LthmamlCLI] = LthmamlCLI, **kwargs: Any) -> LthmamlCLI:
    """The ``lthmaml`` command on ``args`` (any LightningModule and DataModule, the trainer
    defaults above); ``kwargs`` go to LightningCLI (``run=False``: build the config's objects only)."""
    if args is not None:  # given on purpose (a benchmark, a test): sys.argv is meant to be ignored
        warnings.filterwarnings("ignore", r"LightningCLI's args parameter is intended to run")
    return cli_class(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults=TRAINER_DEFAULTS,
        args=args,
        auto_configure_optimizers=False,
        **kwargs,
    )


def main(args: Optional[list[str]] = None) -> None:
    quiet_third_party()
    with interrupted_quietly(LthmamlCLI.prog), one_line_errors(LthmamlCLI.prog):
        command(
            args,
            save_config_callback=RunConfig,
            parser_kwargs={**PARSER_KWARGS, "description": DESCRIPTION},
        )
    release_process_group()


if __name__ == "__main__":
    main()
