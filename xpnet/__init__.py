"""xpnet: a small, fast, honest deep-learning library on NumPy (CPU) or CuPy (GPU).

    import xpnet
    xpnet.use("numpy")                 # or XPNET_BACKEND=cupy|numpy|auto
    model = xpnet.models.captcha_net()
    xpnet.save(model, "m.npz", metadata={...});  model, metadata = xpnet.load("m.npz")
    xpnet.Trainer(model, xpnet.AdamW(model), out_dir="runs/x").fit((x, y), epochs=10)

Layout: ``ops`` (the reference math) -> ``dispatch`` (which implementation runs)
<- ``cpu`` / ``cuda`` (faster implementations that register themselves);
``nn`` (layers, Sequential, optimizers, model files) and ``training`` on top;
``data`` and ``captcha`` (the application) above them; ``cli`` last.
"""

__version__ = "0.1.0"

from . import backend, config, dispatch, errors, metrics, ops  # noqa: E402
from .nn import layers, models, optim  # noqa: E402
from .backend import (  # noqa: E402
    asarray, get_array_module, get_dtype, seed, set_dtype, to_numpy, use, using,
)
from .nn.layers import BatchNorm, Conv2D, Dense, Dropout, Flatten, MaxPool2D, ReLU  # noqa: E402
from .nn.recurrent import GRU  # noqa: E402
from .nn.sequential import Sequential  # noqa: E402
from .nn.serialization import load, load_checkpoint, save, save_checkpoint  # noqa: E402
from .nn.onnx_export import export_onnx  # noqa: E402
from .nn.optim import SGD, Adam, AdamW  # noqa: E402
from .training.trainer import Trainer, fit  # noqa: E402
from .config import (  # noqa: E402
    fast_paths, fast_paths_enabled, get_im2col_budget_bytes, get_num_threads, get_shard_mode, set_im2col_budget,
    set_num_threads, set_shard_mode,
)
from .dispatch import reference_paths  # noqa: E402

# The faster implementations register themselves with xpnet.dispatch on import:
# the fused CPU path for NumPy, the CUDA kernels for CuPy arrays (inactive without a device).
from . import cpu, cuda  # noqa: E402,F401

__all__ = [
    "backend", "config", "dispatch", "errors", "layers", "models", "ops",
    "use", "using", "asarray", "to_numpy", "get_array_module", "get_dtype", "set_dtype", "seed",
    "reference_paths", "fast_paths", "fast_paths_enabled", "set_num_threads", "get_num_threads",
    "set_shard_mode", "get_shard_mode",
    "set_im2col_budget", "get_im2col_budget_bytes",
    "Sequential", "Conv2D", "MaxPool2D", "Dense", "GRU", "ReLU", "Flatten", "Dropout", "BatchNorm",
    "metrics", "optim", "save", "load", "save_checkpoint", "load_checkpoint", "export_onnx",
    "SGD", "Adam", "AdamW", "Trainer", "fit",
]
