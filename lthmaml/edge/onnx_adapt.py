"""MAML's adaptation as an ONNX graph: the artifact's inner loop, run by ONNX Runtime without torch.

Adapting a MAML (or classifier) artifact to a task is a pure function of its weights and the
support set: ``eval_inner_steps`` full-batch SGD steps on the support loss (cross-entropy for
classification, MSE for regression) at the artifact's inner rate(s), each gradient multiplied by
the masks so pruned weights stay exactly zero, BatchNorm on the batch's own statistics; then the
query pass. :func:`export_adaptation` writes that function as one ONNX graph, the weights as its
constants:

* inputs ``support_x`` float32 ``[S, *input]``, ``support_y`` (int64 ``[S]`` labels, or float32
  ``[S, out_features]`` targets for regression), ``query_x`` float32 ``[Q, *input]``, with ``S``
  and ``Q`` free;
* output ``logits`` float32 ``[Q, N]`` (``predictions`` ``[Q, out_features]`` for regression): the
  query outputs of the adapted net, then each adapted parameter as ``adapted.<name>``, which the
  device feeds the net graph for the query's other batches (:mod:`lthmaml.edge.onnx_export`).

How: the inner loop of :class:`lthmaml.meta.functional.FunctionalInnerLoop` (the one MAML
evaluates with) is traced by ``make_fx`` into a graph of ATen operations, forward and backward,
with symbolic batch sizes; ``torch.onnx.export`` translates that graph op by op. The exporter
lacks or mistranslates two backward operations, computes BatchNorm in float32 whatever the
dtype, and translates two more operations slowly, so :data:`DECOMPOSITIONS` rewrites exactly
those six into plain operations; every other operation keeps its own translation. So the graph
computes what torch computes: in float64 (weights and inputs), the whole graph, run by the ONNX
reference implementation, equals the torch inner loop to 1e-10, and each of its operations alone
equals ATen's (:func:`check_ops`; ``tests/test_onnx_adapt.py``); in float32 it differs from
torch by float32 rounding (ONNX Runtime's kernels sum in other orders).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, fx, nn
from torch._decomp import decomposition_table
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import tree_flatten, tree_unflatten

from lthmaml.edge.artifact import ArtifactMetadata, PathLike, input_shape
from lthmaml.edge.onnx_format import ADAPTED, GRADIENT_LEARNERS
from lthmaml.errors import ConfigError
from lthmaml.files import replacing
from lthmaml.masks import gradient_masks
from lthmaml.meta.functional import FunctionalInnerLoop
from lthmaml.meta.metrics import task_loss

aten = torch.ops.aten

INPUTS = ("support_x", "support_y", "query_x")
"""The graph's inputs, in order."""
OUTPUTS = {"classification": "logits", "regression": "predictions"}
"""The graph's first output, by the artifact's task: the query outputs after adaptation."""


