"""MAML's adaptation as an ONNX graph (lthmaml/edge/onnx_adapt.py): each decomposition against
ATen, the exported graph in float64 against the torch inner loop, ONNX Runtime in float32 within
float32 rounding of it, masks kept, regression, and each operation alone through ONNX Runtime."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("onnx", reason="the ONNX export needs onnx: pip install 'lthmaml[onnx]'")
pytest.importorskip("onnxscript", reason="the ONNX export needs onnxscript: pip install 'lthmaml[onnx]'")
onnxruntime = pytest.importorskip("onnxruntime", reason="running the graph needs onnxruntime")

from lthmaml import sparsity  # noqa: E402
from lthmaml.edge.artifact import ArtifactMetadata, load_artifact  # noqa: E402
from lthmaml.edge.export import export_net  # noqa: E402
from lthmaml.edge.onnx_adapt import (  # noqa: E402
    INPUTS,
    _batch_norm,
    _batch_norm_backward,
    _convolution_backward,
    _max_pool2d_with_indices,
    _threshold_backward,
    adaptation_graph,
    check_ops,
    example_task,
    export_adaptation,
    write_onnx,
)
from lthmaml.edge.onnx_format import ADAPTED  # noqa: E402
from lthmaml.errors import ConfigError  # noqa: E402
from lthmaml.masks import gradient_masks  # noqa: E402
from lthmaml.meta.functional import FunctionalInnerLoop  # noqa: E402
from lthmaml.meta.metrics import task_loss  # noqa: E402
from lthmaml.nets.models import MLP, Conv4  # noqa: E402

STEPS = 2
FLOAT32 = 1e-4
"""ONNX Runtime against torch in float32, on the logits and the adapted weights: float32 rounding
of kernels that sum in other orders, with room (bench/README.md has the measured differences)."""
FLOAT64 = 1e-10


def pruned_conv4(dtype: torch.dtype = torch.float32) -> Conv4:
    torch.manual_seed(0)
    net = Conv4(out_features=5, in_channels=1, hidden_channels=4, image_size=16)
    sparsity.prune_by_magnitude(net, 0.5)
    return net.to(dtype)


def rates_of(net) -> dict[str, float]:
    """Meta-SGD-like rates, one per tensor, all different."""
    return {name: 0.1 + 0.05 * i for i, (name, _) in enumerate(net.named_parameters())}


def torch_adaptation(net, rates, support_x, support_y, query_x, steps=STEPS):
    """The torch path: MAML's inner loop on one task, masks from beside the net."""
    loop = FunctionalInnerLoop(net.train(), rates, task_loss, gradient_masks(net, net))
    adapted = loop.adapted_params(support_x, support_y, steps)
    return loop.forward(adapted, query_x).detach(), adapted


def task(ways: int, support: int, query: int, side: int = 16, dtype=torch.float32, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(support, 1, side, side, generator=generator, dtype=dtype),
        torch.arange(support) % ways,
        torch.randn(query, 1, side, side, generator=generator, dtype=dtype),
    )


@pytest.mark.parametrize(
    "stride, padding, dilation, side",
    [(1, 1, 1, 9), (2, 0, 1, 9), (2, 1, 1, 8), (1, 2, 2, 7), (3, 1, 2, 10)],
)
def test_convolution_backward_is_the_aten_one(stride, padding, dilation, side):
    """The decomposition's three gradients equal ATen's in float64, also where the stride leaves
    a remainder of the input the forward pass never read."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, side, side, generator=generator, dtype=torch.float64)
    weight = torch.randn(4, 2, 3, 3, generator=generator, dtype=torch.float64)
    out = torch.nn.functional.conv2d(x, weight, None, stride, padding, dilation)
    grad = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    args = (grad, x, weight, [4], [stride] * 2, [padding] * 2, [dilation] * 2, False, [0, 0], 1, [True] * 3)
    expected = torch.ops.aten.convolution_backward.default(*args)
    for got, want in zip(_convolution_backward(*args), expected):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    with pytest.raises(ConfigError, match="groups=2"):
        _convolution_backward(grad, x, torch.randn(4, 1, 3, 3, dtype=torch.float64), *args[3:9], 2, args[10])


aten = torch.ops.aten
DOUBLE = torch.float64


@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_is_the_aten_one(affine):
    """Batch statistics, output and the three gradients equal ATen's in float64; only the
    gradients asked for are computed; evaluation mode is left to ATen."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 9, 7, generator=generator, dtype=DOUBLE) * 3 + 1
    weight, bias = (
        (torch.randn(3, generator=generator, dtype=DOUBLE) for _ in range(2)) if affine else (None, None)
    )
    expected = aten._native_batch_norm_legit.no_stats(x, weight, bias, True, 0.1, 1e-5)
    for got, want in zip(_batch_norm(x, weight, bias, True, 0.1, 1e-5), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    grad = torch.randn(x.shape, generator=generator, dtype=DOUBLE)
    for mask in ([True] * 3, [True, False, False], [False, True, True]):
        args = (grad, x, weight, None, None, expected[1], expected[2], True, 1e-5, mask)
        for got, want in zip(_batch_norm_backward(*args), aten.native_batch_norm_backward.default(*args)):
            assert (got is None) == (want is None)
            if want is not None:
                torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert _batch_norm_backward(*args[:7], False, 1e-5, mask) is NotImplemented


@pytest.mark.parametrize("kernel, side", [(2, (28, 28)), (2, (7, 9)), (3, (10, 8))])
def test_max_pool_is_the_aten_one(kernel, side):
    """Tiling windows: the maxima and torch's indices exactly, the first of equal values (ReLU's
    zeros, a flat patch) where the window holds several; other poolings are left to ATen."""
    generator = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(4, 3, *side, generator=generator, dtype=DOUBLE))
    x[1, 2, :3, :4] = 0.5
    values, indices = _max_pool2d_with_indices(x, [kernel, kernel], [kernel, kernel])
    want_values, want_indices = aten.max_pool2d_with_indices.default(x, [kernel, kernel], [kernel, kernel])
    assert torch.equal(values, want_values) and torch.equal(indices, want_indices)
    assert torch.equal(_max_pool2d_with_indices(x, [kernel, kernel])[1], want_indices)  # stride: the kernel
    for other in ({"stride": [1, 1]}, {"padding": [1, 1]}, {"dilation": [2, 2]}, {"ceil_mode": True}):
        options = {"stride": [kernel, kernel], **other}
        assert _max_pool2d_with_indices(x, [kernel, kernel], **options) is NotImplemented


