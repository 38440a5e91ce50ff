"""Optimizers and schedules against values worked out by hand (float64, tight tolerances)."""

import json
import math

import numpy as np
import pytest

import xpnet
from xpnet.cpu import sliced_update
from xpnet.nn import optim
from xpnet.errors import ModelFileError, UsageError
from xpnet.nn.layers import Dense
from xpnet.nn.sequential import Sequential

from xpnet.testing import tolerance


def params(p=(1.0, 2.0)):
    return {"w": np.array(p, dtype=np.float64)}


def run(opt, ps, grads_seq):
    for g in grads_seq:
        opt.step({"w": np.array(g, dtype=np.float64)})
    return ps["w"]


def test_plain_sgd_one_step():
    ps = params()
    run(optim.SGD(ps, lr=0.1), ps, [(0.5, -1.0)])
    np.testing.assert_allclose(ps["w"], [0.95, 2.1], rtol=1e-14)


def test_sgd_l2_weight_decay_is_added_to_the_gradient():
    ps = params()
    run(optim.SGD(ps, lr=0.1, weight_decay=0.1), ps, [(0.5, -1.0)])
    # g' = g + 0.1 p = (0.6, -0.8)
    np.testing.assert_allclose(ps["w"], [1 - 0.06, 2 + 0.08], rtol=1e-14)


def test_momentum_accumulates_velocity():
    ps = params((1.0,))
    run(optim.SGD(ps, lr=0.1, momentum=0.9), ps, [(1.0,), (1.0,), (1.0,)])
    # v = 1, 1.9, 2.71 ; p = 1 - 0.1 * (1 + 1.9 + 2.71)
    np.testing.assert_allclose(ps["w"], [1 - 0.1 * 5.61], rtol=1e-14)


def test_nesterov_looks_ahead():
    ps = params((1.0,))
    run(optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True), ps, [(1.0,), (1.0,)])
    # step 1: v = 1, update = 1 + 0.9*1 = 1.9 ; step 2: v = 1.9, update = 1 + 0.9*1.9 = 2.71
    np.testing.assert_allclose(ps["w"], [1 - 0.1 * (1.9 + 2.71)], rtol=1e-14)


def adam_reference(p, grads, lr, b1=0.9, b2=0.999, eps=1e-8, wd=0.0, decoupled=False):
    """The textbook algorithm, scalar by scalar, in plain Python floats."""
    m = v = 0.0
    for t, g in enumerate(grads, start=1):
        if wd and decoupled:
            p = p - lr * wd * p
        elif wd:
            g = g + wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1 ** t)
        v_hat = v / (1 - b2 ** t)
        p = p - lr * m_hat / (math.sqrt(v_hat) + eps)
    return p


def test_adam_first_step_moves_by_lr_times_sign():
    ps = params((1.0, 2.0))
    run(optim.Adam(ps, lr=0.1), ps, [(0.5, -3.0)])
    # m_hat = g, v_hat = g^2: the first update is lr * g / (|g| + eps)
    np.testing.assert_allclose(ps["w"], [1 - 0.1 * 0.5 / (0.5 + 1e-8), 2 + 0.1 * 3 / (3 + 1e-8)], rtol=1e-14)


@pytest.mark.parametrize("wd,cls,decoupled", [(0.0, optim.Adam, False), (0.1, optim.Adam, False),
                                              (0.1, optim.AdamW, True)])
def test_adam_and_adamw_follow_the_textbook(wd, cls, decoupled):
    grads = [0.5, -0.2, 0.1, 0.7, -1.3]
    ps = {"w": np.array([1.5])}
    opt = cls(ps, lr=0.05, betas=(0.8, 0.99), eps=1e-6, weight_decay=wd)
    for g in grads:
        opt.step({"w": np.array([g])})
    expected = adam_reference(1.5, grads, 0.05, 0.8, 0.99, 1e-6, wd, decoupled)
    np.testing.assert_allclose(ps["w"], [expected], rtol=1e-12)


def test_adamw_decays_weights_even_with_zero_gradient():
    ps = {"w": np.array([2.0])}
    opt = optim.AdamW(ps, lr=0.1, weight_decay=0.5)
    opt.step({"w": np.array([0.0])})
    np.testing.assert_allclose(ps["w"], [2.0 * (1 - 0.05)], rtol=1e-14)  # m = 0: only the decay acts


