"""What every pruning callback does the same way, so a strategy file holds only its method.

Written after Lightning's own ``ModelPruning`` and ``EarlyStopping``: the policy is in the
constructor, sparsity is logged, only the public Trainer API is used, and the state a resumed fit
needs rides in the checkpoint (the attributes a class declares in ``state_attributes``).

A strategy trains the net at one or more *levels* of sparsity. This class keeps the one tracker of
a level's best validation (:class:`~lthmaml.tracking.BestWeights`, whose count of validations
without improvement is what ``patience`` reads) and the one record path: a level's record,
``rounds/round_XX/{mask.safetensors, metrics.json, model.ckpt}`` (one
:class:`~lthmaml.rounds.RoundRecord` schema), holds the level's best weights and masks
(``keeps = "best"``, restored first) or its last ones, plus what the strategy's :meth:`details`
add. When levels begin and end is the schedule's (:mod:`callbacks.schedule`), or the fit's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lthmaml import rewiring, sparsity
from lthmaml.errors import ConfigError
from lthmaml.rounds import (
    CHECKPOINT_FILE,
    MASK_FILE,
    Recorded,
    RoundRecord,
    round_dir,
    round_table,
    write_metrics,
)
from lthmaml.sparsity import Scope
from lthmaml.tracking import BestWeights

MASK, BUFFER = "mask:", "buffer:"
"""The prefixes of the masks and of the buffers (BatchNorm's running statistics) among a
best-weights snapshot's entries."""


class PruningCallback(Callback):
    """Base class of the pruning strategies.

    Args:
        scope: rank scores over all layers together (``global``) or within each layer.
        exclude: weights never pruned, by parameter name (``net.head.weight``) or layer name
            (``net.head``: all its prunable weights).
        layer_rates: weights (or layers) pruned on their own at a multiple of the rate
            (``{net.head: 0.5}`` prunes the output layer at half rate, as the LTH papers do).
        monitor, mode: the validation metric a level is judged by (``val/acc_post`` with ``max``
            for MAML classification, ``val/loss_post`` with ``min`` for regression, ``val/acc`` for
            the supervised Classifier). Default: the ModelCheckpoint's monitor and mode.
        test_each_round: after the fit, test every recorded level (its ``model.ckpt``) on the test
            split with ``trainer.test`` and keep the test metrics in its record: every sparsity
            level on the same fixed meta-test tasks, for the accuracy-vs-sparsity curve.
        patience: end a level's training when this many validations in a row did not improve on
            its best ``monitor`` value (by more than ``min_delta``), as ``EarlyStopping`` does, so
            each level trains to convergence; its maximum length stays the strategy's. None: no
            plateau rule. Only for the strategies with levels to end (``plateaus``).
        min_delta: the margin a validation must beat the level's best by to count as improving.
    """

    keeps: ClassVar[Recorded] = "last"
    """What a level's record holds: the weights (and masks) of its best validation by ``monitor``,
    or the last ones it trained."""
    plateaus: ClassVar[bool] = False
    """Whether this strategy's levels can end on a validation plateau (``patience``)."""
    state_attributes: ClassVar[tuple[str, ...]] = (
        "history",
        "pruning_steps",
        "monitor",
        "mode",
        "last_validation",
        "last_val_metrics",
        "best",
        "level_start_step",
    )
    """The attributes a resumed fit needs; ``state_dict`` saves them (tensors on the CPU)."""

    def __init__(
        self,
        scope: Scope = "global",
        exclude: Sequence[str] = (),
        layer_rates: Optional[Mapping[str, float]] = None,
        monitor: Optional[str] = None,
        mode: Optional[Literal["min", "max"]] = None,
        test_each_round: bool = False,
        patience: Optional[int] = None,
        min_delta: float = 0.0,
    ) -> None:
        name = type(self).__name__
        if monitor is not None and mode not in ("min", "max"):
            raise ConfigError(f"{name}: set mode (max or min) for monitor '{monitor}'")
        if patience is not None and (isinstance(patience, bool) or patience < 1):
            raise ConfigError(f"{name}.patience must be >= 1 (validations) or null, got {patience!r}")
        if patience is not None and not self.plateaus:
            raise ConfigError(f"{name}.patience: this strategy has no rounds to end on a plateau")
        if not min_delta >= 0:
            raise ConfigError(f"{name}.min_delta must be >= 0, got {min_delta!r}")
        self.scope = scope
        self.exclude = tuple(exclude)
        self.layer_rates = dict(layer_rates or {})
        self.monitor, self.mode = monitor, mode
        self.test_each_round = test_each_round
        self.patience, self.min_delta = patience, float(min_delta)
        self.history: list[dict[str, Any]] = []
        self.pruning_steps = 0
        """Pruning events applied so far: the level the net is at, the ``pruning_step`` of its record."""
        self.best = BestWeights(monitor or "", mode or "max", self.min_delta)
        """The current level's best validation (with its weights and masks when ``keeps`` is best)."""
        self.level_start_step: Optional[int] = 0
        """The global step the current level started training at (None: not yet)."""
        self.last_validation: Optional[tuple[int, int]] = None
        """(global step, epoch) of the last validation: when ``val/*`` in callback_metrics was measured."""
        self.last_val_metrics: dict[str, float] = {}
        """Its ``val/*`` metrics: a record written right after a resume, before any validation, has
        them too (``callback_metrics`` are not in a checkpoint)."""
        self.uses: Optional[dict[str, int]] = None
        """Per prunable weight, how often a forward pass applies it (the FLOPs of a record); None:
        counted from the net's layers where they are known."""

    # ------------------------------------------------------------------ the strategy's hook
    def details(self, pl_module: pl.LightningModule) -> dict[str, Any]:
        """What this strategy's records add to the shared schema (documented in its file)."""
        return {}

    # ------------------------------------------------------------------ engine calls for strategies
    def prunable(self, pl_module: pl.LightningModule) -> list[str]:
        """The names of the weights this strategy prunes."""
        return sparsity.prunable(pl_module, self.exclude)

    def rates(self, pl_module: pl.LightningModule) -> dict[str, float]:
        """``layer_rates`` by weight name."""
        names = self.prunable(pl_module)
        return {
            name: rate
            for key, rate in self.layer_rates.items()
            for name in names
            if sparsity.is_named(key, name)
        }

    def prune(
        self,
        pl_module: pl.LightningModule,
        scores: Mapping[str, Tensor],
        fraction: float,
        level: Optional[int] = None,
    ) -> None:
        """Remove ``fraction`` of the remaining weights with the lowest ``scores`` (with ``level=r``:
        up to ``1 - (1 - fraction) ** r`` of all of them; :func:`lthmaml.sparsity.prune_lowest`)."""
        masks = sparsity.prune_lowest(
            sparsity.masks_of(pl_module, list(scores)),
            scores,
            fraction,
            self.scope,
            self.rates(pl_module),
            level,
        )
        sparsity.load_masks(pl_module, masks)

    @staticmethod
    def reduce_scores(trainer: pl.Trainer, scores: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Sum scores accumulated from this rank's tasks over all ranks (identity in one process).

        Under DDP each rank sees only its shard of every meta-batch, so gradient-based sums differ
        between ranks; ranking their total gives every rank the same masks, and the same ones one
        process seeing all the tasks would. Every rank must pass the same names and shapes.
        """
        if trainer.world_size == 1:
            return dict(scores)
        reduce = trainer.strategy.reduce
        return {name: reduce(scores[name].clone(), reduce_op="sum") for name in sorted(scores)}

    @staticmethod
    def reduce_count(trainer: pl.Trainer, count: int) -> int:
        """A count kept per rank (tasks scored), summed over all ranks for the round records."""
        if trainer.world_size == 1:
            return count
        total = trainer.strategy.reduce(
            torch.tensor(float(count), device=trainer.strategy.root_device), reduce_op="sum"
        )
        return int(total.item())

    @staticmethod
    def run_dir(trainer: pl.Trainer) -> Path:
        return Path(trainer.log_dir or trainer.default_root_dir)

    @staticmethod
    def last_epoch(trainer: pl.Trainer) -> bool:
        """Whether the epoch now ending is the fit's last (by max_epochs, max_steps or a stop)."""
        max_epochs, max_steps = trainer.max_epochs, trainer.max_steps
        return (
            trainer.should_stop
            or (max_epochs not in (None, -1) and trainer.current_epoch + 1 >= max_epochs)
            or (max_steps not in (None, -1) and trainer.global_step >= max_steps)
        )

    # ------------------------------------------------------------------ the level's best validation
    def monitored(self, trainer: pl.Trainer) -> float:
        """The value of ``monitor`` at the validation just run (a ConfigError if it is not logged)."""
        if self.monitor not in trainer.callback_metrics:
            raise ConfigError(
                f"{type(self).__name__}.monitor '{self.monitor}' is not logged; "
                f"logged: {sorted(trainer.callback_metrics)}"
            )
        return float(trainer.callback_metrics[self.monitor])

    def tracking(self, pl_module: pl.LightningModule) -> bool:
        """Whether this validation counts for the level (something reads the tracker)."""
        return self.monitor is not None and (self.keeps == "best" or self.patience is not None)

    def track(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Compare this validation with the level's best; keep the weights and masks if it is."""

        def snapshot() -> dict[str, Tensor]:
            if self.keeps != "best":
                return {}
            masks = {MASK + name: mask for name, mask in sparsity.masks_of(pl_module).items()}
            buffers = {BUFFER + name: value.detach().clone() for name, value in _statistics(pl_module)}
            return {**sparsity.snapshot(pl_module), **masks, **buffers}

        self.best.update(
            self.monitored(trainer),
            snapshot,
            step=trainer.global_step,
            epoch=trainer.current_epoch,
            metrics=validation_metrics(trainer),
        )

    @property
    def plateaued(self) -> bool:
        """Whether ``patience`` validations in a row did not improve on the level's best."""
        return self.patience is not None and self.best.validations_since_best >= self.patience

    # ------------------------------------------------------------------ the record
    @property
    def level_recorded(self) -> bool:
        """Whether the current level (``pruning_steps``) has its record already."""
        return bool(self.history) and self.history[-1]["pruning_step"] == self.pruning_steps

    def record(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        stopped_early: Optional[bool] = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """Record the current level: with ``keeps = "best"`` its best validation's weights and masks
        are restored first. ``fields`` are further :class:`~lthmaml.rounds.RoundRecord` fields;
        a ``details`` among them joins the strategy's :meth:`details`."""
        best = self.best if self.keeps == "best" and self.best.state is not None else None
        validation: dict[str, Any] = {}
        if best is not None:
            state = best.state
            sparsity.load_masks(
                pl_module, {n[len(MASK) :]: v for n, v in state.items() if n.startswith(MASK)}
            )
            sparsity.rewind(pl_module, {n: v for n, v in state.items() if ":" not in n})
            with torch.no_grad():  # the statistics the best weights were validated with
                for name, value in _statistics(pl_module):
                    value.copy_(state[BUFFER + name])
            val_metrics = best.metrics
            validation = {"val_step": best.step, "val_epoch": best.epoch}
        else:
            val_metrics = self.last_val_metrics or validation_metrics(trainer)
            if self.last_validation is not None:
                validation = {"val_step": self.last_validation[0], "val_epoch": self.last_validation[1]}
        report = sparsity.sparsity_report(pl_module)
        flops = rewiring.forward_multiply_adds(pl_module, uses=self.uses) or (None, None)
        details = {**self.details(pl_module), **fields.pop("details", {})}
        record = RoundRecord(
            round=len(self.history),
            sparsity=report.sparsity,
            pruning_step=self.pruning_steps,
            global_step=trainer.global_step,
            epoch=trainer.current_epoch,
            recorded="best" if best is not None else "last",
            monitor=self.monitor,
            val=val_metrics.get(self.monitor) if self.monitor else None,
            val_metrics=dict(val_metrics),
            round_start_step=self.level_start_step,
            stopped_early=stopped_early,
            forward_flops=flops[0],
            dense_forward_flops=flops[1],
            details=details,
            **{**validation, **fields},
        ).as_dict()
        self.history.append(record)
        folder = round_dir(self.run_dir(trainer), record["round"])
        if trainer.is_global_zero:
            folder.mkdir(parents=True, exist_ok=True)
            sparsity.save_masks(folder / MASK_FILE, sparsity.masks_of(pl_module), record)
            write_metrics(folder, record, report.as_dict()["layers"])
        trainer.save_checkpoint(folder / CHECKPOINT_FILE, weights_only=False)  # optimizer, callbacks too
        log_record(trainer, record, trainer.global_step)
        return record

    def records_at_fit_end(self, pl_module: pl.LightningModule) -> bool:
        """Whether the level the fit ends in is recorded when it ends (if it has no record yet)."""
        return False

    def final_record(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The record of the level the fit ended in."""
        self.record(trainer, pl_module, stopped_early=False if self.plateaus else None)

    def record_at_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.records_at_fit_end(pl_module) and not self.level_recorded:
            self.final_record(trainer, pl_module)

    # ------------------------------------------------------------------ testing each level, after fit
    def test_rounds(
        self, trainer: pl.Trainer, model: pl.LightningModule, datamodule: Optional[pl.LightningDataModule]
    ) -> None:
        """Test every recorded level not tested yet (``test_each_round``) with ``trainer.test``.

        Runs after ``fit`` (the ``lthmaml`` CLI calls it): each ``rounds/round_XX/model.ckpt`` is the
        net as recorded, so its test numbers are the level's. ``trainer.test`` restores the
        callbacks' states from that checkpoint too, so every callback's state is put back after
        each test; a level tested before (a resumed run) is not tested again.
        """
        if not self.test_each_round:
            return
        for index, record in enumerate(self.history):
            if record.get("test_metrics"):
                continue
            states = [callback.state_dict() for callback in trainer.callbacks]
            folder = round_dir(self.run_dir(trainer), index)
            try:
                outputs = trainer.test(
                    model, datamodule=datamodule, ckpt_path=str(folder / CHECKPOINT_FILE), verbose=False
                )
            finally:
                for callback, state in zip(trainer.callbacks, states):
                    callback.load_state_dict(state)
            metrics = {name: float(value) for output in outputs for name, value in output.items()}
            name = "test" + self.monitor[len("val") :] if (self.monitor or "").startswith("val") else None
            record.update(test=metrics.get(name), test_metric=name, test_metrics=metrics)
            self.history[index] = record
            if trainer.is_global_zero:
                write_metrics(folder, record)
            log_record(trainer, {"round": index, "test": record["test"]}, record["global_step"])
        rank_zero_info(round_table(self.history))

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        names = self.prunable(pl_module)  # fail early, naming the weights, if exclude is wrong
        unknown = sorted(key for key in self.layer_rates if not any(sparsity.is_named(key, n) for n in names))
        if unknown:  # ... and if layer_rates is (its names differ between nets: net.head, net.net.4)
            raise ConfigError(
                f"{type(self).__name__}: layer_rates names {unknown}, which are not prunable weights of "
                f"{type(pl_module).__name__}; choose from {names}"
            )
        dense = sparsity.left_dense(pl_module)
        if dense and stage == "fit":
            rank_zero_info(f"{type(self).__name__}: left dense (not a conv or linear weight): {dense}")
        if self.monitor is None and trainer.checkpoint_callback is not None:
            self.monitor = trainer.checkpoint_callback.monitor
            self.mode = trainer.checkpoint_callback.mode
        self.best.monitor, self.best.mode = self.monitor or "", self.mode or "max"
        if self.patience is not None and self.monitor is None:
            raise ConfigError(
                f"{type(self).__name__}.patience needs a monitored metric: set monitor and mode "
                "(or a ModelCheckpoint monitor)"
            )

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.last_validation = (trainer.global_step, trainer.current_epoch)
        self.last_val_metrics = validation_metrics(trainer)
        if self.tracking(pl_module):
            self.track(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.last_epoch(trainer):  # before ModelCheckpoint's hook: the fit's last.ckpt holds it
            self.record_at_fit_end(trainer, pl_module)
        pl_module.log("sparsity", sparsity.sparsity_report(pl_module).sparsity, sync_dist=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A stop the epoch-end hook could not see yet: EarlyStopping decides after it. (last.ckpt was
        # written before this record: a fit killed now and resumed trains one more epoch, then
        # records again.)
        self.record_at_fit_end(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rank_zero_info(
            f"{type(self).__name__}: final sparsity\n{sparsity.sparsity_report(pl_module).table()}"
        )
        if self.history:
            rank_zero_info(round_table(self.history))

    def state_dict(self) -> dict[str, Any]:
        return {name: _on_cpu(getattr(self, name)) for name in self.state_attributes}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for name in self.state_attributes:
            current = getattr(self, name, None)
            if hasattr(current, "load_state_dict"):  # a stateful helper (the best-weights tracker)
                current.load_state_dict(state_dict[name])
            else:
                setattr(self, name, state_dict[name])


def _statistics(pl_module: pl.LightningModule) -> list[tuple[str, Tensor]]:
    """The module's buffers other than the masks: what a net computes with besides its weights."""
    return [(name, value) for name, value in pl_module.named_buffers() if not name.startswith("masks.")]


def validation_metrics(trainer: pl.Trainer) -> dict[str, float]:
    """The ``val/*`` scalars of the last validation."""
    return {
        key: float(value)
        for key, value in trainer.callback_metrics.items()
        if key.startswith("val/") and value.numel() == 1
    }


def log_record(trainer: pl.Trainer, record: Mapping[str, Any], step: int) -> None:
    if trainer.logger is not None:
        numbers = {k: float(v) for k, v in record.items() if isinstance(v, (int, float))}
        trainer.logger.log_metrics({f"prune/{k}": v for k, v in numbers.items()}, step=step)


def _on_cpu(value: Any) -> Any:
    """Tensors (also inside dicts and lists) detached on the CPU, so a checkpoint loads anywhere."""
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if hasattr(value, "state_dict"):
        return _on_cpu(value.state_dict())
    if isinstance(value, dict):
        return {key: _on_cpu(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_on_cpu(item) for item in value]
    return value
