"""Ready-made networks.  Each returns a built ``Sequential`` on the current backend."""

from __future__ import annotations

from ..errors import UsageError
from .layers import BatchNorm, Conv2D, Dense, Dropout, Flatten, MaxPool2D, ReLU
from .recurrent import GRU
from .sequence import Columns, TimeDense
from .sequential import Sequential


def captcha_net(length: int = 4, n_classes: int = 36, input_shape=(3, 32, 80), init="he",
                batchnorm: bool = False) -> Sequential:
    """The seed's CAPTCHA reader, with its missing ReLU restored.

    input (C, H, W) -> [conv 3x3 -> ReLU -> pool 2x2] x 3 (32, 64, 128 channels)
    -> flatten -> dense 512 -> ReLU -> dense length*n_classes (one logit block
    per character).  The flatten size follows from ``input_shape``
    (128*2*8 = 2048 for the seed's 3x32x80).

    ``batchnorm=True`` puts a BatchNorm between each conv (then without bias)
    and its ReLU: about twice the step time on a CPU, but far better on small
    labelled folders (~1,000 images: 0.89 against 0.70 whole-string in
    benchmarks/RECIPE.md), which is why ``--data`` uses it below 5,000 images.
    """
    _check_task(length, n_classes)
    layers = []
    for channels in (32, 64, 128):
        if batchnorm:
            layers += [Conv2D(channels, 3, bias=False, init=init), BatchNorm(), ReLU(), MaxPool2D(2)]
        else:
            layers += [Conv2D(channels, 3, init=init), ReLU(), MaxPool2D(2)]
    layers += [Flatten(), Dense(512, init=init), ReLU(), Dense(length * n_classes, init=init)]
    return Sequential(layers, input_shape=input_shape, name="captcha_net")


def captcha_net_bn(length: int = 4, n_classes: int = 36, input_shape=(3, 32, 80), init="he",
                   width: int = 32, dropout: float = 0.25) -> Sequential:
    """A stronger CAPTCHA reader for accuracy over speed.

    Four blocks of [conv 3x3 'same' -> BatchNorm -> ReLU (x2 in the last three) -> pool 2x2]
    with width, 2x, 4x, 4x channels, then dense 512 -> ReLU -> dropout -> dense.
    """
    _check_task(length, n_classes)
    layers = []
    chans = (width, 2 * width, 4 * width, 4 * width)
    for i, c in enumerate(chans):
        repeats = 1 if i == 0 else 2
        for _ in range(repeats):
            layers += [Conv2D(c, 3, pad="same", bias=False, init=init), BatchNorm(), ReLU()]
        layers.append(MaxPool2D(2))
    layers += [Flatten(), Dense(512, init=init), ReLU()]
    if dropout:
        layers.append(Dropout(dropout))
    layers.append(Dense(length * n_classes, init=init))
    return Sequential(layers, input_shape=input_shape, name="captcha_net_bn")


def simple_convnet(input_shape=(1, 28, 28), n_classes: int = 10, filters: int = 30, kernel_size: int = 5,
                   hidden: int = 100, init="he") -> Sequential:
    """The seed's MNIST network: conv 5x5 30 -> ReLU -> pool 2x2 -> dense 100 -> ReLU -> dense 10."""
    _check_task(1, n_classes)
    layers = [Conv2D(filters, kernel_size, init=init), ReLU(), MaxPool2D(2), Flatten(),
              Dense(hidden, init=init), ReLU(), Dense(n_classes, init=init)]
    return Sequential(layers, input_shape=input_shape, name="simple_convnet")


def captcha_crnn(n_classes: int = 36, input_shape=(1, 32, 80), channels=(32, 64, 96), hidden: int = 96,
                 batchnorm: bool = False, init="he") -> Sequential:
    """A CAPTCHA reader of any length: convolutional features, a bidirectional GRU, a CTC head.

    input (C, H, W) -> [conv 3x3 'same' -> ReLU -> pool] x 3 with ``channels`` and pools
    2x2, 2x2, then 2x1 (height halved, width kept: 32x80 -> 4x20) -> ``Columns`` (one feature
    vector of C*H per column: T = W/4 steps) -> bidirectional ``GRU(hidden)`` -> ``TimeDense``
    to ``n_classes + 1`` scores per step, class 0 being the CTC blank and class i + 1 the
    charset's character i.  Train it with ``xpnet.captcha.heads.CTCLoss``; a reader of it has
    ``"head": "ctc"`` in its metadata (``xpnet.captcha.heads.ctc_metadata``).
    ``batchnorm=True`` puts a BatchNorm between each conv (then without bias) and its ReLU.
    """
    _check_task(1, n_classes)
    if len(channels) != 3 or any(int(c) < 1 for c in channels):
        raise UsageError(f"captcha_crnn needs three positive channel counts, got {channels!r}.")
    layers = []
    for c, pool in zip(channels, ((2, 2), (2, 2), (2, 1))):
        if batchnorm:
            layers += [Conv2D(int(c), 3, pad="same", bias=False, init=init), BatchNorm(), ReLU()]
        else:
            layers += [Conv2D(int(c), 3, pad="same", init=init), ReLU()]
        layers.append(MaxPool2D(pool, stride=pool))
    layers += [Columns(), GRU(hidden), TimeDense(int(n_classes) + 1, init="glorot")]
    return Sequential(layers, input_shape=input_shape, name="captcha_crnn")


captcha_crnn.head = "ctc"  # what its outputs mean: per-column scores for CTC, not per-position blocks


def _check_task(length, n_classes):
    if int(length) < 1 or int(n_classes) < 2:
        raise UsageError(f"a model needs length >= 1 and at least 2 classes, got length {length}, {n_classes} classes.")


MODELS = {"captcha_net": captcha_net, "captcha_net_bn": captcha_net_bn, "simple_convnet": simple_convnet,
          "captcha_crnn": captcha_crnn}


def build(name: str, **kwargs) -> Sequential:
    """Build a model by its registry name (``captcha_net``, ``captcha_net_bn``, ``simple_convnet``,
    ``captcha_crnn``)."""
    if name not in MODELS:
        raise UsageError(f"Unknown model {name!r}: choose one of {', '.join(MODELS)}.")
    return MODELS[name](**kwargs)