def test_step_decay_schedule():
    s = optim.StepDecay(0.1, step_size=10, gamma=0.5)
    assert [s(i) for i in (0, 9, 10, 19, 25)] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025])


def test_cosine_schedule_with_warmup():
    s = optim.Cosine(1.0, total_steps=10, warmup_steps=2, min_lr=0.0)
    assert s(0) == pytest.approx(0.5) and s(1) == pytest.approx(1.0)
    assert s(2) == pytest.approx(1.0)                       # cosine starts at the peak
    assert s(6) == pytest.approx(0.5)                       # half-way through 8 decay steps
    assert s(10) == 0.0 and s(50) == 0.0
    s2 = optim.Cosine(2.0, total_steps=4, min_lr=0.5)
    assert s2(0) == pytest.approx(2.0) and s2(2) == pytest.approx(1.25) and s2(4) == pytest.approx(0.5)


def test_one_cycle_schedule():
    s = optim.OneCycle(1.0, total_steps=101, pct_start=0.2, div_factor=10, final_div_factor=100)
    assert s(0) == pytest.approx(0.1)
    assert s(10) == pytest.approx(0.55)     # half-way up: mean of 0.1 and 1
    assert s(20) == pytest.approx(1.0)      # peak after 20% of the steps
    assert s(100) == pytest.approx(0.001)   # 0.1 / 100 at the last step
    values = [s(i) for i in range(101)]
    assert max(values) == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(values[:20], values[1:21]))
    assert all(a >= b for a, b in zip(values[20:-1], values[21:]))


def test_the_optimizer_uses_the_schedule_of_its_step_count():
    ps = params((0.0,))
    opt = optim.SGD(ps, lr=optim.StepDecay(1.0, step_size=1, gamma=0.5))
    assert opt.current_lr() == 1.0
    lrs = [opt.step({"w": np.array([1.0])}) for _ in range(3)]
    assert lrs == [1.0, 0.5, 0.25]
    np.testing.assert_allclose(ps["w"], [-1.75])


@pytest.mark.parametrize("s", [optim.Constant(0.1), optim.StepDecay(0.1, 5), optim.Cosine(0.1, 100, 10, 0.001),
                               optim.OneCycle(0.1, 100)])
def test_schedules_round_trip_through_json(s):
    again = optim.schedule_from_dict(json.loads(json.dumps(s.to_dict())))
    assert [again(i) for i in range(0, 120, 7)] == [s(i) for i in range(0, 120, 7)]


def test_gradient_clipping_by_global_norm():
    ps = {"a": np.array([0.0]), "b": np.array([0.0])}
    opt = optim.SGD(ps, lr=1.0, clip_norm=1.0)
    opt.step({"a": np.array([3.0]), "b": np.array([4.0])})   # norm 5 -> scaled by 1/5
    np.testing.assert_allclose([ps["a"][0], ps["b"][0]], [-0.6, -0.8], rtol=1e-6)
    opt.step({"a": np.array([0.3]), "b": np.array([0.4])})   # norm 0.5 < 1: untouched
    np.testing.assert_allclose([ps["a"][0], ps["b"][0]], [-0.9, -1.2], rtol=1e-6)


def small_model():
    return Sequential([Dense(4), Dense(3)], input_shape=(5,))


@pytest.mark.parametrize("make", [lambda m: optim.SGD(m, lr=0.1, momentum=0.9, nesterov=True),
                                  lambda m: optim.Adam(m, lr=0.01), lambda m: optim.AdamW(m, lr=0.01)])
def test_model_parameters_are_updated_in_place_and_keep_float32(make, rng):
    model = small_model()
    opt = make(model)
    before = {k: (id(v), v.copy()) for k, v in model.parameters().items()}
    x = rng.standard_normal((8, 5)).astype(np.float32)
    out = model.forward(x, train=True)
    _, d = xpnet.ops.sigmoid_bce_with_logits(out, np.zeros_like(out))
    model.backward(d)
    opt.step()
    for k, v in model.parameters().items():
        assert id(v) == before[k][0], "the parameter array was replaced instead of updated in place"
        assert v.dtype == np.float32
        assert not np.array_equal(v, before[k][1])
    for slots in opt.state.values():
        assert all(s.dtype == np.float32 for s in slots.values())


