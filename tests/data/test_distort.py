"""Stronger augmentation (xpnet.data.distort) against naive references; seeded, dtype- and backend-preserving."""

import numpy as np
import pytest

from xpnet import backend
from xpnet.data import Distort, distort
from xpnet.data.distort import ELASTIC_GRID, photometric, resample
from xpnet.errors import ShapeError, UsageError
from tests.conftest import gpu_param


def _naive_resample(batch, angle, shears, disp):
    """Pixel by pixel: the source of (i, j) is the rotated, unsheared, displaced offset, nearest, clamped."""
    n, c, h, w = batch.shape
    cy, cx = (h - 1) / 2, (w - 1) / 2
    out = np.empty_like(batch)
    for k in range(n):
        for i in range(h):
            for j in range(w):
                di, dj = i - cy, j - cx
                si = np.cos(angle[k]) * di + np.sin(angle[k]) * dj
                sj = np.cos(angle[k]) * dj - np.sin(angle[k]) * di
                sj -= shears[k] * si
                si, sj = si + disp[k, 0, i, j], sj + disp[k, 1, i, j]
                r = min(max(int(np.floor(si + cy + 0.5)), 0), h - 1)
                q = min(max(int(np.floor(sj + cx + 0.5)), 0), w - 1)
                out[k, :, i, j] = batch[k, :, r, q]
    return out


def test_quarter_turn_of_a_square_image_is_rot90(rng):
    x = rng.integers(0, 255, size=(2, 3, 6, 6)).astype(np.uint8)
    out = resample(x, angle=np.full(2, np.pi / 2))
    np.testing.assert_array_equal(out, np.rot90(x, k=1, axes=(2, 3)))


def test_resample_matches_the_naive_loop(rng):
    x = rng.integers(0, 255, size=(3, 2, 9, 14)).astype(np.uint8)
    angle = np.radians([7.0, -4.0, 0.0])
    shears = np.array([0.2, -0.1, 0.3])
    offsets = rng.normal(0, 1.5, (3, 2) + ELASTIC_GRID)
    # the elastic offsets at the pixels: separable linear interpolation between the knots
    disp = np.empty((3, 2, 9, 14))
    for k in range(3):
        for d in range(2):
            rows = np.array([np.interp(np.linspace(0, ELASTIC_GRID[0] - 1, 9), np.arange(ELASTIC_GRID[0]),
                                       offsets[k, d, :, q]) for q in range(ELASTIC_GRID[1])]).T  # (9, gw)
            disp[k, d] = np.array([np.interp(np.linspace(0, ELASTIC_GRID[1] - 1, 14), np.arange(ELASTIC_GRID[1]),
                                             rows[i]) for i in range(9)])
    got = resample(x, angle, shears, offsets)
    np.testing.assert_array_equal(got, _naive_resample(x, angle, shears, disp))


def test_photometric_matches_a_float64_reference(rng):
    x = rng.integers(0, 255, size=(4, 1, 5, 7)).astype(np.uint8)
    factors = np.array([0.7, 1.3, 1.0, 1.1])
    field = rng.normal(0, 5, x.shape).astype(np.float32)
    blurred = np.array([True, False, True, False])
    got = photometric(x, factors, field, blurred)
    ref = x.astype(np.float64)
    mean = ref.mean(axis=(1, 2, 3), keepdims=True)
    ref = (ref - mean) * factors[:, None, None, None] + mean + field
    k = np.array([1.0, 2.0, 1.0]) / 4
    for n in np.flatnonzero(blurred):
        p = np.pad(ref[n, 0], 1, mode="edge")
        ref[n, 0] = sum(k[a] * k[b] * p[a:a + 5, b:b + 7] for a in range(3) for b in range(3))
    want = np.clip(np.rint(ref), 0, 255)
    assert got.dtype == np.uint8
    assert np.abs(got.astype(int) - want).max() <= 1  # float32 rounding at .5 boundaries only
    f = photometric(x.astype(np.float64), factors, field, blurred)
    assert f.dtype == np.float64
    np.testing.assert_allclose(f, ref, rtol=1e-6, atol=1e-5)  # the field was float32


