"""Running out of memory (device or host), and CUDA driver failures, as one sentence.

Two failures get a sentence instead of a traceback:

* **Out of memory** in a training or inference step: ``oom_guard`` turns
  ``cupy.cuda.memory.OutOfMemoryError`` (and the CUDA/cuBLAS allocation
  errors, and NumPy's ``MemoryError`` on the CPU) into ``OutOfMemoryError``
  with the batch size that would fit, estimated from the model's layer shapes
  (``step_memory``) for the path that runs (``active_path``: xpnet's CUDA
  kernels or the generic ops) and the memory free on the device::

      with memory.oom_guard(model, batch_size=len(x)):
          logits = model.forward(x, train=True)
          loss, d = sigmoid_bce_with_logits(logits, t)
          model.backward(d)

* **CuPy built for a CUDA newer than the driver** (the kernels cannot load):
  ``DriverMismatchError`` naming the wheel to install.

The guard costs nothing on the normal path (no device synchronisation, no
memory queries): it only acts once an exception is on its way out.
"""

from __future__ import annotations

import contextlib
import os
import traceback

import numpy

from . import backend, config, dispatch
from .cuda.driver import DriverMismatchError, current_driver_mismatch_message
from .cuda.ops import KernelOps
from .errors import BackendError

MiB = 1024 ** 2

# Share of the free memory a suggested batch may plan to use, and a fixed
# reserve: allocator rounding, cuBLAS workspaces, fragmentation.
SAFETY = 0.85
RESERVE_BYTES = 64 * MiB

# Substrings of CuPy / CUDA errors that mean "allocation failed" ...
_MEMORY_MARKERS = ("cudaErrorMemoryAllocation", "CUDA_ERROR_OUT_OF_MEMORY", "CUBLAS_STATUS_ALLOC_FAILED",
                   "CUSOLVER_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED", "out of memory")
# ... and "this CuPy / these kernels do not match the driver".
_DRIVER_MARKERS = ("cudaErrorInsufficientDriver", "CUDA_ERROR_UNSUPPORTED_PTX_VERSION",
                   "cudaErrorUnsupportedPtxVersion", "CUDA_ERROR_NO_BINARY_FOR_GPU",
                   "cudaErrorNoKernelImageForDevice", "driver version is insufficient")
_CUDA_ERROR_TYPES = ("CUDARuntimeError", "CUDADriverError", "CUBLASError", "CUSOLVERError", "CuDNNError",
                     "CompileException")


class OutOfMemoryError(BackendError, MemoryError):
    """A step ran out of device (or host) memory; the message gives a batch size that fits."""


# ------------------------------------------------------------ memory estimate

PATHS = ("generic", "kernels", "fused")
_PATH_WORDS = {"generic": "the generic ops", "kernels": "xpnet's CUDA kernels",
               "fused": "the fused CPU path (estimated as the generic ops, which need more)"}


def _prod(shape) -> int:
    return int(numpy.prod(shape, dtype=numpy.int64)) if shape else 1


def active_path(model) -> str:
    """The path a step of ``model`` would take, as ``xpnet.dispatch`` decides it now:

    * "fused": a chain executor takes the whole model (the fused CPU path on NumPy; it works on
      cache-sized chunks, so the generic estimate is an upper bound for it);
    * "kernels": the convolutions run xpnet's CUDA kernels (``xpnet.cuda.ops``, on CuPy or an
      emulated runtime registered for a block); the kernels register conv, pooling, ReLU backward
      and the loss behind one guard, so the convolution decides for all of them;
    * "generic": the ops of ``xpnet.ops``.

    Asked with the model's own weights and an empty batch of their backend and dtype: the guards
    a step meets, without allocating anything.
    """
    params = [p for layer in model.layers for p in layer.params.values()]
    if not params:
        return "generic"
    probe = params[0].reshape(-1)[:0]  # zero-size: only its backend and dtype matter to the guards
    if dispatch.chain_for(model, probe) is not None:
        return "fused"
    conv = next((layer for layer in model.layers if type(layer).__name__ == "Conv2D" and layer.params), None)
    if conv is None:
        return "generic"
    w, b = conv.params["W"], conv.params.get("b")
    x = w[:0]
    name = "cupy" if backend.is_cupy_array(w) else "numpy"
    forced = config.reference_forced()
    for impl in dispatch.implementations("conv2d_forward", name):
        if forced and not impl.follows_cache or impl.available():
            continue
        if impl.applies(x, w, b):
            return "kernels" if isinstance(getattr(impl.fn, "__self__", None), KernelOps) else "generic"
    return "generic"


