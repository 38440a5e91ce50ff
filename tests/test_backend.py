import os
import subprocess
import sys

import numpy as np
import pytest

import xpnet
from xpnet import backend
from xpnet.errors import BackendError, BackendUsageError, DeviceMismatchError, ShapeError, UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, env_extra=None):
    env = dict(os.environ)
    env.pop("XPNET_BACKEND", None)
    env.update(env_extra or {})
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "xpnet", *args], capture_output=True, text=True, env=env, cwd=ROOT)


def test_use_and_using_scope():
    assert backend.current() == "numpy"
    with xpnet.using("numpy") as name:
        assert name == "numpy"
    assert backend.current() == "numpy"
    assert xpnet.use("auto") in ("numpy", "cupy")


def test_unknown_backend_name_is_usage_error():
    with pytest.raises(BackendUsageError, match="Unknown backend 'gpu'.*numpy, cupy or auto"):
        xpnet.use("gpu")
    assert backend.current() == "numpy"  # unchanged after the error


@pytest.mark.skipif(backend.has_cupy, reason="CuPy is installed here")
def test_cupy_requested_without_cupy():
    with pytest.raises(BackendError, match=r"CuPy was asked for .* not installed: pip install \"xpnet\[cuda12\]\""):
        xpnet.use("cupy")


def test_cupy_installed_but_no_device(monkeypatch):
    # Simulate: CuPy importable, no usable device.
    monkeypatch.setattr(backend, "cupy", object())
    monkeypatch.setattr(backend, "has_cupy_gpu", False)
    monkeypatch.setattr(backend, "_device_reason", "no CUDA device is visible")
    with pytest.raises(BackendError, match="is installed, but no CUDA device is usable: no CUDA device is visible"):
        xpnet.use("cupy")
    assert xpnet.use("auto") == "numpy"
    assert "no CUDA device is visible" in backend.reason()


def test_driver_too_old_names_the_wheel(monkeypatch):
    class FakeRuntime:
        @staticmethod
        def driverGetVersion():
            return 12040

        @staticmethod
        def runtimeGetVersion():
            return 13000

        @staticmethod
        def getDeviceCount():
            return 1

    class FakeCupy:
        class cuda:
            runtime = FakeRuntime

    monkeypatch.setattr(backend, "cupy", FakeCupy)
    ok, why = backend._probe_device()
    assert not ok
    assert "needs CUDA 13.0" in why and "supports only CUDA 12.4" in why and "cupy-cuda12x" in why


def test_env_variable_errors_are_deferred_to_first_use(monkeypatch):
    monkeypatch.setenv("XPNET_BACKEND", "tpu")
    backend._init_from_env()
    with pytest.raises(BackendUsageError, match="XPNET_BACKEND=tpu"):
        backend.current()
    monkeypatch.setenv("XPNET_BACKEND", "numpy")
    monkeypatch.setenv("XPNET_DTYPE", "float16")
    backend._init_from_env()
    with pytest.raises(BackendUsageError, match="XPNET_DTYPE"):
        backend.current()
    monkeypatch.setenv("XPNET_DTYPE", "float64")
    backend._init_from_env()
    assert backend.current() == "numpy" and backend.get_dtype() == np.float64


def test_dtype_switch():
    assert xpnet.get_dtype() == np.float32
    xpnet.set_dtype("float64")
    assert xpnet.get_dtype() == np.float64
    xpnet.set_dtype(np.float32)
    with pytest.raises(BackendUsageError, match="float32 or float64"):
        xpnet.set_dtype("int8")


def test_asarray_to_numpy_and_module():
    a = xpnet.asarray([1.0, 2.0], dtype=np.float32)
    assert isinstance(a, np.ndarray) and a.dtype == np.float32
    assert xpnet.get_array_module(a) is np
    assert xpnet.to_numpy(a) is a or np.array_equal(xpnet.to_numpy(a), a)


def test_seed_makes_init_reproducible():
    xpnet.seed(7)
    w1 = xpnet.models.captcha_net().parameters()["conv1.W"].copy()
    xpnet.seed(7)
    w2 = xpnet.models.captcha_net().parameters()["conv1.W"]
    xpnet.seed(8)
    w3 = xpnet.models.captcha_net().parameters()["conv1.W"]
    assert np.array_equal(w1, w2) and not np.array_equal(w1, w3)
    with pytest.raises(BackendUsageError):
        xpnet.seed(-1)


def test_mixed_backends_name_the_layer():
    class FakeCupyArray(np.ndarray):
        pass

    import types

    fake = types.SimpleNamespace(ndarray=FakeCupyArray)
    model = xpnet.models.simple_convnet()
    x = np.zeros((2, 1, 28, 28), np.float32)
    # Pretend the parameters live on the GPU: x (NumPy) must be refused, naming the layer.
    old = backend.cupy
    try:
        backend.cupy = fake
        model.layers[0].params["W"] = model.layers[0].params["W"].view(FakeCupyArray)
        with pytest.raises(DeviceMismatchError, match=r"Layer 'conv1' has its parameters on cupy but was given a numpy array.*xpnet.asarray"):
            model.forward(x)
    finally:
        backend.cupy = old


def test_wrong_dtype_batch_is_refused_not_upcast():
    model = xpnet.models.simple_convnet()
    with pytest.raises(ShapeError, match="float32 parameters but the batch is float64"):
        model.forward(np.zeros((2, 1, 28, 28)))
    with pytest.raises(ShapeError, match=r"batches of shape \(N, 1, 28, 28\)"):
        model.forward(np.zeros((2, 1, 28, 27), np.float32))


def test_cli_info_ok():
    r = run_cli("info", env_extra={"XPNET_BACKEND": "numpy"})
    assert r.returncode == 0, r.stderr
    assert "backend      numpy" in r.stdout and "XPNET_BACKEND=numpy" in r.stdout and "numpy " in r.stdout


def test_cli_info_json():
    import json

    r = run_cli("info", "--json")
    assert r.returncode == 0
    data = json.loads(r.stdout)
    assert data["backend"] in ("numpy", "cupy") and data["versions"]["numpy"] == np.__version__


def test_cli_unknown_backend_exit_2_one_sentence():
    r = run_cli("info", env_extra={"XPNET_BACKEND": "gpu"})
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == ["xpnet: error: XPNET_BACKEND=gpu is not valid: choose one of numpy, cupy, auto."]


@pytest.mark.skipif(backend.has_cupy_gpu, reason="a GPU is usable here")
def test_cli_cupy_unavailable_exit_1():
    r = run_cli("info", env_extra={"XPNET_BACKEND": "cupy"})
    assert r.returncode == 1
    assert "Traceback" not in r.stderr and "CuPy was asked for (XPNET_BACKEND=cupy)" in r.stderr


def test_cli_debug_shows_traceback():
    r = run_cli("--debug", "info", env_extra={"XPNET_BACKEND": "gpu"})
    assert r.returncode == 2 and "Traceback" in r.stderr


def test_error_types_derive_from_builtins():
    assert issubclass(BackendUsageError, ValueError) and issubclass(BackendUsageError, UsageError)
    assert issubclass(BackendError, RuntimeError)
