"""The CAPTCHA reader's network and what feeds it: the named model, its output prior, the batch transforms."""

from __future__ import annotations

import inspect
import math

from .. import backend
from ..data.augment import augment
from ..data.distort import Distort
from ..data.images import Preprocess
from ..data.labels import Charset
from ..errors import ShapeError, UsageError
from ..nn import models


def build_model(name: str, charset: Charset, pp: Preprocess, **extra):
    """The named network for ``charset`` (one block of classes per character) and input ``pp.shape``.

    ``extra`` goes to the builder (a configuration's ``model_kwargs``).
    """
    if name not in models.MODELS:
        raise UsageError(f"unknown model {name!r}: choose one of {', '.join(models.MODELS)}.")
    fn = models.MODELS[name]
    params = inspect.signature(fn).parameters
    unknown = sorted(set(extra) - set(params))
    if unknown:
        raise UsageError(f"model {name} has no argument(s) {', '.join(unknown)} (from model_kwargs).")
    kwargs = {"input_shape": pp.shape, **extra}
    if "length" in params:
        kwargs.update(length=charset.length, n_classes=charset.n_classes)
    elif getattr(fn, "head", "bce") == "ctc":  # per-column scores: the charset's classes (and a blank)
        kwargs["n_classes"] = charset.n_classes
    else:  # a one-label network: one output per (position, class) unit
        kwargs["n_classes"] = charset.n_outputs
    try:
        return fn(**kwargs)
    except ShapeError as exc:
        raise UsageError(f"model {name} cannot take {pp.channels}x{pp.height}x{pp.width} inputs ({exc}): "
                         f"use a larger --height/--width.") from None


def ctc_columns(name: str, charset: Charset, pp: Preprocess, model_kwargs=None) -> int:
    """T: the columns (time steps) the CTC model ``name`` reads from inputs ``pp.shape``, so the
    longest text it can emit (a throwaway model is built to find out; the run's weights are drawn
    later from its own seed)."""
    model = build_model(name, charset, pp, **(model_kwargs or {}))
    shape = model.output_shape
    if len(shape) != 2:
        raise UsageError(f"model {name} does not give per-column scores (its output is {shape}): it cannot "
                         f"read with a CTC head.")
    return int(shape[0])


def set_prior_bias(model, charset: Charset) -> None:
    """Set the last layer's biases to the logit of the class prior 1 / n_classes (every output unit).

    The first steps then need not learn that almost every output is "no".
    """
    last = [layer for layer in model.layers if "b" in layer.params][-1]
    b = last.params["b"]
    if b.shape[0] != charset.n_outputs:
        raise UsageError(f"prior_bias: the last biased layer of {model.name} has {b.shape[0]} units, "
                         f"not {charset.n_outputs}.")
    p = 1.0 / charset.n_classes
    b[...] = b.dtype.type(math.log(p / (1.0 - p)))


def make_transforms(pp: Preprocess, max_shift: int, max_scale: float, float_targets: bool = True,
                    distort: dict | None = None):
    """(train_transform, eval_transform): uint8 (N, C, H, W) images -> floats, on the device.

    Training batches are shifted/scaled per image first, then distorted as ``distort``
    says (``xpnet.data.distort`` settings; random numbers from ``xpnet.backend.rng()``,
    which checkpoints save), then normalised as ``pp`` says.
    Targets become floats of the model's dtype (multi-hot for BCE), or stay as they are
    (``float_targets=False``: CTC's packed integer labels).
    """
    distortion = Distort.from_dict(distort)

    def eval_transform(x, y):
        dtype = backend.get_dtype()
        return pp.normalize_batch(x, dtype), (y.astype(dtype) if float_targets else y)

    def train_transform(x, y):
        if max_shift or max_scale:
            x = augment(x, backend.rng(), max_shift, max_scale, fill="edge")
        if distortion.active:
            x = distortion(x, backend.rng())
        return eval_transform(x, y)

    return train_transform, eval_transform


__all__ = ["build_model", "ctc_columns", "set_prior_bias", "make_transforms"]