def step_memory(model, train: bool = True, path: str | None = None) -> dict:
    """Analytic bytes of one step of ``model`` (built) on ``path``: "generic" (the ops of
    ``xpnet.ops``) or "kernels" (``xpnet.cuda.ops``); default ``active_path(model)``.

    Returns {"per_sample": bytes that grow with the batch, "fixed": bytes that
    do not (parameters, their gradients and two optimizer slots), "layers":
    [(layer name, per-sample bytes it keeps or needs at its peak)], "kept":
    [(layer name, per-sample bytes of its cache until backward)], "path"}.

    Training keeps every layer's cache (im2col columns, ReLU outputs, pool
    argmax indices, BatchNorm's normalised input, dropout masks, Dense inputs)
    until backward, plus the largest temporary of any one layer (forward or
    backward: im2col's dcol, col2im's canvas, pooling's window copies).
    Inference keeps nothing: its peak is the largest layer's input, output
    and temporaries together.  The kernels differ where they need less: im2col
    and col2im index the padding instead of copying a padded image, pooling keeps
    int32 window indices and gathers dx in one pass, ReLU backward is one kernel.
    Also returned: "path".
    """
    if not model.built:
        raise BackendError(f"model '{model.name}' is not built: give input_shape or run a batch first.")
    path = active_path(model) if path is None else path
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    kernels = path == "kernels"
    s = numpy.dtype(model.dtype).itemsize
    shape = model.input_shape
    kept_total = 0
    peak_temp = 0
    rows, kept_rows = [], []
    prev_output_kept = False  # is the current input already counted as some layer's cache?
    for layer in model.layers:
        kind = type(layer).__name__
        in_n, out_n = _prod(shape), _prod(layer.output_shape)
        kept, fwd, bwd = 0, 0, 0
        out_kept = False
        if kind == "Conv2D":
            c, h, w = shape
            kh, kw = layer.kernel_size
            ph, pw = layer.pad
            _, oh, ow = layer.output_shape
            col = oh * ow * c * kh * kw * s
            padded = c * (h + 2 * ph) * (w + 2 * pw) * s if (ph or pw) else 0
            kept = col if train else 0
            if kernels:
                # im2col (no padded copy), the GEMM's output, the batch-first copy y.
                fwd = (0 if train else col) + 2 * out_n * s
                # dy transposed, dcol, dx gathered straight from dcol (no canvas).
                bwd = out_n * s + col + in_n * s
            else:
                # im2col (padded copy + col), the product y2, the NCHW copy y.
                fwd = padded + (0 if train else col) + 2 * out_n * s
                # dy2 copy, dcol, the padded canvas, the cropped dx.
                bwd = out_n * s + col + c * (h + 2 * ph) * (w + 2 * pw) * s + in_n * s
        elif kind == "MaxPool2D":
            kh, kw = layer.size
            k = kh * kw
            if kernels:
                kept = out_n * 4 if train else 0  # int32 window indices
                fwd = out_n * (s + 4)  # y and the indices, read straight from x
                bwd = in_n * s  # dx, each element gathered once
            elif tuple(layer.stride) == (kh, kw) and tuple(layer.pad) == (0, 0):
                # Non-overlapping windows: K-1 bool "later block won" records, no window copy.
                kept = out_n * (k - 1) if train else 0
                fwd = out_n * (s + k - 1)  # y and the records
                bwd = in_n * s + out_n * (2 + s)  # dx and three scratch arrays of dy's shape
            else:
                kept = out_n * 8 if train else 0  # int64 argmax indices
                fwd = in_n * s + out_n * (s + 8)  # padded / window copy, max, argmax
                bwd = out_n * k * (s + 1) + 2 * in_n * s  # compare mask, dwin, canvas, dx
        elif kind == "ReLU":
            kept, out_kept = (out_n * s, True) if train else (0, False)
            fwd = out_n * s
            bwd = in_n * s if kernels else out_n + 2 * in_n * s  # one kernel, or mask + product
        elif kind == "Dense":
            kept = in_n * s if (train and not prev_output_kept) else 0
            fwd = out_n * s
            bwd = out_n * s + in_n * s
        elif kind == "BatchNorm":
            kept = out_n * s if train else 0
            fwd = 4 * out_n * s
            bwd = 5 * out_n * s
        elif kind == "Dropout":
            kept = out_n * s if train else 0
            fwd = out_n * (2 * s + 1)
            bwd = 2 * out_n * s
        elif kind == "Flatten":
            out_kept = prev_output_kept  # a view of its input
        else:  # an unknown layer: assume it keeps its output and needs two more
            kept = out_n * s if train else 0
            fwd = bwd = 2 * out_n * s
        kept_total += kept
        kept_rows.append((layer.name, kept))
        if train:
            peak_temp = max(peak_temp, fwd, bwd)
            rows.append((layer.name, kept + max(fwd, bwd)))
        else:
            need = in_n * s + fwd
            peak_temp = max(peak_temp, need)
            rows.append((layer.name, need))
        prev_output_kept = out_kept
        shape = layer.output_shape
    per_sample = kept_total + peak_temp
    param_bytes = sum(int(p.nbytes) for p in model.parameters().values())
    fixed = param_bytes * (4 if train else 1)  # weights, gradients, two optimizer slots (Adam)
    return {"per_sample": int(per_sample), "fixed": int(fixed), "layers": rows, "kept": kept_rows, "path": path}


