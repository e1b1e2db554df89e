"""MAML (Finn et al. 2017) as a LightningModule, with the inner loop through ``higher``.

Meta-training adapts and back-propagates one task at a time, accumulating the meta-gradient
(manual optimization): the graph of one task is freed before the next is built, so peak memory
does not grow with the meta-batch size.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Literal, Optional, Union

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from lthmaml.data.tasks import TaskBatch
from lthmaml.errors import ConfigError, TrainingError, non_finite_message
from lthmaml.masks import mask_gradients
from lthmaml.meta.distill import Distillable
from lthmaml.meta.episodic import EpisodicLearner
from lthmaml.meta.functional import FunctionalInnerLoop, activation_bytes
from lthmaml.meta.higher_loop import Adapted
from lthmaml.meta.metrics import TaskResult, task_accuracy, task_loss


class MAML(Distillable, EpisodicLearner):
    """Model-Agnostic Meta-Learning.

    Args:
        net: the network to meta-learn: any ``nn.Module`` (stock layers, a user's own).
        inner_lr: the inner-loop SGD step size (alpha in the paper).
        inner_steps: inner steps during meta-training.
        eval_inner_steps: inner steps at validation, test and predict (MAML evaluates with more).
        first_order: drop second derivatives (FOMAML): the meta-gradient is the query gradient
            at the adapted weights.
        learn_inner_lr: learn one inner learning rate per parameter tensor (Meta-SGD / MAML++).
        inner_loop: ``higher`` (one task at a time through ``higher``'s functional copies) or
            ``func`` (``torch.func``: ``task_chunk`` tasks adapted at once with ``vmap``; see
            :mod:`lthmaml.meta.functional`). Both give the same meta-gradients and evaluations.
        task_chunk: tasks adapted together by the ``func`` loop; the meta-gradient is accumulated
            chunk by chunk, so peak memory grows with the chunk, not with the meta-batch. ``auto``:
            one task on a CPU; on an accelerator as many tasks as keep the chunk's activations
            within ``chunk_memory_mb`` (measured on the first batch of each shape). A chunk of one
            task runs without ``vmap``, on the modules' own kernels and plain autograd, in about
            the memory of the ``higher`` loop.
        chunk_memory_mb: the activation budget of an ``auto`` chunk.
        optimizer, lr_scheduler: the meta-optimizer, configurable the LightningCLI way.
        gradient_clip_val: clip the meta-gradient norm (manual optimization does not use the
            Trainer's clipping).

    With a ``distillation`` attached (:mod:`lthmaml.meta.distill`), each task's meta-loss adds its
    term between the adapted query outputs and the teacher's (the teacher adapted to the task by
    its ``eval_inner_steps``, as it is validated).
    """

    def __init__(
        self,
        net: nn.Module,
        inner_lr: float = 0.4,
        inner_steps: int = 1,
        eval_inner_steps: int = 3,
        first_order: bool = False,
        learn_inner_lr: bool = False,
        inner_loop: Literal["higher", "func"] = "higher",
        task_chunk: Union[int, Literal["auto"]] = "auto",
        chunk_memory_mb: float = 64.0,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        gradient_clip_val: Optional[float] = None,
    ) -> None:
        super().__init__(net, optimizer, lr_scheduler)
        self.save_portable_hyperparameters()
        if inner_steps < 1 or eval_inner_steps < 0:
            raise ConfigError(
                f"model.init_args.inner_steps must be >= 1 (got {inner_steps}) and "
                f"model.init_args.eval_inner_steps >= 0 (got {eval_inner_steps})"
            )
        if not inner_lr > 0:  # NaN too; torch's SGD would reject a negative rate with a traceback
            raise ConfigError(f"model.init_args.inner_lr must be > 0, got {inner_lr}")
        if first_order and learn_inner_lr:
            raise ConfigError(
                "model.learn_inner_lr needs second-order meta-gradients: set model.first_order: false"
            )
        if inner_loop not in ("higher", "func"):
            raise ConfigError(f"model.init_args.inner_loop must be 'higher' or 'func', got {inner_loop!r}")
        if task_chunk != "auto" and (
            isinstance(task_chunk, bool) or not isinstance(task_chunk, int) or task_chunk < 1
        ):
            raise ConfigError(f"model.init_args.task_chunk must be >= 1 task or 'auto', got {task_chunk!r}")
        if not chunk_memory_mb > 0:
            raise ConfigError(f"model.init_args.chunk_memory_mb must be > 0, got {chunk_memory_mb}")
        self.automatic_optimization = False
        self.inner_loop = inner_loop
        self.task_chunk = task_chunk
        self.chunk_memory_mb = chunk_memory_mb
        self._task_bytes: dict[tuple, float] = {}
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.eval_inner_steps = eval_inner_steps
        self.first_order = first_order
        self.gradient_clip_val = gradient_clip_val
        self.inner_lrs = (
            nn.ParameterList(nn.Parameter(torch.tensor(float(inner_lr))) for _ in net.parameters())
            if learn_inner_lr
            else None
        )

    def setup(self, stage: str) -> None:
        """Catch a net that does not fit the tasks (N-way, image size) before torch does, and a
        multi-process strategy whose gradient exchange this module does not know."""
        strategy = self.trainer.strategy
        ddp = isinstance(strategy, DDPStrategy) and not isinstance(strategy, DeepSpeedStrategy)
        if stage == "fit" and self.trainer.world_size > 1 and not ddp:
            raise ConfigError(
                f"MAML averages its meta-gradient over ranks for DDP strategies only (ddp, ddp_spawn, ...), "
                f"not {type(strategy).__name__}: set trainer.strategy: ddp"
            )
        self.check_data_fits(self.trainer.datamodule)

    def adaptation_summary(self) -> str:
        return f"{self.eval_inner_steps} inner steps"

    # ------------------------------------------------------------------ the inner loop
    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int, track_higher_grads: bool) -> Adapted:
        """A context manager yielding the ``higher`` functional net adapted to one support set.

        With ``track_higher_grads`` the adapted weights stay a differentiable function of the
        meta-parameters (second-order MAML); without it they are fresh leaves.
        """
        rates = list(self.inner_lrs) if self.inner_lrs is not None else None
        return Adapted(
            self.net, self.inner_lr, rates, support_x, support_y, steps, track_higher_grads, self.net_masks()
        )

    def meta_train_task(self, task: TaskBatch, scale: float, teacher: Optional[Tensor] = None) -> TaskResult:
        """Adapt to one task and back-propagate ``scale`` times its query loss into ``.grad``
        (plus the distillation term towards the ``teacher``'s query logits, when given).

        Only post-adaptation metrics: a pre-adaptation pass would cost a forward per task in
        the hot loop, and validation reports it anyway.
        """
        with self.adapt(task.support_x, task.support_y, self.inner_steps, not self.first_order) as adapted:
            logits = adapted(task.query_x)
            loss = task_loss(logits, task.query_y)
            objective = loss if teacher is None else loss + self.distillation.loss(logits, teacher)
            self._backward_meta_loss(objective * scale, adapted)
        return TaskResult(
            loss_pre=None, loss_post=loss.detach(), acc_post=task_accuracy(logits.detach(), task.query_y)
        )

    def meta_train(self, batch: TaskBatch, scale: float) -> list[TaskResult]:
        """Back-propagate ``scale`` times each task's query loss (and distillation term, with a
        teacher attached) into ``.grad``, by the chosen loop."""
        teacher = self.teacher_logits(batch)
        if self.inner_loop == "higher":
            return [
                self.meta_train_task(batch.task(i), scale, None if teacher is None else teacher[i])
                for i in range(batch.num_tasks)
            ]
        results = []
        done = 0
        for chunk in self.chunks(batch, self.inner_steps):
            outputs = self.functional_loop().chunk_outputs(
                chunk.support_x, chunk.support_y, chunk.query_x, self.inner_steps, self.first_order
            )
            losses = torch.stack([task_loss(out, y) for out, y in zip(outputs, chunk.query_y)])
            objective = losses.sum()
            if teacher is not None:
                targets = teacher[done : done + len(outputs)]
                objective = objective + sum(map(self.distillation.loss, outputs, targets))
            done += len(outputs)
            self.manual_backward(objective * scale)
            for out, loss, y in zip(outputs.detach(), losses.detach(), chunk.query_y):
                results.append(TaskResult(loss_pre=None, loss_post=loss, acc_post=task_accuracy(out, y)))
        return results

    def chunks(self, batch: TaskBatch, steps: int) -> Iterator[TaskBatch]:
        size = self.chunk_size(batch, steps)
        for start in range(0, batch.num_tasks, size):
            yield TaskBatch(*(field[start : start + size] for field in batch))

    def chunk_size(self, batch: TaskBatch, steps: int) -> int:
        """``task_chunk``, or under ``auto``: one task on a CPU, where batching tasks under ``vmap``
        costs more than it saves (its batched kernels, BatchNorm written out; see bench/README.md);
        elsewhere the tasks whose activations fit ``chunk_memory_mb``.

        A task keeps, for the meta-gradient, its ``steps`` support passes and its query pass; their
        activations are counted from one forward pass of a support set (every module's output),
        times three for what the second-order backward keeps besides them."""
        if self.task_chunk != "auto":
            return self.task_chunk
        if batch.support_x.device.type == "cpu":
            return 1
        key = (tuple(batch.support_x.shape[1:]), tuple(batch.query_x.shape[1:]), steps)
        if key not in self._task_bytes:
            per_example = activation_bytes(self.net, batch.support_x[0])
            examples = batch.support_x.shape[1] * steps + batch.query_x.shape[1]
            self._task_bytes[key] = 3 * per_example * examples
        budget = self.chunk_memory_mb * 2**20
        return max(1, min(batch.num_tasks, int(budget // self._task_bytes[key])))

    def functional_loop(self) -> FunctionalInnerLoop:
        names = [name for name, _ in self.net.named_parameters()]
        rates = (
            dict(zip(names, self.inner_lrs))
            if self.inner_lrs is not None
            else dict.fromkeys(names, self.inner_lr)
        )
        return FunctionalInnerLoop(self.net, rates, task_loss, self.net_masks())

    def adapted_outputs(self, batch: TaskBatch, steps: int) -> list[Tensor]:
        """Each task's query outputs after ``steps`` of adaptation, detached (no meta-gradient)."""
        if self.inner_loop == "func":
            return self.functional_outputs(batch, steps)
        outputs = []
        for i in range(batch.num_tasks):
            task = batch.task(i)
            with self.adapt(task.support_x, task.support_y, steps, False) as adapted:
                outputs.append(adapted(task.query_x).detach())
        return outputs

    def functional_outputs(self, batch: TaskBatch, steps: int) -> list[Tensor]:
        """:meth:`adapted_outputs` through ``torch.func``, whatever ``inner_loop`` is."""
        loop = self.functional_loop()
        return [
            out
            for chunk in self.chunks(batch, steps)
            for out in loop.evaluate_outputs(chunk.support_x, chunk.support_y, chunk.query_x, steps)
        ]

    def query_logits(self, batch: TaskBatch) -> list[Tensor]:
        """The query outputs after ``eval_inner_steps`` of adaptation, as validation scores them.

        Always through ``torch.func``: it differentiates the support loss w.r.t. whatever weights
        it is given, so a frozen teacher (``requires_grad`` off) adapts too; ``higher`` only adapts
        weights that require a gradient. Both loops agree to 1e-5.
        """
        return self.functional_outputs(batch, self.eval_inner_steps)

    def evaluate_batch(self, batch: TaskBatch) -> list[TaskResult]:
        """Query metrics before and after ``eval_inner_steps`` of adaptation (no meta-gradient)."""
        with torch.no_grad():
            pre = [self.net(batch.query_x[i]) for i in range(batch.num_tasks)]
        post = self.adapted_outputs(batch, self.eval_inner_steps)
        return [
            TaskResult(
                loss_pre=task_loss(before, y),
                loss_post=task_loss(after, y),
                acc_pre=task_accuracy(before, y),
                acc_post=task_accuracy(after, y),
            )
            for before, after, y in zip(pre, post, batch.query_y)
        ]

    def _backward_meta_loss(self, loss: Tensor, adapted: nn.Module) -> None:
        if not self.first_order:
            self.manual_backward(loss)
            return
        # First-order: the query gradient at the adapted weights is the meta-gradient, scaled as
        # manual_backward would scale it under 16-bit mixed precision (the optimizer step unscales).
        scaler = self.grad_scaler
        grads = torch.autograd.grad(
            loss if scaler is None else scaler.scale(loss), list(adapted.parameters())
        )
        for param, grad in zip(self.net.parameters(), grads):
            param.grad = grad if param.grad is None else param.grad + grad

    def task_losses(self, batch: TaskBatch, adapted: bool = False) -> Iterator[Tensor]:
        """One loss per task for pruning criteria, differentiable w.r.t. the meta-parameters.

        ``adapted=False``: the support loss at the meta-parameters (the meta-gradient pruning
        criterion's first-order task gradient). ``adapted=True``: the query loss after the
        training inner loop, without second-order graph: the adapted weights are fresh leaves, so
        only the query's forward pass, the last one, reaches what a criterion hooks into (Taylor
        pruning's gates).
        """
        loop = self.functional_loop() if adapted else None
        for i in range(batch.num_tasks):
            task = batch.task(i)
            if loop is None:
                yield task_loss(self.net(task.support_x), task.support_y)
                continue
            # The query pass runs on the net's own modules, so hooks a criterion registers see it.
            weights = loop.adapted_params(task.support_x, task.support_y, self.inner_steps)
            yield task_loss(loop.forward(weights, task.query_x), task.query_y)

    # ------------------------------------------------------------------ Lightning hooks
    def training_step(self, batch: TaskBatch, batch_idx: int) -> Tensor:
        optimizer = self.optimizers()
        optimizer.zero_grad()
        scale = 1.0 / batch.num_tasks
        with self._no_ddp_sync():
            results = self.meta_train(batch, scale)
        if self.trainer.world_size > 1:
            self._average_meta_gradient(batch.num_tasks)
        self._check_finite(results)
        mask_gradients(self)  # before the clip: a pruned entry's gradient is no part of its norm
        if self.gradient_clip_val is not None:
            if self.grad_scaler is not None:  # clip the true gradient; the step knows it is unscaled
                self.grad_scaler.unscale_(optimizer.optimizer)
            self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip_val)
        optimizer.step()
        self._log_results("train", results)
        return torch.stack([r.loss_post for r in results]).mean()

    @property
    def grad_scaler(self) -> Optional[torch.amp.GradScaler]:
        """The loss scaler of 16-bit mixed precision (None otherwise)."""
        return getattr(self.trainer.precision_plugin, "scaler", None) if self._trainer is not None else None

    def _check_finite(self, results: list[TaskResult]) -> None:
        """Stop before a NaN or inf meta-gradient reaches the weights: Adam would spread it to every
        parameter and each later checkpoint, and the fit would go on reporting ``nan``.

        Under a loss scaler only the losses are checked: an inf in the scaled gradient is how the
        scaler finds its scale, and its step skips that update by design.

        Under DDP the verdict is agreed over ranks (one scalar all-reduce), so every rank stops at
        the same step instead of one raising while the others wait in the next collective.
        """
        scaled = self.grad_scaler is not None
        grads = [] if scaled else [p.grad for p in self.parameters() if p.grad is not None]
        losses = torch.stack([r.loss_post for r in results])
        bad_losses = (~losses.isfinite()).sum().float()
        bad_grads = sum((~g.isfinite()).sum() for g in grads) if grads else torch.zeros(())
        bad = torch.stack([bad_losses, torch.as_tensor(bad_grads, dtype=torch.float32, device=losses.device)])
        if self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce(bad, reduce_op="sum")
        if bool(bad.sum() > 0):
            what = "meta-loss" if bool(bad[0] > 0) else "meta-gradient"
            raise TrainingError(
                non_finite_message(
                    what,
                    self.trainer.global_step,
                    self.trainer.current_epoch,
                    "model.init_args.inner_lr or the optimizer lr",
                )
            )

    def _no_ddp_sync(self) -> AbstractContextManager:
        """Keep DDP's reducer out of the per-task backward passes.

        Lightning routes ``training_step`` through the DDP wrapper, and ``manual_backward`` would
        let the reducer all-reduce after every task's backward (first-order gradients, written
        with ``autograd.grad``, it would miss altogether). ``_average_meta_gradient`` replaces it.
        """
        wrapper = self.trainer.strategy.model
        return wrapper.no_sync() if isinstance(wrapper, DistributedDataParallel) else nullcontext()

    def _average_meta_gradient(self, local_tasks: int) -> None:
        """Make ``.grad`` on every rank the meta-gradient over all ranks' tasks, in one all-reduce.

        Each rank holds the mean over its ``local_tasks``; the sum over ranks of ``local_tasks``
        times that, divided by the total task count, is the mean over the whole meta-batch, which
        is what one process computes. A parameter no rank has a gradient for keeps ``grad=None``
        (the optimizer skips it, as in one process).
        """
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            return
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        has_grad = [float(p.grad is not None) for p in params]
        flat = torch.cat(
            [g.flatten() * local_tasks for g in grads] + [grads[0].new_tensor(has_grad + [local_tasks])]
        )
        flat = self.trainer.strategy.reduce(flat, reduce_op="sum")
        sums, has_grad, total_tasks = flat[: -len(params) - 1], flat[-len(params) - 1 : -1], flat[-1]
        for param, grad, present in zip(params, sums.split([p.numel() for p in params]), has_grad.tolist()):
            param.grad = grad.view_as(param) / total_tasks if present else None

    def on_train_epoch_end(self) -> None:
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()

    def _evaluate(self, batch: TaskBatch, stage: str) -> list[TaskResult]:
        if torch.is_inference_mode_enabled():
            raise ConfigError(
                "MAML adapts with gradients during evaluation: set trainer.inference_mode: false"
            )
        with torch.enable_grad():
            results = self.evaluate_batch(batch)
        self._log_results(stage, results)
        return results

    def predict_step(self, batch: TaskBatch, batch_idx: int) -> Tensor:
        """Adapted query predictions: class probabilities, or regression outputs."""
        with torch.enable_grad():
            outputs = torch.stack(self.adapted_outputs(batch, self.eval_inner_steps))
        return outputs.softmax(-1) if batch.query_y.dtype == torch.int64 else outputs