@pytest.mark.parametrize("make", [lambda p: optim.SGD(p, lr=0.1, momentum=0.8),
                                  lambda p: optim.Adam(p, lr=0.05, weight_decay=0.01),
                                  lambda p: optim.AdamW(p, lr=optim.Cosine(0.05, 10, 2))])
def test_state_saved_and_restored_continues_identically(make, rng):
    grads = [{"w": rng.standard_normal(3)} for _ in range(6)]
    a = {"w": np.ones(3)}
    opt_a = make(a)
    for g in grads[:3]:
        opt_a.step(g)
    meta, arrays = opt_a.state_dict()
    meta = json.loads(json.dumps(meta))  # it must survive JSON
    b = {"w": a["w"].copy()}
    opt_b = make(b)
    opt_b.load_state_dict(meta, arrays)
    assert opt_b.step_count == 3
    for g in grads[3:]:
        opt_a.step(g)
        opt_b.step(g)
    np.testing.assert_array_equal(a["w"], b["w"])


def test_loading_another_optimizers_state_is_refused():
    a = optim.Adam({"w": np.ones(2)})
    a.step({"w": np.ones(2)})
    meta, arrays = a.state_dict()
    with pytest.raises(ModelFileError, match="Adam.*not SGD"):
        optim.SGD({"w": np.ones(2)}, momentum=0.9).load_state_dict(meta, arrays)
    with pytest.raises(ModelFileError, match="does not fit"):
        optim.Adam({"v": np.ones(2)}).load_state_dict(meta, arrays)


def test_bad_arguments_are_usage_errors():
    with pytest.raises(UsageError, match="lr"):
        optim.SGD(params(), lr=-1)
    with pytest.raises(UsageError, match="nesterov"):
        optim.SGD(params(), nesterov=True)
    with pytest.raises(UsageError, match="empty"):
        optim.Adam({})
    with pytest.raises(UsageError, match="needs the gradients"):
        optim.SGD(params()).step()
    with pytest.raises(UsageError, match="no gradient"):
        optim.SGD(params()).step({"v": np.ones(2)})
    with pytest.raises(UsageError, match="warmup_steps"):
        optim.Cosine(0.1, total_steps=5, warmup_steps=5)


@pytest.mark.gpu
def test_cupy_step_matches_numpy(rng):
    """Same gradients on both backends: same parameters after a few Adam/Nesterov steps."""
    from xpnet import backend

    name = "cupy"
    p0 = rng.standard_normal((4, 3)).astype(np.float32)
    grads = [rng.standard_normal((4, 3)).astype(np.float32) for _ in range(4)]
    results = {}
    for be in ("numpy", name):
        xp = backend.module_for(be)
        for make in (lambda p: optim.AdamW(p, lr=0.01, clip_norm=1.0), lambda p: optim.SGD(p, 0.1, 0.9, True)):
            ps = {"w": xp.asarray(p0.copy())}
            opt = make(ps)
            for g in grads:
                opt.step({"w": xp.asarray(g)})
            assert backend.get_array_module(ps["w"]) is xp
            results.setdefault(be, []).append(backend.to_numpy(ps["w"]))
    for a, b in zip(results["numpy"], results[name]):
        np.testing.assert_allclose(a, b, **tolerance(np.float32))


@pytest.mark.parametrize("make", [
    lambda p: optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3, clip_norm=0.5),
    lambda p: optim.Adam(p, lr=1e-2, weight_decay=1e-3, clip_norm=0.5),
    lambda p: optim.AdamW(p, lr=1e-2, weight_decay=0.1),
])
def test_update_split_across_threads_gives_the_same_bits(make, rng):
    # Large models are updated in slices on the shard threads; every update is
    # element-wise, so the result must not depend on the number of slices.
    saved = xpnet.config.get_num_threads()
    shapes = {"w": (800, 700), "b": (7,), "v": (3, 5, 11)}  # 560k values: above the parallel threshold
    assert sum(math.prod(s) for s in shapes.values()) >= sliced_update.PARALLEL_MIN_SIZE
    start = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    steps = [{k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()} for _ in range(3)]
    steps[1]["w"] = np.asfortranarray(steps[1]["w"])  # a non-contiguous gradient too
    results = []
    try:
        for threads in (1, 3):
            xpnet.set_num_threads(threads)
            params = {k: v.copy() for k, v in start.items()}
            opt = make(params)
            assert sliced_update.slice_count([(k, p, None, {}) for k, p in params.items()], opt.sliceable) == threads
            for g in steps:
                opt.step(g)
            results.append(params)
    finally:
        xpnet.set_num_threads(saved)
    for k in shapes:
        assert results[0][k].dtype == np.float32
        np.testing.assert_array_equal(results[1][k], results[0][k])
        assert not np.array_equal(results[0][k], start[k])