def _convolution_backward(
    grad_output: Tensor,
    input: Tensor,
    weight: Tensor,
    bias_sizes: Optional[Sequence[int]],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    transposed: bool,
    output_padding: Sequence[int],
    groups: int,
    output_mask: Sequence[bool],
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """A 2-d convolution's gradients as forward convolutions (ONNX has no convolution backward):
    the input's is the transposed convolution of the output's gradient by the weight, the
    weight's is the convolution of the input by the output's gradient with the batch as the
    channels (stride and dilation swap), cut to the kernel (a stride that does not divide the
    input leaves a remainder the forward pass never read)."""
    if transposed or groups != 1 or input.dim() != 4:
        raise ConfigError(
            "the ONNX adaptation graph differentiates plain 2-d convolutions (groups 1, not "
            f"transposed), got groups={groups}, transposed={transposed}, a {input.dim()}-d input"
        )
    kernel = weight.shape[2:]
    grad_input = grad_weight = grad_bias = None
    if output_mask[0]:
        spans = [
            (size - 1) * step - 2 * pad + gap * (side - 1) + 1
            for size, step, pad, gap, side in zip(grad_output.shape[2:], stride, padding, dilation, kernel)
        ]
        unread = [size - span for size, span in zip(input.shape[2:], spans)]
        grad_input = aten.convolution.default(
            grad_output, weight, None, stride, padding, dilation, True, unread, 1
        )
    if output_mask[1]:
        by_batch = aten.convolution.default(
            input.transpose(0, 1),
            grad_output.transpose(0, 1),
            None,
            dilation,
            padding,
            stride,
            False,
            [0, 0],
            1,
        )
        grad_weight = by_batch.transpose(0, 1)[:, :, : kernel[0], : kernel[1]]
    if output_mask[2]:
        grad_bias = grad_output.sum([0, 2, 3])
    return grad_input, grad_weight, grad_bias


def _batch_norm(
    input: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    training: bool,
    momentum: float,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """BatchNorm on the batch's own statistics (``_native_batch_norm_legit.no_stats``) in plain
    operations: the output, the batch mean and the reciprocal standard deviation per channel."""
    dims = [0, *range(2, input.dim())]
    mean = input.mean(dims, keepdim=True)
    centred = input - mean
    rstd = torch.rsqrt((centred * centred).mean(dims, keepdim=True) + eps)
    scale = rstd if weight is None else rstd * _per_channel(weight, input)
    out = centred * scale
    if bias is not None:
        out = out + _per_channel(bias, input)
    return out, mean.flatten(), rstd.flatten()


def _batch_norm_backward(
    grad_output: Tensor,
    input: Tensor,
    weight: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    save_mean: Optional[Tensor],
    save_rstd: Optional[Tensor],
    train: bool,
    eps: float,
    output_mask: Sequence[bool],
):
    """The gradients of :func:`_batch_norm` (training mode; else ATen's own), with means where
    the textbook formula divides by the count."""
    if not train:
        return NotImplemented
    dims = [0, *range(2, input.dim())]
    normalised = (input - _per_channel(save_mean, input)) * _per_channel(save_rstd, input)
    grad_input = grad_weight = grad_bias = None
    if output_mask[0]:
        scale = _per_channel(save_rstd if weight is None else save_rstd * weight, input)
        spread = (grad_output * normalised).mean(dims, keepdim=True)
        grad_input = (grad_output - grad_output.mean(dims, keepdim=True) - normalised * spread) * scale
    if output_mask[1]:
        grad_weight = (grad_output * normalised).sum(dims)
    if output_mask[2]:
        grad_bias = grad_output.sum(dims)
    return grad_input, grad_weight, grad_bias


def _per_channel(values: Tensor, like: Tensor) -> Tensor:
    return values.view(1, -1, *([1] * (like.dim() - 2)))


def _max_pool2d_with_indices(
    input: Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int] = (),
    padding: Sequence[int] = (0,),
    dilation: Sequence[int] = (1,),
    ceil_mode: bool = False,
):
    """Max-pooling over windows that tile the input (stride the kernel, no padding; else ATen's
    own): each window's maximum and the index in its plane of the first position that holds it,
    torch's choice among equal values."""
    kernel = _pair(kernel_size)
    if (
        input.dim() != 4
        or _pair(stride or kernel_size) != kernel
        or _pair(padding) != (0, 0)
        or _pair(dilation) != (1, 1)
        or ceil_mode
    ):
        return NotImplemented
    n, c, h, w = input.shape
    (kh, kw), rows, cols = kernel, h // kernel[0], w // kernel[1]
    windows = (
        input[:, :, : rows * kh, : cols * kw]
        .reshape(n, c, rows, kh, cols, kw)
        .permute(0, 1, 2, 4, 3, 5)
        .reshape(n, c, rows, cols, kh * kw)
    )
    position = windows.argmax(-1)  # the first of equal values, as torch's kernel keeps
    row = torch.div(position, kw, rounding_mode="floor")  # ONNX Runtime's Mod is slow: no %
    corner = (torch.arange(rows) * (kh * w)).unsqueeze(1) + torch.arange(cols) * kw
    return windows.amax(-1), corner + row * w + (position - row * kw)


def _threshold_backward(grad_output: Tensor, input: Tensor, threshold: float) -> Tensor:
    """ReLU's gradient as a product with the mask of inputs above the threshold."""
    return grad_output * (input > threshold).to(grad_output.dtype)


def _pair(values) -> tuple[int, int]:
    values = [values] if isinstance(values, int) else list(values)
    return (values[0], values[-1])


DECOMPOSITIONS: dict[torch._ops.OpOverload, Callable] = {
    # no ONNX function: written as the two convolutions it is
    aten.convolution_backward.default: _convolution_backward,
    # its ONNX function gives a placeholder total_weight of 1 (the output's size), which
    # nll_loss_backward divides the mean's gradient by: every step S times too long
    aten.nll_loss_forward.default: decomposition_table[aten.nll_loss_forward.default],
    # exact in float64 too: the ONNX function computes the batch statistics in float32, and the
    # exporter's own decomposition of the backward holds its 1 / N as a float32 constant
    aten._native_batch_norm_legit.no_stats: _batch_norm,
    aten.native_batch_norm_backward.default: _batch_norm_backward,
    # faster in ONNX Runtime: the ONNX function max-pools the whole input a second time to turn
    # ONNX's indices into torch's, and ONNX Runtime's Where is much slower than a product
    aten.max_pool2d_with_indices.default: _max_pool2d_with_indices,
    aten.threshold_backward.default: _threshold_backward,
}
"""The operations of the adaptation graph that tracing rewrites, each for the reason beside it
(``python -m bench.onnx_adapt --ops`` shows each operation's translation without them); every
other operation is translated by ``torch.onnx`` as it is."""


def adaptation_graph(
    net: nn.Module,
    rates: Mapping[str, float],
    steps: int,
    support_x: Tensor,
    support_y: Tensor,
    query_x: Tensor,
    adapted_weights: bool = False,
    decompositions: Mapping[torch._ops.OpOverload, Callable] = DECOMPOSITIONS,
) -> fx.GraphModule:
    """The adaptation as a graph of ATen operations, ``graph(support_x, support_y, query_x)``.

    ``net``'s parameters (in its dtype) are the graph's constants, its masks (kept beside it,
    ``net.masks``) multiply every step's gradient, and ``rates`` gives each parameter's SGD
    step size by name. The example inputs fix everything but the batch sizes, which stay
    symbolic, so give a support and a query set of two different sizes, each unlike any other
    dimension of the inputs. ``decompositions`` are what tracing rewrites (other than
    :data:`DECOMPOSITIONS` only to see what the exporter makes of the rest, :func:`check_ops`).
    """
    kept = [name for name, m in net.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if kept:
        raise ConfigError(
            f"the adaptation graph normalises each batch by its own statistics, but {type(net).__name__}'s "
            f"BatchNorm {kept[0]!r} keeps running statistics: the device adapts nets meta-trained with "
            "running_stats: false (Conv4's and ResNet-12's default)"
        )
    params = {name: p.detach() for name, p in net.named_parameters()}
    if set(rates) != set(params):
        raise ConfigError(f"inner rates name {sorted(rates)}, but the net's parameters are {sorted(params)}")
    dtype = support_x.dtype
    # 0-d tensors, not Python floats: torch.onnx keeps a Python float constant in float32
    step_sizes = {name: torch.tensor(float(rate), dtype=dtype) for name, rate in rates.items()}
    loop = FunctionalInnerLoop(net, step_sizes, task_loss, gradient_masks(net, net))

    def adapt(support_x: Tensor, support_y: Tensor, query_x: Tensor):
        adapted = loop.adapt(params, support_x, support_y, steps)
        outputs = loop.forward(adapted, query_x)
        return (outputs, *(adapted[name] for name in params)) if adapted_weights else outputs

    from torch.fx.experimental.proxy_tensor import make_fx

    training = net.training
    net.train()  # as the torch path fine-tunes; BatchNorm keeps no running statistics (above)
    try:  # the weights are real tensors inside the traced function: the graph's constants
        graph = make_fx(
            adapt,
            decomposition_table=dict(decompositions),
            tracing_mode="symbolic",
            _allow_non_fake_inputs=True,
        )(support_x, support_y, query_x)
    finally:
        net.train(training)
    graph.graph.eliminate_dead_code()  # what no output needs (the query pass's max-pool indices)
    graph.recompile()
    return graph


@dataclass
class OpCheck:
    """One ATen operation of a graph, run alone by ONNX Runtime against torch on the inputs it
    gets in the graph (:func:`check_ops`)."""

    op: str
    error: float
    """Max ``|ONNX Runtime - torch|`` over its outputs, relative to ``max(1, max |torch|)``; 0 or
    inf for an integer output (equal or not); nan when it did not run."""
    runner: str
    """``onnxruntime``, or ``onnx reference`` (the ONNX reference implementation, in numpy) for
    an operation ONNX Runtime has no kernel for in its dtype."""
    problem: str = ""
    """Why it did not run (an operation with no ONNX function, a dtype without a kernel)."""


def check_ops(graph: fx.GraphModule, example: Sequence[Tensor]) -> list[OpCheck]:
    """Each distinct tensor operation of ``graph`` (an ATen operation and which of its arguments
    are tensors, absent or flags) at its first use when ``graph`` runs on ``example``, exported
    alone with ``torch.onnx`` and run by ONNX Runtime on the inputs it got there: where the
    translation of a graph goes wrong, one operation at a time. In a float64 graph, what the
    translations and kernels do in float64 (where ONNX Runtime has no float64 kernel, the ONNX
    reference implementation runs the translation)."""
    import onnxruntime
    from onnxruntime.capi.onnxruntime_pybind11_state import NotImplemented as NoKernel

    first: dict[str, tuple] = {}

    class Recorder(fx.Interpreter):
        def call_function(self, target, args, kwargs):
            result = super().call_function(target, args, kwargs)
            tensors = any(isinstance(value, Tensor) for value in tree_flatten(result)[0])
            if isinstance(target, torch._ops.OpOverload) and tensors:
                first.setdefault(_variant(target, args), (target, args, kwargs, result))
            return result

    with torch.no_grad():
        Recorder(graph).run(*example)
    checks = []
    for name, (target, args, kwargs, result) in first.items():
        flat, spec = tree_flatten((args, kwargs))
        slots = [i for i, value in enumerate(flat) if isinstance(value, Tensor)]
        inputs = tuple(flat[i] for i in slots)
        expected = [value for value in tree_flatten(result)[0] if isinstance(value, Tensor)]
        try:
            model = _quiet_export(_OneOp(target, flat, spec, slots), inputs).model_proto
            feeds = {i.name: t.numpy() for i, t in zip(model.graph.input, inputs)}
            try:
                session = onnxruntime.InferenceSession(
                    model.SerializeToString(), providers=["CPUExecutionProvider"]
                )
                got, runner = session.run(None, feeds), "onnxruntime"
            except NoKernel:  # no kernel for this dtype (float64 convolutions)
                from onnx.reference import ReferenceEvaluator

                got, runner = ReferenceEvaluator(model).run(None, feeds), "onnx reference"
        except Exception as error:  # what the exporter or ONNX Runtime cannot do: the finding
            while error.__cause__ is not None:  # the exporter wraps the reason in its advice
                error = error.__cause__
            lines = str(error).strip().splitlines() or [""]
            checks.append(OpCheck(name, math.nan, "", f"{type(error).__name__}: {lines[0]}"))
            continue
        checks.append(OpCheck(name, max(map(_relative_error, expected, got), default=0.0), runner))
    return checks


def _variant(target, args: tuple) -> str:
    """``target`` and which of its arguments are tensors, absent or flags: one convolution that
    is transposed and one that is not, with a bias and without, are different translations."""

    def kind(value) -> str:
        return (
            "T"
            if isinstance(value, Tensor)
            else str(value)
            if value is None or isinstance(value, bool)
            else "_"
        )

    return f"{target}({', '.join(map(kind, args))})"


class _OneOp(nn.Module):
    """``target`` called with the recorded arguments, its tensors given as inputs."""

    def __init__(self, target, flat: list, spec, slots: list[int]) -> None:
        super().__init__()
        self.target, self.flat, self.spec, self.slots = target, flat, spec, slots

    def forward(self, *tensors: Tensor):
        flat = list(self.flat)
        for i, tensor in zip(self.slots, tensors):
            flat[i] = tensor
        args, kwargs = tree_unflatten(flat, self.spec)
        return self.target(*args, **kwargs)


def _relative_error(expected: Tensor, got) -> float:
    got = torch.as_tensor(got)
    if got.shape != expected.shape:
        return math.inf
    if not expected.is_floating_point():
        return 0.0 if torch.equal(got.to(expected.dtype), expected) else math.inf
    if expected.numel() == 0:
        return 0.0
    return float((got.to(expected.dtype) - expected).abs().max()) / max(1.0, float(expected.abs().max()))


def _quiet_export(module: nn.Module, example: tuple, **options):
    """``torch.onnx.export`` (the dynamo exporter) without its progress notes."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.onnx.export(module, example, dynamo=True, verbose=False, **options)


def write_onnx(
    graph: fx.GraphModule, example: Sequence[Tensor], path: PathLike, output_names: Sequence[str]
) -> Path:
    """``graph`` (from :func:`adaptation_graph`) as an ONNX file at ``path``: its inputs
    :data:`INPUTS` with free batch sizes (support, query), its outputs named ``output_names``."""
    support, query = torch.export.Dim("support"), torch.export.Dim("query")
    program = _quiet_export(
        graph,
        tuple(example),
        dynamic_shapes=({0: support}, {0: support}, {0: query}),
        input_names=list(INPUTS),
        output_names=list(output_names),
    )
    import onnx

    model = program.model_proto
    for node in model.graph.node:  # the exporter's notes on each node's origin: most of the bytes
        del node.metadata_props[:]
    path = Path(path)
    with replacing(path, "the adaptation graph") as partial:
        onnx.save_model(model, str(partial))
    return path


def export_adaptation(net: nn.Module, metadata: ArtifactMetadata, path: PathLike) -> Path:
    """Write the adaptation a MAML or classifier artifact's net does on the device (see the
    module's docstring for the graph's inputs and outputs) to ``path``; returns ``path``.

    ``net`` is a loaded artifact's net (:func:`lthmaml.edge.artifact.load_artifact`), masks
    beside it; ``metadata`` its metadata: the task, ``eval_inner_steps`` and the inner rate(s).
    """
    if metadata.learner not in GRADIENT_LEARNERS:
        raise ConfigError(
            f"learner {metadata.learner!r} adapts in one forward pass, without an adaptation graph; "
            f"export_adaptation is for learners {' and '.join(GRADIENT_LEARNERS)}"
        )
    names = [name for name, _ in net.named_parameters()]
    rates = metadata.inner_lrs if metadata.inner_lrs is not None else dict.fromkeys(names, metadata.inner_lr)
    example = example_task(net, metadata.task)
    graph = adaptation_graph(net, rates, metadata.eval_inner_steps, *example, adapted_weights=True)
    outputs = [OUTPUTS[metadata.task], *(ADAPTED + name for name in names)]
    return write_onnx(graph, example, path, outputs)


def example_task(
    net: nn.Module, task: str, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor, Tensor]:
    """A support and a query set of random inputs that ``net`` takes, in ``dtype``, for tracing:
    their batch sizes differ from each other and from every other dimension, so that tracing
    keeps them apart (it gives equal sizes one symbol)."""
    shape = input_shape(net)
    outputs = getattr(net, "out_features", None)
    if not isinstance(outputs, int):
        raise ConfigError(
            f"the adaptation graph of a {type(net).__name__} needs its classes or outputs: give it an "
            "`out_features` attribute"
        )
    taken = {*shape, outputs}
    support, query = [size for size in (11, 13, 17, 19, 23, 29, 31, 37) if size not in taken][:2]
    generator = torch.Generator().manual_seed(0)
    support_x = torch.randn(support, *shape, generator=generator, dtype=dtype)
    query_x = torch.randn(query, *shape, generator=generator, dtype=dtype)
    if task == "classification":
        support_y = torch.arange(support) % outputs
    else:
        support_y = torch.randn(support, outputs, generator=generator, dtype=dtype)
    return support_x, support_y, query_x


__all__ = [
    "DECOMPOSITIONS",
    "INPUTS",
    "OUTPUTS",
    "OpCheck",
    "adaptation_graph",
    "check_ops",
    "example_task",
    "export_adaptation",
    "write_onnx",
]