def test_distort_is_seeded_random_per_image_and_keeps_dtype(rng):
    x = rng.integers(0, 255, size=(16, 1, 12, 20)).astype(np.uint8)
    before = x.copy()
    d = Distort(rotate=8, shear=0.2, elastic=1.0, noise=6, blur=0.5, contrast=0.3)
    a, b = d(x, np.random.default_rng(4)), d(x, np.random.default_rng(4))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(x, before)  # input not mutated
    assert a.dtype == np.uint8 and a.shape == x.shape
    assert not np.array_equal(a, d(x, np.random.default_rng(5)))
    changed = [np.abs(a[k].astype(int) - x[k]).mean() for k in range(16)]
    assert min(changed) > 0 and len(set(np.round(changed, 3))) > 12  # every image changed, each its own way
    f = d(x.astype(np.float32), np.random.default_rng(4))
    assert f.dtype == np.float32


def test_nothing_asked_nothing_changed_and_no_draws(rng):
    x = rng.integers(0, 255, size=(3, 2, 5, 6)).astype(np.uint8)
    g = np.random.default_rng(1)
    out = distort(x, g)
    np.testing.assert_array_equal(out, x)
    assert out is not x
    assert g.random() == np.random.default_rng(1).random()  # the generator was not advanced
    assert not Distort().active and Distort(blur=0.1).active


def test_constant_image_stays_constant_under_geometry(rng):
    x = np.full((4, 1, 8, 12), 200, np.uint8)
    out = distort(x, rng, rotate=20, shear=0.5, elastic=3.0)
    assert (out == 200).all()


def test_bad_settings_and_shapes_are_refused():
    for kwargs in ({"rotate": -1}, {"blur": 1.5}, {"contrast": 1.0}, {"noise": float("nan")}, {"shear": True}):
        with pytest.raises(UsageError):
            Distort(**kwargs)
    with pytest.raises(UsageError, match="unknown distort setting"):
        Distort.from_dict({"rotation": 3})
    assert Distort.from_dict({"rotate": 3}).rotate == 3 and Distort.from_dict(None) == Distort()
    with pytest.raises(ShapeError):
        distort(np.zeros((3, 4, 5)), np.random.default_rng(0), rotate=2)


@pytest.mark.parametrize("name", gpu_param())
def test_same_result_on_each_backend(rng, name):
    xp = backend.module_for(name)
    x = rng.integers(0, 255, size=(8, 3, 10, 16)).astype(np.uint8)
    d = Distort(rotate=6, shear=0.15, elastic=1.0, noise=5, blur=0.5, contrast=0.2)
    want = d(x, np.random.default_rng(3))
    got = d(xp.asarray(x), np.random.default_rng(3))
    assert backend.get_array_module(got) is xp and got.dtype == np.uint8
    # float32 sums may round a .5 pixel differently on the device
    assert np.abs(backend.to_numpy(got).astype(int) - want).max() <= 1


def test_the_training_transform_distorts_and_the_evaluation_transform_does_not(rng):
    from xpnet.captcha.network import make_transforms
    from xpnet.data import Preprocess
    x = rng.integers(0, 255, size=(6, 1, 8, 16)).astype(np.uint8)
    y = np.zeros((6, 4))
    pp = Preprocess(height=8, width=16, channels=1)
    plain_train, plain_eval = make_transforms(pp, 0, 0.0)
    train, evaluate = make_transforms(pp, 0, 0.0, distort={"noise": 20.0})
    backend.seed(0)
    a = plain_train(x, y)[0]
    backend.seed(0)
    b = train(x, y)[0]
    assert a.shape == b.shape and not np.allclose(a, b)
    np.testing.assert_array_equal(evaluate(x, y)[0], plain_eval(x, y)[0])
    np.testing.assert_array_equal(plain_train(x, y)[0], plain_eval(x, y)[0])  # nothing asked: no change