def test_threshold_backward_is_the_aten_one():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, 6, generator=generator, dtype=DOUBLE)
    x[0, 0] = 0.0
    grad = torch.randn(x.shape, generator=generator, dtype=DOUBLE)
    assert torch.equal(_threshold_backward(grad, x, 0.0), aten.threshold_backward.default(grad, x, 0.0))


def test_graph_in_float64_is_the_inner_loop(tmp_path):
    """The graph computes MAML's adaptation: in float64 its logits and adapted weights equal the
    torch inner loop's to 1e-10, traced (the decompositions' maths) and as the ONNX file (run by
    the ONNX reference implementation: ONNX Runtime has no float64 convolution), at the traced
    batch sizes and others."""
    from onnx.reference import ReferenceEvaluator

    net = pruned_conv4(DOUBLE)
    rates = rates_of(net)
    example = example_task(net, "classification", DOUBLE)
    graph = adaptation_graph(net, rates, STEPS, *example, adapted_weights=True)
    names = [name for name, _ in net.named_parameters()]
    path = write_onnx(graph, example, tmp_path / "adapt64.onnx", ["logits", *(ADAPTED + n for n in names)])
    onnx_graph = ReferenceEvaluator(str(path))
    assert len(net.masks) == 5
    for inputs in (example, task(5, 20, 3, dtype=DOUBLE)):
        expected, adapted = torch_adaptation(net, rates, *inputs)
        traced = graph(*inputs)
        exported = [
            torch.from_numpy(a) for a in onnx_graph.run(None, dict(zip(INPUTS, (t.numpy() for t in inputs))))
        ]
        for logits, *weights in (traced, exported):
            assert logits.dtype == DOUBLE
            assert (logits - expected).abs().max() < FLOAT64
            assert max(float((w - adapted[n]).abs().max()) for n, w in zip(names, weights)) < FLOAT64
            for name, mask in net.masks.items():
                assert float(weights[names.index(name)][mask == 0].abs().max()) == 0.0


@pytest.fixture(scope="module")
def conv_graph(tmp_path_factory):
    """A pruned Conv4 artifact with per-tensor rates, and its adaptation graph."""
    folder = tmp_path_factory.mktemp("onnx_adapt")
    net = pruned_conv4()
    fields = {"inner_lr": 0.1, "inner_lrs": rates_of(net), "inner_steps": STEPS, "eval_inner_steps": STEPS}
    artifact = load_artifact(export_net(net, folder / "net.safetensors", fields))
    path = export_adaptation(artifact.net, artifact.metadata, folder / "net.adapt.onnx")
    return artifact, path


def test_graph_takes_and_gives_what_the_device_expects(conv_graph):
    artifact, path = conv_graph
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = {i.name: (i.type, i.shape) for i in session.get_inputs()}
    assert list(inputs) == list(INPUTS)
    assert [inputs[name][0] for name in INPUTS] == ["tensor(float)", "tensor(int64)", "tensor(float)"]
    assert inputs["support_x"][1][1:] == [1, 16, 16] and isinstance(inputs["support_x"][1][0], str)
    assert inputs["query_x"][1][0] != inputs["support_x"][1][0]  # two free batch sizes
    names = [name for name, _ in artifact.net.named_parameters()]
    assert [o.name for o in session.get_outputs()] == ["logits", *(ADAPTED + n for n in names)]


