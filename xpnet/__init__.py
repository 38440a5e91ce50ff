"""xpnet: a small, fast, honest deep-learning library on NumPy (CPU) or CuPy (GPU).

    import xpnet
    xpnet.use("numpy")                 # or XPNET_BACKEND=cupy|numpy|auto
    model = xpnet.models.captcha_net()
"""

__version__ = "0.1.0"

from . import backend, errors, layers, models, ops, settings  # noqa: E402
from .backend import (  # noqa: E402
    asarray, get_array_module, get_dtype, seed, set_dtype, to_numpy, use, using,
)
from .layers import BatchNorm, Conv2D, Dense, Dropout, Flatten, MaxPool2D, ReLU  # noqa: E402
from .model import Sequential  # noqa: E402
from .settings import (  # noqa: E402
    fast_paths, fast_paths_enabled, get_im2col_budget_bytes, get_num_threads, set_im2col_budget, set_num_threads,
)

__all__ = [
    "backend", "errors", "layers", "models", "ops",
    "use", "using", "asarray", "to_numpy", "get_array_module", "get_dtype", "set_dtype", "seed",
    "fast_paths", "fast_paths_enabled", "set_num_threads", "get_num_threads",
    "set_im2col_budget", "get_im2col_budget_bytes",
    "Sequential", "Conv2D", "MaxPool2D", "Dense", "ReLU", "Flatten", "Dropout", "BatchNorm",
]
