"""xpnet: a small, fast, honest deep-learning library on NumPy (CPU) or CuPy (GPU).

    import xpnet
    xpnet.use("numpy")                 # or XPNET_BACKEND=cupy|numpy|auto
    model = xpnet.models.captcha_net()
    xpnet.save(model, "m.npz", metadata={...});  model, metadata = xpnet.load("m.npz")
    xpnet.Trainer(model, xpnet.AdamW(model), out_dir="runs/x").fit((x, y), epochs=10)
"""

__version__ = "0.1.0"

from . import backend, errors, ops, config as settings  # noqa: E402
from .nn import layers, models
from .nn import serialization as io, optim  # noqa: E402
from . import metrics
from .backend import (  # noqa: E402
    asarray, get_array_module, get_dtype, seed, set_dtype, to_numpy, use, using,
)
from .nn.layers import BatchNorm, Conv2D, Dense, Dropout, Flatten, MaxPool2D, ReLU  # noqa: E402
from .nn.sequential import Sequential  # noqa: E402
from .nn.serialization import load, load_checkpoint, save, save_checkpoint  # noqa: E402
from .nn.optim import SGD, Adam, AdamW  # noqa: E402
from .training.trainer import Trainer, fit  # noqa: E402
from .training import trainer as train  # noqa: E402,F811  (the module, next to the fit shortcut)
from .config import (  # noqa: E402
    fast_paths, fast_paths_enabled, get_im2col_budget_bytes, get_num_threads, set_im2col_budget, set_num_threads,
)

if backend.has_cupy_gpu:
    # On a CUDA machine, xpnet.ops run CuPy arrays through xpnet's CUDA kernels
    # (xpnet/cuda; XPNET_CUDA_KERNELS=0 keeps the generic xp code).  NumPy arrays
    # are untouched.  On a machine without a usable GPU nothing is installed.
    from .cuda import ops as _cuda_ops  # noqa: E402

    _cuda_ops.install()

__all__ = [
    "backend", "errors", "layers", "models", "ops",
    "use", "using", "asarray", "to_numpy", "get_array_module", "get_dtype", "set_dtype", "seed",
    "fast_paths", "fast_paths_enabled", "set_num_threads", "get_num_threads",
    "set_im2col_budget", "get_im2col_budget_bytes",
    "Sequential", "Conv2D", "MaxPool2D", "Dense", "ReLU", "Flatten", "Dropout", "BatchNorm",
    "io", "metrics", "optim", "train", "save", "load", "save_checkpoint", "load_checkpoint",
    "SGD", "Adam", "AdamW", "Trainer", "fit",
]