@pytest.mark.parametrize("support, query", [(11, 13), (20, 3), (5, 1)])
def test_onnx_runtime_adapts_as_torch_does(conv_graph, support, query):
    """float32 logits within FLOAT32 of the torch path, the same labels, and the adapted weights
    too, pruned entries exactly zero, at any support and query size."""
    artifact, path = conv_graph
    net, rates = artifact.net, artifact.metadata.inner_lrs
    inputs = task(5, support, query)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, *weights = session.run(None, dict(zip(INPUTS, (t.numpy() for t in inputs))))
    expected, adapted = torch_adaptation(net, rates, *inputs)
    logits = torch.from_numpy(logits)
    assert logits.shape == (query, 5)
    assert (logits - expected).abs().max() < FLOAT32
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))
    names = [name for name, _ in net.named_parameters()]
    weights = dict(zip(names, map(torch.from_numpy, weights)))
    assert max(float((weights[n] - adapted[n]).abs().max()) for n in names) < FLOAT32
    assert len(net.masks) == 5  # four convolutions and the head
    for name, mask in net.masks.items():
        assert float(weights[name][mask == 0].abs().max()) == 0.0
        moved = weights[name] - dict(net.named_parameters())[name].detach()
        assert float(moved[mask == 1].abs().max()) > 0


def test_regression_adapts_on_the_mean_squared_error(tmp_path):
    """An MLP regressor's graph steps on the MSE of float targets ``[S, 1]`` and gives
    ``predictions``, one query point or many."""
    torch.manual_seed(0)
    net = MLP(hidden=(16, 16))
    fields = {"inner_lr": 0.05, "inner_steps": 3, "eval_inner_steps": 3}
    artifact = load_artifact(export_net(net, tmp_path / "sine.safetensors", fields))
    assert artifact.metadata.task == "regression"
    path = export_adaptation(artifact.net, artifact.metadata, tmp_path / "sine.adapt.onnx")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [name for name, _ in artifact.net.named_parameters()]
    assert [o.name for o in session.get_outputs()] == ["predictions", *(ADAPTED + n for n in names)]
    assert [i.type for i in session.get_inputs()] == ["tensor(float)"] * 3
    rates = dict.fromkeys((name for name, _ in artifact.net.named_parameters()), 0.05)
    support_x = torch.linspace(-5, 5, 10).unsqueeze(1)
    support_y = 3 * torch.sin(support_x + 1)
    for query in (1, 25):
        query_x = torch.linspace(-4, 4, query).unsqueeze(1)
        feeds = dict(zip(INPUTS, (support_x.numpy(), support_y.numpy(), query_x.numpy())))
        got = session.run(["predictions"], feeds)[0]
        expected, _ = torch_adaptation(artifact.net, rates, support_x, support_y, query_x, steps=3)
        assert got.shape == (query, 1)
        assert (torch.from_numpy(got) - expected).abs().max() < FLOAT32
    unadapted = artifact.net(query_x).detach()
    assert (expected - unadapted).abs().max() > 1e-3  # the steps moved the predictions


def test_learner_without_steps_has_no_adaptation_graph(tmp_path):
    net = Conv4(out_features=None, hidden_channels=4, image_size=16)
    metadata = ArtifactMetadata(
        architecture={"class_path": "lthmaml.nets.models.Conv4", "init_args": net.architecture},
        task="classification",
        ways=None,
        inner_lr=0.1,
        inner_steps=1,
        eval_inner_steps=1,
        sparsity=0.0,
        learner="protonet",
    )
    with pytest.raises(ConfigError, match="learner 'protonet' adapts in one forward pass") as error:
        export_adaptation(net, metadata, tmp_path / "x.onnx")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.slow
def test_each_operation_alone_matches_torch():
    """Every operation of the graph, exported alone, on the inputs it gets in the graph: in
    float32 ONNX Runtime within float32 rounding of torch; in float64 to 1e-10 (the convolutions
    through the ONNX reference implementation, as ONNX Runtime has no float64 convolution)."""
    float32 = pruned_conv4()
    example = example_task(float32, "classification")
    checks = check_ops(adaptation_graph(float32, rates_of(float32), 1, *example), example)
    assert len(checks) > 20
    assert [(c.op, c.problem) for c in checks if not c.error < 1e-6] == []
    assert {c.runner for c in checks} == {"onnxruntime"}
    convolutions = [c.op for c in checks if c.op.startswith("aten.convolution.default")]
    assert len(convolutions) == 3  # the forward one, and the two of the decomposed backward

    float64 = copy.deepcopy(float32).double()
    example = example_task(float64, "classification", DOUBLE)
    checks = check_ops(adaptation_graph(float64, rates_of(float64), 1, *example), example)
    assert [(c.op, c.error, c.problem) for c in checks if not c.error < FLOAT64] == []
    assert {c.op for c in checks if c.runner == "onnx reference"} == set(convolutions)
