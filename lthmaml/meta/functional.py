"""MAML's inner loop with ``torch.func``: ``functional_call`` + ``grad``, ``vmap`` over a chunk of tasks.

The maintained path in PyTorch (``higher`` is archived). A chunk of ``T`` tasks is adapted in one
batched computation: every support forward, inner gradient and query forward runs once for the
chunk, not once per task, which is where the speed over the per-task ``higher`` loop comes from.

What the meta-gradient sees is the same as with ``higher`` (tests compare the two to 1e-5):

* second order: the adapted weights stay a differentiable function of the meta-parameters, and
  ``loss.backward()`` differentiates through the inner ``grad`` (as in torch.func's MAML example);
* first order: the inner loop runs on detached weights and the adapted weights are
  ``theta + (theta' - theta).detach()``, so the meta-gradient is the query gradient at ``theta'``
  and no graph of the support passes is kept;
* learned per-tensor inner rates are closed over, so their meta-gradient flows in second order;
* ``masks`` (by parameter name) multiply each inner gradient: a pruned entry is stored as zero
  and stays zero in every adapted weight; a parametrisation (Powerprop, Top-KAST's forward set)
  is applied to the substituted parameter by ``functional_call``;
* BatchNorm on batch statistics is written out (mean, variance, normalise) inside ``vmap``: the
  fused kernel's double backward is wrong there (``tests/test_inner_loops.py`` pins it); outside
  ``vmap`` every module runs its own kernels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from typing import Optional, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn.modules.batchnorm import _BatchNorm

Params = dict[str, Tensor]
Rates = Mapping[str, Union[float, Tensor]]
Loss = Callable[[Tensor, Tensor], Tensor]


class FunctionalInnerLoop:
    """Adapts ``net`` to tasks by plain SGD steps, functionally.

    Args:
        net: the network; its parameters are the meta-parameters.
        rates: the inner learning rate of each parameter, by name (a float or a learned scalar).
        loss: the task loss, ``loss(outputs, targets)``.
        masks: by parameter name, what each inner gradient is multiplied by (pruned entries).
    """

    def __init__(
        self, net: nn.Module, rates: Rates, loss: Loss, masks: Optional[Mapping[str, Tensor]] = None
    ) -> None:
        self.net, self.rates, self.loss, self.masks = net, rates, loss, dict(masks or {})
        self.batched = False
        """Whether :meth:`adapt` runs inside ``vmap`` (set by :meth:`each_task`)."""

    def params(self) -> Params:
        return dict(self.net.named_parameters())

    def forward(self, params: Params, x: Tensor) -> Tensor:
        return functional_call(self.net, params, (x,))

    def support_loss(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        return self.loss(self.forward(params, x), y)

    def adapt(self, params: Params, x: Tensor, y: Tensor, steps: int) -> Params:
        """``steps`` SGD steps on one task's support set (differentiable w.r.t. ``params`` where
        they require a gradient and gradients are on)."""
        if self.batched:
            step_grad = grad(self.support_loss)
        else:  # one task: plain autograd, without torch.func's transform around every step
            create_graph = torch.is_grad_enabled() and any(p.requires_grad for p in params.values())
            step_grad = partial(self._autograd_step, create_graph=create_graph)
        for _ in range(steps):
            grads = step_grad(params, x, y)
            for name, mask in self.masks.items():
                grads[name] = grads[name] * mask
            params = {name: p - self.rates[name] * grads[name] for name, p in params.items()}
        return params

    def _autograd_step(self, params: Params, x: Tensor, y: Tensor, create_graph: bool) -> Params:
        with torch.enable_grad():
            if not create_graph:  # the step's gradient only: fresh leaves, no graph kept
                params = {name: p.detach().requires_grad_() for name, p in params.items()}
            loss = self.support_loss(params, x, y)
            grads = torch.autograd.grad(
                loss, list(params.values()), create_graph=create_graph, allow_unused=True
            )
        return {
            name: torch.zeros_like(p) if g is None else g if create_graph else g.detach()
            for (name, p), g in zip(params.items(), grads)
        }

    def query_outputs(
        self, params: Params, support_x: Tensor, support_y: Tensor, query_x: Tensor, steps: int
    ) -> Tensor:
        return self.forward(self.adapt(params, support_x, support_y, steps), query_x)

    def chunk_outputs(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, steps: int, first_order: bool
    ) -> Tensor:
        """Query outputs ``[tasks, ...]`` after adapting to each task of a chunk (``[tasks, ...]`` inputs).

        Differentiable w.r.t. the meta-parameters: through the inner loop (second order) or as the
        query gradient at the adapted weights (``first_order``).
        """
        params = self.params()
        if not first_order:
            return self.each_task(
                self.query_outputs, (None, 0, 0, 0, None), params, support_x, support_y, query_x, steps
            )
        detached = {name: p.detach() for name, p in params.items()}
        with torch.no_grad():
            adapted = self.each_task(self.adapt, (None, 0, 0, None), detached, support_x, support_y, steps)
        # theta' as theta plus a constant: d(query)/d(theta) is d(query)/d(theta') (FOMAML)
        shifted = {name: params[name] + (adapted[name] - detached[name]) for name in params}
        return self.each_task(self.forward, (0, 0), shifted, query_x)

    @torch.no_grad()
    def evaluate_outputs(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, steps: int) -> Tensor:
        """Query outputs after adaptation, no meta-gradient (validation, test, predict)."""
        detached = {name: p.detach() for name, p in self.params().items()}
        return self.each_task(
            self.query_outputs, (None, 0, 0, 0, None), detached, support_x, support_y, query_x, steps
        )

    def each_task(self, fn: Callable, in_dims: tuple, *args):
        """``vmap(fn, in_dims)(*args)`` over the tasks (dimension 0 of the ``0`` arguments); a chunk
        of one task runs ``fn`` on it directly, with every module's own kernels and no ``vmap``
        overhead, and comes back with its task dimension."""
        tasks = next(_first(a).shape[0] for a, d in zip(args, in_dims) if d == 0)
        if tasks > 1:
            self.batched = True
            try:
                with batch_norm_written_out(self.net):
                    return vmap(fn, in_dims=in_dims)(*args)
            finally:
                self.batched = False
        one = [_index(a, 0) if d == 0 else a for a, d in zip(args, in_dims)]
        return _unsqueeze(fn(*one))

    def adapted_params(self, support_x: Tensor, support_y: Tensor, steps: int) -> Params:
        """One task's adapted weights as fresh leaves (no meta-gradient, no graph of the support
        passes): a later forward pass through :meth:`forward` is the only one they feed."""
        detached = {name: p.detach() for name, p in self.params().items()}
        with torch.enable_grad():
            adapted = self.adapt(detached, support_x, support_y, steps)
        return {name: p.detach() for name, p in adapted.items()}


def _first(value):
    return next(iter(value.values())) if isinstance(value, dict) else value


def _index(value, i: int):
    return {k: v[i] for k, v in value.items()} if isinstance(value, dict) else value[i]


def _unsqueeze(value):
    return {k: v.unsqueeze(0) for k, v in value.items()} if isinstance(value, dict) else value.unsqueeze(0)


def _batch_statistics_forward(module: _BatchNorm, x: Tensor) -> Tensor:
    """BatchNorm normalising by the batch's own statistics, as plain differentiable operations."""
    dims = [0, *range(2, x.dim())]
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, keepdim=True, unbiased=False)
    out = (x - mean) * torch.rsqrt(var + module.eps)
    if module.affine:
        shape = (1, -1, *([1] * (x.dim() - 2)))
        out = out * module.weight.view(shape) + module.bias.view(shape)
    return out


@contextmanager
def batch_norm_written_out(net: nn.Module) -> Iterator[None]:
    """Inside the block, each BatchNorm of ``net`` that normalises by batch statistics (training
    mode, or no running statistics) computes them with plain operations instead of the fused
    kernel, whose double backward is wrong under ``vmap``; running statistics are not updated
    (a ``vmap`` over tasks has no single batch to update them from)."""
    patched = [
        m for m in net.modules() if isinstance(m, _BatchNorm) and (m.training or m.running_mean is None)
    ]
    for module in patched:
        module.forward = _batch_statistics_forward.__get__(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward


@torch.no_grad()
def activation_bytes(net: nn.Module, example: Tensor) -> float:
    """Bytes of every module's output in one forward pass of ``example`` (one example): what a
    pass keeps for its backward, roughly, per example."""
    total = 0.0

    def count(module: nn.Module, inputs, output) -> None:
        nonlocal total
        if isinstance(output, Tensor):
            total += output.numel() * output.element_size()

    handles = [m.register_forward_hook(count) for m in net.modules() if not list(m.children())]
    try:
        net(example)
    finally:
        for handle in handles:
            handle.remove()
    return total / max(1, example.shape[0])