def _big_params(rng):
    return {"w": rng.standard_normal((800, 700)).astype(np.float32), "b": rng.standard_normal(7).astype(np.float32)}


def test_a_subclass_update_sees_whole_named_parameters(rng):
    # Only the built-in updates are split across threads: a subclass may look at the name,
    # at the whole array, or rebind its slots.
    class NoDecayOnBias(optim.SGD):
        def _update(self, name, p, g, lr, slots):
            assert p.shape == (7,) if name == "b" else p.shape == (800, 700)
            if name == "b":
                p -= lr * g
            else:
                super()._update(name, p, g, lr, slots)

    saved = xpnet.config.get_num_threads()
    try:
        xpnet.set_num_threads(2)
        params = _big_params(rng)
        start = {k: v.copy() for k, v in params.items()}
        g = {k: np.ones_like(v) for k, v in params.items()}
        opt = NoDecayOnBias(params, lr=0.5, weight_decay=0.1)
        assert not opt.sliceable
        assert sliced_update.slice_count([(k, p, None, {}) for k, p in params.items()], opt.sliceable) == 1
        opt.step(g)
    finally:
        xpnet.set_num_threads(saved)
    np.testing.assert_allclose(params["b"], start["b"] - 0.5)
    np.testing.assert_allclose(params["w"], start["w"] - 0.5 * (1 + 0.1 * start["w"]), rtol=1e-6)


def test_the_callers_numpy_error_handling_reaches_every_slice(rng):
    saved = xpnet.config.get_num_threads()
    try:
        xpnet.set_num_threads(2)
        params = _big_params(rng)
        g = {k: np.zeros_like(v) for k, v in params.items()}
        g["w"][-1, -1] = 3e38  # in the last slice: lr * g overflows float32 there
        opt = optim.SGD(params, lr=10.0)
        assert sliced_update.slice_count([(k, p, None, {}) for k, p in params.items()], opt.sliceable) == 2
        with np.errstate(over="raise"), pytest.raises(FloatingPointError):
            opt.step(g)
    finally:
        xpnet.set_num_threads(saved)


def test_scratch_of_another_thread_count_is_dropped(rng):
    saved = xpnet.config.get_num_threads()
    params = _big_params(rng)
    g = {k: np.ones_like(v) for k, v in params.items()}
    opt = optim.Adam(params, lr=1e-3)
    try:
        for threads in (3, 2):
            xpnet.set_num_threads(threads)
            opt.step(g)
    finally:
        xpnet.set_num_threads(saved)
    # the large "w" in one slice per thread, the small "b" whole; none left from the 3-thread step
    assert set(opt._scratch_buffers) == {("w", 0), ("w", 1), "b"}


def test_update_work_covers_every_value_once_in_balanced_threads():
    # Large parameters are cut into one slice per thread, small ones stay whole; every value
    # is updated by exactly one thread, and no thread gets more than its share plus one unit.
    shapes = {"big": (600, 500), "mid": (300, 100), "small1": (50, 40), "small2": (2000,), "bias": (7,)}
    jobs = [(k, np.zeros(s, np.float32), None, {}) for k, s in shapes.items()]
    t = 3
    work = sliced_update.work_units(jobs, t)
    covered = {k: np.zeros(math.prod(s), int) for k, s in shapes.items()}
    loads = []
    for units in work:
        load = 0
        for (name, p, _, _), part in units:
            if part is None:
                covered[name] += 1
                load += p.size
            else:
                lo, hi = part * p.size // t, (part + 1) * p.size // t
                covered[name][lo:hi] += 1
                load += hi - lo
        loads.append(load)
    assert all((c == 1).all() for c in covered.values())
    whole = {name for units in work for (name, *_), part in units if part is None}
    assert whole == {"mid", "small1", "small2", "bias"}  # "big" (300k of 332k values) is sliced
    assert max(loads) - min(loads) <= 30000  # at most the largest whole unit apart