def suggest_batch_size(model, free_bytes: int, train: bool = True, already_allocated: bool = True,
                       path: str | None = None) -> int:
    """The largest batch whose step should fit in ``free_bytes`` (0 when not even one does).

    ``already_allocated``: the model's weights (and, for training, gradients and
    optimizer state) already live on the device, so they are not in ``free_bytes``.
    ``path``: as in ``step_memory`` (default: the path that would run).
    """
    est = step_memory(model, train, path)
    budget = free_bytes * SAFETY - RESERVE_BYTES
    if not already_allocated:
        budget -= est["fixed"]
    elif train and not all(l.grads for l in model.layers if l.params):
        # Gradients and optimizer slots are not allocated yet: keep room for them.
        budget -= est["fixed"] * 3 // 4
    return max(0, int(budget // est["per_sample"]))


def free_memory(where: str) -> tuple[int, str]:
    """(free bytes, device description) on ``where`` ("cupy" or "numpy")."""
    if where == "cupy" and backend.cupy is not None:
        cp = backend.cupy
        pool = cp.get_default_memory_pool()
        pool.free_all_blocks()  # cached blocks count as free
        dev = cp.cuda.Device()
        free, _total = dev.mem_info
        limit = pool.get_limit()  # 0: none; set by set_limit() or CUPY_GPU_MEMORY_LIMIT
        if limit:
            free = min(free, max(0, limit - pool.used_bytes()))
        name = cp.cuda.runtime.getDeviceProperties(dev.id)["name"]
        name = name.decode() if isinstance(name, bytes) else str(name)
        return int(free), f"GPU {dev.id} ({name})"
    return _host_available(), "the host"


def max_batch_size(model, train: bool = True) -> int:
    """The largest batch that should fit in the memory free now on the model's backend."""
    free, _ = free_memory(model.backend or backend.current())
    return suggest_batch_size(model, free, train)


def _host_available() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def _fmt_bytes(n: float) -> str:
    if n >= 1024 ** 3:
        return f"{n / 1024 ** 3:.1f} GiB"
    return f"{n / MiB:.1f} MiB"


def out_of_memory_message(model, batch_size: int, free_bytes: int, where: str, what: str = "training step",
                          train: bool = True) -> str:
    """The one sentence: what ran out, where, and the batch size that should fit."""
    est = step_memory(model, train)
    fit = suggest_batch_size(model, free_bytes, train, path=est["path"])
    on = _PATH_WORDS[est["path"]]
    head = (f"Out of memory on {where} in the {what} of model '{model.name}' at batch size {batch_size} "
            f"(about {_fmt_bytes(est['per_sample'])} per sample with {on}, {_fmt_bytes(free_bytes)} free)")
    if fit >= 1:
        if fit >= batch_size:  # the estimate thinks it fits: memory is held elsewhere
            return (f"{head}: other arrays or processes hold the memory; free them, or use a batch size "
                    f"below {batch_size}.")
        return f"{head}: use a batch size of {fit} or less."
    return (f"{head}: not even a batch of 1 fits; free memory held by other processes "
            "(nvidia-smi lists them) or run on the CPU with XPNET_BACKEND=numpy.")


# ------------------------------------------------------------------ the guard

def classify(exc: BaseException) -> str | None:
    """"memory", "driver" or None (not ours to translate)."""
    if isinstance(exc, (OutOfMemoryError, DriverMismatchError)):
        return None
    if isinstance(exc, MemoryError):  # CuPy's OutOfMemoryError and NumPy's both are
        return "memory"
    if type(exc).__name__ not in _CUDA_ERROR_TYPES:
        return None
    text = str(exc)
    if any(m in text for m in _DRIVER_MARKERS):
        return "driver"
    if any(m in text for m in _MEMORY_MARKERS):
        return "memory"
    return None


def _release(model, exc) -> None:
    """Drop what the failed step still holds so the free memory can be measured."""
    traceback.clear_frames(exc.__traceback__)  # the frames' local arrays
    for layer in model.layers:
        layer.clear_cache()


@contextlib.contextmanager
def oom_guard(model, batch_size: int, what: str = "training step", train: bool = True):
    """Turn memory and driver failures inside the block into one-sentence xpnet errors.

    ``what`` names the work in the message ("training step", "prediction");
    ``train`` selects the memory estimate (caches kept for backward or not).
    """
    try:
        yield
    except Exception as exc:
        kind = classify(exc)
        if kind is None:
            raise
        if kind == "driver":
            raise DriverMismatchError(current_driver_mismatch_message()) from exc
        where = model.backend or backend.current()
        _release(model, exc)
        free, device = free_memory(where)
        raise OutOfMemoryError(
            out_of_memory_message(model, batch_size, free, device if where == "cupy" else "the host",
                                  what, train)
        ) from exc
