"""What every pruning callback does the same way, so a strategy file holds only its method.

Written after Lightning's own ``ModelPruning``: masks are re-applied after every optimizer step,
sparsity is logged, and the callback's state rides in the checkpoint so a resumed fit continues
the schedule. Round bookkeeping (``rounds/round_XX/{mask.safetensors, metrics.json, model.ckpt}``)
and the per-round table printed at fit end live here too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lthmaml import sparsity
from lthmaml.errors import ConfigError
from lthmaml.sparsity import Scope


class PruningCallback(Callback):
    """Base class of the pruning strategies.

    Args:
        scope: rank scores over all layers together (``global``) or within each layer.
        exclude: names of mask-aware layers never pruned (e.g. ``net.head``).
        layer_rates: layers pruned on their own at a multiple of the rate (``{net.head: 0.5}``
            prunes the output layer at half rate, as the LTH papers do).
        test_each_round: run the trainer's test loop whenever a round is recorded (on the weights
            recorded) and keep the test metrics in the round: every sparsity level tested on the
            same fixed meta-test tasks, for the accuracy-vs-sparsity curve.
    """

    monitor: Optional[str] = None  # the validation metric whose test counterpart a round records

    def __init__(
        self,
        scope: Scope = "global",
        exclude: Sequence[str] = (),
        layer_rates: Optional[Mapping[str, float]] = None,
        test_each_round: bool = False,
    ) -> None:
        self.scope = scope
        self.exclude = tuple(exclude)
        self.layer_rates = dict(layer_rates or {})
        self.test_each_round = test_each_round
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ engine calls for strategies
    def prunable(self, pl_module: pl.LightningModule) -> dict[str, sparsity.MaskedMixin]:
        return sparsity.prunable_layers(pl_module, self.exclude)

    def prune(
        self,
        pl_module: pl.LightningModule,
        scores: Mapping[str, Tensor],
        fraction: float,
        rounds: Optional[int] = None,
    ) -> None:
        """Remove ``fraction`` of the remaining weights with the lowest ``scores``.

        With ``rounds=r``, prune up to ``1 - (1 - fraction) ** r`` of all weights instead (round r of
        an iterative schedule; see :func:`lthmaml.sparsity.prune_lowest`).
        """
        masks = sparsity.prune_lowest(
            sparsity.masks_of(pl_module), scores, fraction, self.scope, self.layer_rates, rounds
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
    def reset_optimizers(trainer: pl.Trainer) -> None:
        """Fresh optimizer and scheduler state, as a new training round starts from scratch."""
        trainer.strategy.setup_optimizers(trainer)

    @staticmethod
    def run_dir(trainer: pl.Trainer) -> Path:
        return Path(trainer.log_dir or trainer.default_root_dir)

    def write_round(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, metrics: dict[str, Any]
    ) -> Path:
        """Record a finished round: masks, metrics JSON and a checkpoint under ``rounds/round_XX``."""
        if self.test_each_round:
            metrics = {**metrics, **self.test_metrics(trainer)}
        report = sparsity.sparsity_report(pl_module)
        record = {"round": len(self.history), "sparsity": report.sparsity, **metrics}
        self.history.append(record)
        folder = self.run_dir(trainer) / "rounds" / f"round_{record['round']:02d}"
        if trainer.is_global_zero:
            folder.mkdir(parents=True, exist_ok=True)
            sparsity.save_masks(folder / "mask.safetensors", sparsity.masks_of(pl_module), record)
            (folder / "metrics.json").write_text(
                json.dumps({**record, "layers": report.as_dict()["layers"]}, indent=2)
            )
        trainer.save_checkpoint(folder / "model.ckpt", weights_only=False)  # optimizer, callbacks too
        if trainer.logger is not None:
            trainer.logger.log_metrics(
                {f"prune/{k}": float(v) for k, v in record.items() if isinstance(v, (int, float))},
                step=trainer.global_step,
            )
        return folder

    def test_metrics(self, trainer: pl.Trainer) -> dict[str, Any]:
        """Test metrics of the current weights; ``test`` is the monitored metric's test counterpart
        (the callback's ``monitor``, else the ModelCheckpoint's: ``val/acc_post`` -> ``test/acc_post``)."""
        metrics = run_test_loop(trainer)
        checkpoint = trainer.checkpoint_callback
        monitor = self.monitor or (checkpoint.monitor if checkpoint is not None else None) or ""
        name = "test" + monitor[len("val") :] if monitor.startswith("val") else None
        return {"test": metrics.get(name), "test_metric": name, "test_metrics": metrics}

    @staticmethod
    def last_epoch(trainer: pl.Trainer) -> bool:
        """Whether the epoch now ending is the fit's last (by max_epochs, max_steps or a stop)."""
        max_epochs, max_steps = trainer.max_epochs, trainer.max_steps
        return (
            trainer.should_stop
            or (max_epochs not in (None, -1) and trainer.current_epoch + 1 >= max_epochs)
            or (max_steps not in (None, -1) and trainer.global_step >= max_steps)
        )

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        layers = self.prunable(pl_module)  # fail early, naming the layers, if exclude is wrong
        unknown = sorted(set(self.layer_rates) - set(layers))
        if unknown:  # ... and if layer_rates is (its names differ between nets: net.head, net.net.4)
            raise ConfigError(
                f"{type(self).__name__}: layer_rates names {unknown}, which are not prunable layers of "
                f"{type(pl_module).__name__}; choose from {sorted(layers)}"
            )

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        sparsity.apply_masks(pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.log("sparsity", sparsity.sparsity_report(pl_module).sparsity, sync_dist=True)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rank_zero_info(
            f"{type(self).__name__}: final sparsity\n{sparsity.sparsity_report(pl_module).table()}"
        )
        if self.history:
            rank_zero_info(round_table(self.history))

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))


