"""Fine-tuning a (pruned) meta-learned net on one local task: what the edge device does.

The server meta-trains and exports a compact artifact (``lthmaml.edge.export``); the device loads it
and adapts it to a few local examples (a ``lthmaml.data.taskfolder.TaskFolderDataModule``).
Two regimes:

* **with a validation split** (``val/`` or ``val.csv``): ordinary epochs over the support set
  with ``val/loss`` and ``val/acc`` logged for an early-stopping trainer callback; the weights
  of the best validation epoch are kept in memory and restored when fit ends. A device's epochs
  are slow and the best one comes early, so stopping early is most of the saving.
* **without one** (e.g. 1-shot): nothing to stop on, so the module runs exactly the inner loop
  MAML evaluated with, ``eval_inner_steps`` full-batch SGD steps at the meta-learned inner rate:
  the adaptation the meta-initialisation was optimised and validated for. It ends the fit itself
  (``trainer.should_stop``) after that many steps, so the trainer's ``max_epochs`` is only a cap.

A ProtoNet, MatchingNet or CNP artifact adapts in one forward pass over the support set
(:mod:`lthmaml.edge.amortized`): ``fit`` then only adapts (it stops the fit before its first
epoch: no backward pass, no optimizer state) unless ``fine_tune_embedding`` asks to fine-tune a
metric learner's embedding on the support loss, under the regimes above.

Pruned weights stay exactly zero: their gradient is masked before every optimizer step, they and
their optimizer state are zeroed after it (weight decay or momentum would grow them back).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lthmaml.edge.amortized import SupportAdapter
from lthmaml.edge.artifact import AMORTIZED_LEARNERS, METRIC_LEARNERS, load_artifact
from lthmaml.edge.export import artifact_from_checkpoint
from lthmaml.edge.predictions import HEADER, prediction_rows, write_csv
from lthmaml.edge.stopping import TaskEarlyStopping, stopper_of
from lthmaml.errors import ConfigError, DataError, TrainingError, checked_values
from lthmaml.masks import apply_masks, mask_gradients
from lthmaml.tracking import BestWeights

MONITORABLE = {"val/loss": "min", "val/acc": "max"}
"""The validation metrics this module logs, with the direction in which they improve."""


class FineTuneModule(pl.LightningModule):
    """Adapts an exported (or checkpointed) meta-learned net to one local task, masks kept.

    Args:
        artifact: an artifact written by ``lthmaml-export`` (``.safetensors``).
        checkpoint: instead, a ``lthmaml`` MAML/Classifier checkpoint (``.ckpt``); it is exported with
            ``lthmaml.edge.export`` to a temporary file and loaded back, not read by a second loader.
        lr: the fine-tuning learning rate; default the artifact's meta-learned inner ``lr``. Given
            with an optimizer callable, it overrides that optimizer's own ``lr``.
        optimizer: ``"sgd"`` (plain SGD, the inner loop's optimizer) or any optimizer the
            LightningCLI way (``class_path``/``init_args``).
        restore_best: at the end of fit, put back the weights of the best validation epoch (by the
            early stopper's monitor, ``val/loss`` or ``val/acc``; ``val/loss`` without one).
        fine_tune_embedding: for a ProtoNet or MatchingNet artifact, fine-tune the embedding on
            the support loss (as the other regimes fine-tune); false: ``fit`` only computes the
            prototypes / support embeddings. Not for other learners.

    After fit: ``epochs_run``, ``best_epoch`` (1-based; None without validation), ``best_score``
    of ``best.monitor``; after test: ``test_results`` (``loss``, ``acc`` for classification, ``examples``).
    ``predictions_path`` (a ``.csv`` file or a folder) is where predict writes ``predictions.csv``;
    default the trainer's log folder (the run folder).
    """

    def __init__(
        self,
        artifact: Optional[str] = None,
        checkpoint: Optional[str] = None,
        lr: Optional[float] = None,
        optimizer: Union[Literal["sgd"], OptimizerCallable] = "sgd",
        restore_best: bool = True,
        fine_tune_embedding: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=None if isinstance(optimizer, str) else ["optimizer"])
        if (artifact is None) == (checkpoint is None):
            raise ConfigError(
                "give exactly one of model.artifact (an exported .safetensors, see lthmaml-export) "
                "or model.checkpoint (a lthmaml .ckpt)"
            )
        if isinstance(optimizer, str) and optimizer != "sgd":
            raise ConfigError(
                f"model.optimizer: {optimizer!r} is not 'sgd'; give 'sgd' or an optimizer class_path"
            )
        if lr is not None and not lr > 0:
            raise ConfigError(f"model.lr must be > 0, got {lr}")
        loaded = load_artifact(artifact) if artifact is not None else artifact_from_checkpoint(checkpoint)
        self.source = str(artifact if artifact is not None else checkpoint)
        self.net = loaded.net.train()  # artifacts load in eval mode; Lightning keeps a module's mode
        self.metadata = loaded.metadata
        self.learner = self.metadata.learner
        if fine_tune_embedding and self.learner not in METRIC_LEARNERS:
            raise ConfigError(
                f"model.fine_tune_embedding is for ProtoNet and MatchingNet artifacts (learner "
                f"{' or '.join(METRIC_LEARNERS)}), but {self.source} holds learner {self.learner!r}"
            )
        self.fine_tune_embedding = fine_tune_embedding
        self.adapter: Optional[SupportAdapter] = None  # set up per task for an amortized learner
        self.lr = float(self.metadata.inner_lr if lr is None else lr)
        self.lr_given = lr is not None
        self.optimizer_choice = optimizer
        self.restore_best = restore_best
        self.predictions_path: Optional[Path] = None
        self.epochs_run = 0
        self.best = BestWeights("val/loss", "min")  # its monitor is set by the first validation of a fit
        self.fixed_steps: Optional[int] = None  # set when there is no validation split
        self.test_results: dict[str, float] = {}
        self.predictions: list[list] = []
        self._sums: dict[str, float] = {}

    @property
    def regression(self) -> bool:
        return self.metadata.task == "regression"

    @property
    def amortized(self) -> bool:
        """The learner adapts in a forward pass over the support set (ProtoNet, MatchingNet, CNP)."""
        return self.learner in AMORTIZED_LEARNERS

    @property
    def adapt_only(self) -> bool:
        """``fit`` only adapts: no epochs, no backward pass, no optimizer."""
        return self.amortized and not self.fine_tune_embedding

    def forward(self, x: Tensor) -> Tensor:
        """Logits (or log-probabilities) for classification, the prediction for regression; an
        amortized learner scores ``x`` against the support set :meth:`adapt` kept."""
        return self.net(x) if self.adapter is None else self.adapter.scores(self.net, x)

    def adapt(self) -> None:
        """An amortized learner's adaptation to the whole support set with the current weights."""
        if self.adapter is not None:
            support = self.trainer.datamodule.support_split()
            self.adapter.adapt(self.net, support.x.to(self.device), support.y.to(self.device))

    def support_summary(self) -> str:
        return self.adapter.summary(len(self.trainer.datamodule.support_split()))

    # ------------------------------------------------------------------ checks and schedule
    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        if datamodule is None:
            raise ConfigError("FineTuneModule needs a task datamodule (lthmaml.data.taskfolder)")
        self.check_task(datamodule)
        self.adapter = SupportAdapter.for_task(self.metadata, datamodule.splits["support"].y, self.source)
        if stage == "fit":
            self.epochs_run = 0
            self.best = BestWeights("val/loss", "min")
            self.fixed_steps = None
            if not self.adapt_only and hasattr(datamodule, "prepare_validation"):
                rank_zero_info(f"Validation for early stopping: {datamodule.prepare_validation()}")
            if self.adapt_only:
                self._check_trainer_allows(0)  # adapting is on_fit_start's forward pass
            elif not datamodule.has_val:
                self._fixed_inner_loop_schedule(datamodule)
            elif self.fine_tune_embedding and (note := self._one_support_batch(datamodule)):
                rank_zero_info(f"Fine-tuning the embedding on one support batch{note}")

    def check_task(self, datamodule) -> None:
        """The artifact must fit the task: its kind, its N ways, its input size (ConfigError)."""
        from lthmaml.data.taskfolder import check_compatible

        check_compatible(datamodule, self.metadata, self.source)

    @staticmethod
    def _root(datamodule) -> str:
        return str(getattr(datamodule, "root", "the task folder"))

    def _fixed_inner_loop_schedule(self, datamodule) -> None:
        """No validation split: MAML's evaluation inner loop, ``eval_inner_steps`` full-batch steps
        (one an epoch), ended by :meth:`on_train_batch_end`."""
        steps = int(self.metadata.eval_inner_steps)
        self.fixed_steps = steps
        self._check_trainer_allows(steps)
        for stock in self.trainer.early_stopping_callbacks:  # strict: it would fail at the first epoch's end
            if stock.strict:
                raise ConfigError(
                    f"trainer.callbacks: EarlyStopping on {stock.monitor!r} needs a validation split, and "
                    f"{self._root(datamodule)} has none: use lthmaml.edge.stopping.TaskEarlyStopping "
                    "(it sits out a fit without one), or give the task a val/ split (data.validation)"
                )
        stopper = stopper_of(self.trainer)
        what, why = ("for the meta-learned", ", the adaptation MAML evaluated with")
        if self.fine_tune_embedding:
            what, why = ("the embedding on the support loss for the artifact's", "")
        idle = "; EarlyStopping off" if isinstance(stopper, TaskEarlyStopping) else ""  # it sits this fit out
        rank_zero_info(
            f"No validation split in {self._root(datamodule)}: fine-tuning {what} eval_inner_steps={steps} "
            f"full-batch steps of {self.describe_optimizer()}{why}{idle}{self._one_support_batch(datamodule)}"
        )

    def _check_trainer_allows(self, steps: int) -> None:
        """The trainer's limits let the fit end after exactly ``steps`` optimizer steps, one an epoch:
        this module ends it there, the limits only cap it (a ConfigError naming the option otherwise)."""
        trainer = self.trainer
        if self.adapt_only:
            regime = f"{self.source} adapts in one forward pass, 0 epochs"
            fix = "or set model.fine_tune_embedding true to train the embedding"
        else:
            regime = (
                f"without a validation split the fit is the artifact's eval_inner_steps={steps} "
                "full-batch steps, one an epoch"
            )
            fix = "or give the task a val/ split"
        for option in ("max_epochs", "max_steps", "min_epochs", "min_steps"):
            value = getattr(trainer, option)
            if value is None or value < 0:
                continue
            if option.startswith("max") and value < steps:
                problem, bound = "ends it sooner", f"to {steps} or more"
            elif option.startswith("min") and value > steps:
                problem, bound = "makes it longer", f"to {steps} or less"
            else:
                continue
            raise ConfigError(
                f"{regime}, but trainer.{option}={value} {problem}: set trainer.{option} {bound}, {fix}"
            )

    @staticmethod
    def _one_support_batch(datamodule) -> str:
        """Raise ``data.batch_size`` to the support set's size (one full batch per step, as in
        MAML's inner loop; a metric learner's prototypes then see every class): a log note."""
        support = len(datamodule.support_split())
        if support <= datamodule.batch_size:
            return ""
        datamodule.batch_size = support
        return f"; data.batch_size raised to the {support} support examples"

    def on_fit_start(self) -> None:
        if self.adapt_only:
            self.adapt()
            rank_zero_info(
                f"Adapted by computing {self.support_summary()} in one forward pass: 0 epochs, no "
                "backward pass, no optimizer state (model.fine_tune_embedding: true fine-tunes the embedding)"
            )

    def describe_optimizer(self) -> str:
        if self.optimizer_choice != "sgd":
            return f"the configured optimizer{f' at lr={self.lr:g}' if self.lr_given else ''}"
        if self.metadata.inner_lrs is not None and not self.lr_given:
            return "SGD at the meta-learned per-tensor inner rates"
        return f"SGD at lr={self.lr:g}{'' if self.lr_given else ' (the inner lr)'}"

    def on_train_start(self) -> None:
        if self.fixed_steps is not None and self.trainer.num_training_batches != 1:
            raise ConfigError(
                f"without a validation split the support set must be one full batch (MAML's inner "
                f"loop), but it is {self.trainer.num_training_batches} batches: raise data.batch_size"
            )
        if self.adapt_only or self.fixed_steps == 0:
            self.trainer.should_stop = True  # the fit loop checks it before the first epoch

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.fixed_steps is not None and self.trainer.global_step >= self.fixed_steps:
            self.trainer.should_stop = True

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Optional[torch.optim.Optimizer]:
        if self.adapt_only:
            return None  # adapting is a forward pass: no optimizer state on the device
        if self.optimizer_choice == "sgd":
            rates = self.metadata.inner_lrs
            if rates is None or self.lr_given:
                return torch.optim.SGD(self.net.parameters(), lr=self.lr)
            # Meta-SGD / learned inner rates: each tensor at the rate meta-learned for it
            groups = [{"params": [p], "lr": rates[name]} for name, p in self.net.named_parameters()]
            return torch.optim.SGD(groups, lr=self.lr)
        with checked_values("model.optimizer"):
            optimizer = self.optimizer_choice(self.net.parameters())
        if self.lr_given:
            for group in optimizer.param_groups:
                group["lr"] = self.lr
        return optimizer

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        mask_gradients(self.net)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        apply_masks(self.net, self.trainer.optimizers)  # exactly zero, whatever the optimizer does

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        if self.regression:
            return F.mse_loss(outputs, targets.reshape(outputs.shape).to(outputs.dtype))
        return F.cross_entropy(outputs, targets.long())

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        outputs = self.net(x) if self.adapter is None else self.adapter.support_scores(self.net, x, y)
        loss = self.loss(outputs, y)
        self._stop_if_diverged(float(loss.detach()), "training")  # before backward and the optimizer step
        self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=len(x))
        return loss

    def _stop_if_diverged(self, loss: float, what: str) -> None:
        """A non-finite loss while fitting ends the fit with a TrainingError naming ``model.lr``, so
        nothing is exported: EarlyStopping would otherwise stop quietly on a NaN ``val/loss`` and
        the CLI would write the diverged net as if it were fine-tuned."""
        if not math.isfinite(loss) and self.trainer.state.fn == TrainerFn.FITTING:
            raise TrainingError(
                f"non-finite fine-tuning {what} loss at step {self.trainer.global_step} (epoch "
                f"{self.trainer.current_epoch}); no fine-tuned net was written: lower model.lr "
                f"(now {self.lr:g}) or set trainer.gradient_clip_val"
            )

    def on_train_epoch_end(self) -> None:
        self.epochs_run += 1

    # ------------------------------------------------------------------ validation and best weights
    def _reset_sums(self) -> None:
        self._sums = {"loss": 0.0, "correct": 0.0, "count": 0.0}

    def _accumulate(self, batch: tuple[Tensor, Tensor]) -> None:
        x, y = batch
        outputs = self(x)
        self._sums["loss"] += float(self.loss(outputs, y)) * len(x)
        self._sums["count"] += len(x)
        if not self.regression:
            self._sums["correct"] += float((outputs.argmax(-1) == y.long()).sum())

    def _means(self) -> dict[str, float]:
        count = max(self._sums["count"], 1.0)
        means = {"loss": self._sums["loss"] / count, "examples": int(self._sums["count"])}
        if not self.regression:
            means["acc"] = self._sums["correct"] / count
        return means

    def on_validation_epoch_start(self) -> None:
        self.adapt()
        self._reset_sums()

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._accumulate(batch)
        self._stop_if_diverged(self._sums["loss"], "validation")

    def on_validation_epoch_end(self) -> None:
        means = self._means()
        self.log("val/loss", means["loss"], prog_bar=True)
        if "acc" in means:
            self.log("val/acc", means["acc"], prog_bar=True)
        if self.trainer.sanity_checking or self.trainer.state.fn != TrainerFn.FITTING:
            return
        monitor, mode = self._monitor()
        if (self.best.monitor, self.best.mode) != (monitor, mode):  # the first validation of this fit
            self.best = BestWeights(monitor, mode)
        score = means.get(monitor.split("/", 1)[1], means["loss"])
        if math.isfinite(score):  # the whole state (masks, BatchNorm buffers), copied on a new best
            self.best.update(
                score,
                lambda: {k: t.detach().clone() for k, t in self.net.state_dict().items()},
                epoch=self.current_epoch + 1,
            )

    @property
    def best_epoch(self) -> Optional[int]:  # 1-based; None without validation
        return self.best.epoch

    @property
    def best_score(self) -> Optional[float]:
        return self.best.value

    def _monitor(self) -> tuple[str, str]:
        """The early stopper's monitor when it is one of ours, else ``val/loss``."""
        stopper = stopper_of(self.trainer)
        monitor = stopper.monitor if stopper is not None else "val/loss"
        if monitor not in MONITORABLE or (monitor == "val/acc" and self.regression):
            monitor = "val/loss"
        return monitor, MONITORABLE[monitor]

    def on_train_end(self) -> None:
        if self.fixed_steps is not None:
            return
        if self.restore_best and self.best.state is not None:
            self.net.load_state_dict(self.best.state)
            rank_zero_info(
                f"Restored the weights of epoch {self.best_epoch} of {self.epochs_run} "
                f"(best {self.best.monitor} {self.best_score:.4f})"
            )

    def export(self, output: Union[str, Path]) -> Path:
        """The fine-tuned net as an artifact (same format and fine-tuning settings as the source)."""
        from lthmaml.edge.artifact import COMPUTED_FIELDS
        from lthmaml.edge.export import export_net

        carried = {k: v for k, v in dataclasses.asdict(self.metadata).items() if k not in COMPUTED_FIELDS}
        return export_net(self.net, output, carried)

    # ------------------------------------------------------------------ test
    def on_test_epoch_start(self) -> None:
        self.adapt()
        self._reset_sums()

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._accumulate(batch)

    def on_test_epoch_end(self) -> None:
        self.test_results = self._means()
        self.log("test/loss", self.test_results["loss"])
        n = self.test_results["examples"]
        if self.regression:
            line = f"Query MSE {self.test_results['loss']:.4f} on {n} points"
        else:
            self.log("test/acc", self.test_results["acc"])
            correct = round(self.test_results["acc"] * n)
            line = (
                f"Query accuracy {self.test_results['acc']:.4f} ({correct}/{n}), "
                f"loss {self.test_results['loss']:.4f}"
            )
        if self.trainer.is_global_zero:
            print(line, flush=True)

    # ------------------------------------------------------------------ predict
    def on_predict_epoch_start(self) -> None:
        if self.trainer.world_size > 1:
            raise ConfigError("predict on one device: predictions.csv keeps the query's file order")
        self.adapt()
        self.predictions = []

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        rows, returned = prediction_rows(
            x, self(x), None if self.regression else self.trainer.datamodule.labels
        )
        self.predictions.extend(rows)
        return returned

    def on_predict_epoch_end(self) -> None:
        path = self.output_csv()  # trainer.log_dir is a collective: every rank asks, rank 0 writes
        if not self.trainer.is_global_zero:
            return
        files = list(self.trainer.datamodule.query_files)
        if len(files) != len(self.predictions):
            raise DataError(
                f"{len(self.predictions)} predictions for {len(files)} query files: the query loader "
                "must yield every file once, in order"
            )
        write_csv(
            path, HEADER[self.metadata.task], [[name, *row] for name, row in zip(files, self.predictions)]
        )
        rank_zero_info(f"Wrote {len(files)} predictions to {path}")

    def output_csv(self) -> Path:
        """``predictions_path`` if a ``.csv``; else ``predictions.csv`` in that folder or the run's."""
        target = self.predictions_path
        if target is None:
            target = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        target = Path(target)
        return target if target.suffix.lower() == ".csv" else target / "predictions.csv"
