"""Augmentation against a naive per-image loop; seeded, dtype- and backend-preserving."""

import numpy as np
import pytest

from xpnet import backend
from xpnet.data import Augment, augment, shift, warp
from xpnet.errors import ShapeError, UsageError
from tests.conftest import gpu_param


def _naive(batch, dy, dx, scale, fill):
    """out[n, c, i, j] = batch[n, c, src_i, src_j], one pixel at a time."""
    n, c, h, w = batch.shape
    out = np.empty_like(batch)
    cy, cx = (h - 1) / 2, (w - 1) / 2
    for k in range(n):
        for i in range(h):
            for j in range(w):
                si = int(np.floor((i - dy[k] - cy) / scale[k] + cy + 0.5))
                sj = int(np.floor((j - dx[k] - cx) / scale[k] + cx + 0.5))
                if fill == "edge":
                    out[k, :, i, j] = batch[k, :, min(max(si, 0), h - 1), min(max(sj, 0), w - 1)]
                elif 0 <= si < h and 0 <= sj < w:
                    out[k, :, i, j] = batch[k, :, si, sj]
                else:
                    out[k, :, i, j] = fill
    return out


@pytest.mark.parametrize("fill", ["edge", 255])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_shift_matches_the_naive_loop(rng, fill, dtype):
    x = rng.integers(0, 200, size=(6, 2, 5, 7)).astype(dtype)
    before = x.copy()
    dy = np.array([0, 1, -2, 3, -1, 2])
    dx = np.array([2, -3, 0, 1, 3, -1])
    out = shift(x, dy, dx, fill)
    assert out.dtype == x.dtype and out.shape == x.shape
    np.testing.assert_array_equal(out, _naive(x, dy, dx, np.ones(6), fill))
    np.testing.assert_array_equal(x, before)  # input not mutated
    # a shift of +1 moves content down/right by one pixel
    one = shift(x[:1], [1], [1], 0)
    np.testing.assert_array_equal(one[0, :, 1:, 1:], x[0, :, :-1, :-1])


@pytest.mark.parametrize("fill", ["edge", 7])
def test_warp_matches_the_naive_loop_and_reduces_to_shift(rng, fill):
    x = rng.integers(0, 255, size=(5, 3, 9, 12)).astype(np.uint8)
    dy, dx = np.array([0, 1, -1, 2, 0]), np.array([1, 0, -2, 1, 0])
    scale = np.array([1.0, 0.9, 1.12, 0.85, 1.2])
    np.testing.assert_array_equal(warp(x, dy, dx, scale, fill), _naive(x, dy, dx, scale, fill))
    np.testing.assert_array_equal(warp(x, dy, dx, np.ones(5), fill), shift(x, dy, dx, fill))


def test_augment_is_seeded_and_random_per_image(rng):
    x = rng.integers(0, 255, size=(64, 1, 12, 20)).astype(np.uint8)
    aug = Augment(max_shift=3, max_scale=0.1)
    a = aug(x, np.random.default_rng(9))
    b = aug(x, np.random.default_rng(9))
    c = aug(x, np.random.default_rng(10))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # the draws: dy, dx in [-3, 3], then scales -- reproduce them and compare with the oracle
    g = np.random.default_rng(9)
    dy, dx = g.integers(-3, 4, 64), g.integers(-3, 4, 64)
    scale = g.uniform(0.9, 1.1, 64)
    assert len(set(zip(dy.tolist(), dx.tolist()))) > 20  # images move independently
    np.testing.assert_array_equal(a, _naive(x, dy, dx, scale, "edge"))
    plain = augment(x, np.random.default_rng(9), max_shift=0)
    np.testing.assert_array_equal(plain, x)
    assert plain is not x


def test_bad_arguments():
    with pytest.raises(UsageError):
        Augment(max_shift=-1)
    with pytest.raises(UsageError):
        Augment(max_scale=1.5)
    with pytest.raises(UsageError):
        Augment(fill="white")
    with pytest.raises(ShapeError, match="\\(N, C, H, W\\)"):
        augment(np.zeros((3, 4, 5)), np.random.default_rng(0))
    with pytest.raises(UsageError, match="does not fit"):
        shift(np.zeros((1, 1, 3, 3), np.uint8), [1], [0], fill=300)


@pytest.mark.parametrize("name", gpu_param())
def test_same_result_on_each_backend(rng, name):
    xp = backend.module_for(name)
    x = rng.integers(0, 255, size=(8, 3, 10, 16)).astype(np.uint8)
    for aug in (Augment(2), Augment(2, 0.1, fill=255)):
        want = aug(x, np.random.default_rng(3))
        got = aug(xp.asarray(x), np.random.default_rng(3))
        assert backend.get_array_module(got) is xp and got.dtype == np.uint8
        np.testing.assert_array_equal(backend.to_numpy(got), want)