def run_test_loop(trainer: pl.Trainer) -> dict[str, float]:
    """The trainer's own test loop, run inside ``fit`` the way Lightning runs validation mid-epoch.

    ``trainer.test`` cannot be nested in ``fit``; this runs the same loop (the module's ``test_step``
    and test hooks, the logged ``test/*`` metrics, which also reach the logger at the current step)
    with the trainer switched to testing and back.
    """
    loop = trainer.test_loop
    if not loop._data_source.is_defined():
        raise ConfigError("test_each_round needs a test_dataloader (in the DataModule)")
    if trainer.datamodule is not None:
        trainer.datamodule.setup("test")
    state_fn, verbose = trainer.state.fn, loop.verbose
    first_loop_iter = trainer._logger_connector._first_loop_iter
    trainer.state.fn, loop.verbose = TrainerFn.TESTING, False
    trainer.testing = True
    try:
        outputs = loop.run()
    finally:
        loop.teardown()
        trainer.state.fn, loop.verbose = state_fn, verbose
        trainer.training = True
        trainer._logger_connector._first_loop_iter = first_loop_iter
    return {name: float(value) for output in outputs for name, value in output.items()}


def round_table(history: Sequence[Mapping[str, Any]]) -> str:
    """The per-round table printed at fit end: every numeric field of each round's record."""
    keys = [k for k in history[0] if isinstance(history[0][k], (int, float))]
    for record in history[1:]:
        keys += [k for k in record if k not in keys and isinstance(record[k], (int, float))]
    widths = [max(12, len(key) + 2) for key in keys]
    lines = ["".join(f"{key:>{width}}" for key, width in zip(keys, widths))]
    for record in history:
        cells = []
        for key, width in zip(keys, widths):
            value = record.get(key, "")
            cells.append(f"{value:>{width}.4f}" if isinstance(value, float) else f"{value!s:>{width}}")
        lines.append("".join(cells))
    return "\n".join(lines)
