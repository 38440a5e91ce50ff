"""xpnet.dispatch: one mechanism picks the implementation of every op with more than one."""

import numpy as np
import pytest

import xpnet
from xpnet import dispatch, ops
from xpnet.nn.layers import Dense, ReLU
from xpnet.nn.sequential import Sequential


@pytest.fixture
def toy_op():
    """An op declared for the test, with a reference and a registered NumPy implementation."""
    calls = []

    @dispatch.op("test_double")
    def double(x, factor=2):
        calls.append("reference")
        return x * factor

    def fast(x, factor=2):
        calls.append("fast")
        return x * factor

    impl = dispatch.register("test_double", "numpy", "fast double", fast, applies=lambda x, factor=2: x.size > 3)
    yield double, impl, calls
    dispatch.unregister(impl)


def test_the_first_applicable_registered_implementation_runs_else_the_reference(toy_op):
    double, impl, calls = toy_op
    np.testing.assert_array_equal(double(np.arange(5.0)), np.arange(5.0) * 2)
    np.testing.assert_array_equal(double(np.arange(2.0), factor=3), np.arange(2.0) * 3)
    assert calls == ["fast", "reference"]
    assert double.reference(np.ones(1)) == 2 and calls[-1] == "reference"
    assert dispatch.implementations("test_double", "numpy") == [impl]
    assert dispatch.implementations("test_double", "cupy") == []


def test_the_switch_forces_the_reference_and_is_restored(toy_op):
    double, _, calls = toy_op
    with xpnet.reference_paths():
        assert xpnet.config.reference_forced()
        double(np.arange(5.0))
        with xpnet.reference_paths(False):
            double(np.arange(5.0))
    double(np.arange(5.0))
    assert calls == ["reference", "fast", "fast"]
    with xpnet.fast_paths(False):  # the older name of the same switch
        double(np.arange(5.0))
    assert calls[-1] == "reference" and not xpnet.config.reference_forced()


def test_registering_again_replaces_and_prefer_puts_first(toy_op):
    double, impl, calls = toy_op
    other = dispatch.register("test_double", "numpy", "other", lambda x, factor=2: calls.append("other") or x,
                              applies=lambda x, factor=2: True)
    try:
        double(np.arange(5.0))
        assert calls[-1] == "fast"  # registered first, tried first
        dispatch.prefer(other)
        double(np.arange(5.0))
        assert calls[-1] == "other"
        again = dispatch.register("test_double", "numpy", "other", lambda x, factor=2: x, applies=lambda *a: False)
        assert [i.name for i in dispatch.implementations("test_double", "numpy")] == ["fast double", "other"]
        dispatch.unregister(again)
    finally:
        dispatch.unregister(other)


def test_describe_lists_every_op_and_the_chain_executor():
    lines = dispatch.describe()
    for name in ("conv2d_forward", "conv2d_backward", "max_pool2d_forward", "relu_backward",
                 "sigmoid_bce_with_logits", "optimizer_update"):
        assert any(line.startswith(name) and "numpy" in line for line in lines), name
    assert any(line.startswith("Sequential") and "fused CPU executor" in line for line in lines)
    with xpnet.reference_paths():
        assert "reference paths forced" in dispatch.describe()[0]


def test_the_fused_executor_is_chosen_through_dispatch(rng):
    model = Sequential([Dense(8), ReLU(), Dense(3)], input_shape=(5,))
    x = rng.standard_normal((6, 5)).astype(np.float32)
    assert dispatch.chain_for(model, x).name.startswith("fused CPU executor")
    model.forward(x)
    assert type(model.executor).__name__ == "FusedExecutor"
    with dispatch.layer_by_layer():
        assert dispatch.chain_for(model, x) is None
    with xpnet.reference_paths():
        assert dispatch.chain_for(model, x) is None


def test_reference_ops_import_nothing_from_the_fast_paths():
    """The generic ops are the reference: no module of xpnet.ops imports xpnet.cpu or xpnet.cuda."""
    import ast
    import pathlib

    for path in pathlib.Path(ops.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                mod = ("." * node.level) + (node.module or "")
                assert "cpu" not in mod.split(".") and "cuda" not in mod.split("."), (path.name, mod)
                assert not any(a.name in ("cpu", "cuda") for a in node.names), (path.name, mod)


def test_nothing_rebinds_the_public_ops():
    """The ops in xpnet.ops are the dispatching functions of their own modules, not replacements."""
    from xpnet.ops import conv, loss, pool

    assert ops.conv2d_forward is conv.conv2d_forward and ops.conv2d_forward.op_name == "conv2d_forward"
    assert ops.max_pool2d_backward is pool.max_pool2d_backward
    assert ops.sigmoid_bce_with_logits is loss.sigmoid_bce_with_logits


def test_xpnet_info_lists_what_each_op_would_use(capsys):
    from xpnet.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "implementations" in out
    assert any(line.strip().startswith("conv2d_forward") and "cupy" in line and "cuda kernels" in line
               for line in out.splitlines())
    assert any(line.strip().startswith("Sequential") and "fused CPU executor" in line for line in out.splitlines())
