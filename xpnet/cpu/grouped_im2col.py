"""Conv-block geometry of the fused path: which input values each row of a channel-last
(N, H, W, C) im2col reads, as strided views.

Notation as in ``xpnet.ops.im2col``, plus, for a convolution whose output goes
straight into a non-overlapping max pool (stride == window, no padding):

    PKH, PKW  pool window            QH = OH // PKH, QW = OW // PKW  pooled grid
    K = PKH*PKW  positions per pool window

**Pool-grouped rows.**  ``grouped_window_view`` orders the im2col rows of each
image as (PKH, PKW, QH, QW): the K positions of every pool window then lie in K
contiguous blocks of QH*QW rows, so the matrix product writes the conv output
(rows, F) directly as K blocks of the pooled map (QH, QW, F) and max pooling
becomes K-1 element-wise maxima of contiguous arrays (``grouped_blocks``).
Rows that the pool never reads (the last row/column of an odd-sized map) are
not computed at all.  Without a pool (PKH = PKW = 1) the order is the plain
(OH, OW) one and the product's output is the NHWC map itself.

**Plain rows.**  With ``plain=True`` the same rows come in the ordinary
(QH, PKH, QW, PKW) = (OH, OW) order (cropped to the pooled area).  Then a
kernel tap's rows reach one contiguous run of OW*C values per output row, so
col2im's additions (``tap_views``) move long runs; the backward pass uses this order.

**Phase planes** (``phase_planes_view``): the input rearranged so that a
K-major im2col (KH*KW*C, rows), used for few input channels, is copied in long runs.

im2col is one copy from a view, col2im KH*KW slice additions: no Python loop
over the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..backend import get_array_module
from ..ops.im2col import output_hw, pair


@dataclass(frozen=True)
class ConvGeometry:
    """Per-sample shapes of one convolution (optionally feeding a grouped pool).

    Derived sizes (hp, wp, oh, ow, qh, qw, k, rows, kdim) are computed once:
    they are read in every chunk of every step.
    """

    c: int
    h: int
    w: int
    f: int
    kh: int
    kw: int
    sh: int
    sw: int
    ph: int
    pw: int
    pkh: int = 1
    pkw: int = 1

    def __post_init__(self):
        oh, ow = output_hw(self.h, self.w, (self.kh, self.kw), (self.sh, self.sw), (self.ph, self.pw))
        qh, qw = oh // self.pkh, ow // self.pkw
        derived = {
            "hp": self.h + 2 * self.ph, "wp": self.w + 2 * self.pw, "oh": oh, "ow": ow, "qh": qh, "qw": qw,
            "k": self.pkh * self.pkw,                            # positions per pool window (1: no pool)
            "rows": self.pkh * self.pkw * qh * qw,               # im2col rows per image
            "kdim": self.kh * self.kw * self.c,                  # im2col columns
        }
        for name, value in derived.items():
            object.__setattr__(self, name, value)

    @classmethod
    def make(cls, input_shape, w_shape, stride, pad, pool=(1, 1)) -> "ConvGeometry":
        c, h, w = input_shape
        f, _, kh, kw = w_shape
        (sh, sw), (ph, pw), (pkh, pkw) = pair(stride, "stride"), pair(pad, "padding"), pair(pool, "pool")
        return cls(c, h, w, f, kh, kw, sh, sw, ph, pw, pkh, pkw)


def _grouped_strides(x, g: ConvGeometry):
    """Strides of x (N, Hp, Wp, C) for the axes (N, PKH, PKW, QH, QW) of the output grid."""
    s_n, s_h, s_w, _ = x.strides
    return (s_n, g.sh * s_h, g.sw * s_w, g.pkh * g.sh * s_h, g.pkw * g.sw * s_w)


_PLAIN = (0, 3, 1, 4, 2)  # (N, PKH, PKW, QH, QW) -> (N, QH, PKH, QW, PKW): row-major output pixels


def grouped_window_view(xpad, g: ConvGeometry, plain: bool = False):
    """View (N, PKH, PKW, QH, QW, KH, KW, C) of the windows of a padded (N, Hp, Wp, C) array.

    ``plain``: the grid axes in output order instead, (N, QH, PKH, QW, PKW, ...).
    ``xpad`` may be any strided view (an NCHW buffer seen as NHWC, say).
    """
    xp = get_array_module(xpad)
    n = xpad.shape[0]
    s_n, s_h, s_w, s_c = xpad.strides
    view = xp.lib.stride_tricks.as_strided(
        xpad,
        shape=(n, g.pkh, g.pkw, g.qh, g.qw, g.kh, g.kw, g.c),
        strides=_grouped_strides(xpad, g) + (s_h, s_w, s_c),
    )
    return view.transpose(_PLAIN + (5, 6, 7)) if plain else view


def tap_views(dxpad, g: ConvGeometry):
    """Writable views of dxpad (N, Hp, Wp, C), one per kernel tap, each shaped like that tap's plain rows
    (N, OH', OW', C), cropped to the pooled area.

    Within one tap distinct rows reach distinct pixels, so adding a tap's
    (rows, C) slab into its view is an ordinary element-wise addition.  Basic
    slices: NumPy then sees at once that the in-place addition cannot overlap
    itself (on an ``as_strided`` view it runs an overlap solver and copies,
    holding the GIL).
    """
    oh, ow = g.qh * g.pkh, g.qw * g.pkw  # the output pixels that have rows
    return [dxpad[:, i:i + g.sh * (oh - 1) + 1:g.sh, j:j + g.sw * (ow - 1) + 1:g.sw, :]
            for i in range(g.kh) for j in range(g.kw)]


def grouped_blocks(a, g: ConvGeometry, n: int, plain: bool = False):
    """The K pool-position blocks of an (n*rows, F) conv output, each shaped (n, QH, QW, F).

    Grouped rows give contiguous blocks; plain rows give strided views.
    """
    if plain:
        a6 = a.reshape(n, g.qh, g.pkh, g.qw, g.pkw, g.f)
        return [a6[:, :, i, :, j] for i in range(g.pkh) for j in range(g.pkw)]
    a5 = a.reshape(n, g.k, g.qh, g.qw, g.f)
    return [a5[:, k] for k in range(g.k)]


def weight_grad_from_matrix(dwmat, w_shape):
    """A weight gradient from the product's layout: (KH*KW*C, F), rows in im2col column order,
    -> (F, C, KH, KW)."""
    f, c, kh, kw = w_shape
    # Always a copy: for C = KH = KW = 1 the transposed view is already contiguous, and
    # ascontiguousarray would hand out the caller's reused buffer as the gradient.
    return dwmat.reshape(kh, kw, c, f).transpose(3, 2, 0, 1).copy(order="C")


def phase_shape(n: int, g: ConvGeometry):
    """Shape (N, C, U, V, QH, QW) of the phase planes of ``phase_planes_view``."""
    return (n, g.c, g.sh * (g.pkh - 1) + g.kh, g.sw * (g.pkw - 1) + g.kw, g.qh, g.qw)


def phase_planes_view(xpad, g: ConvGeometry):
    """View (N, C, U, V, QH, QW) of a padded (N, Hp, Wp, C) array (any strides): its phase planes.

    Plane (u, v) holds, for every pool window (qi, qj), the input pixel read at
    vertical offset u = sh*a + kh and horizontal offset v = sw*b + kw from the
    window's corner, for pool position (a, b) and kernel tap (kh, kw):
    ``[n, c, u, v, qi, qj] = xpad[n, SH*qi + u, SW*qj + v, c]``, SH = sh*PKH and
    SW = sw*PKW.  Copied once into a C-contiguous buffer, each (tap, channel,
    image, pool position) row of the K-major grouped im2col is one contiguous
    run of QH*QW values (``phase_window_view``) instead of QH strided runs of
    QW: for few input channels (a first conv) the im2col copy is bound by the
    number of its runs.
    """
    xp = get_array_module(xpad)
    s_n, s_h, s_w, s_c = xpad.strides
    return xp.lib.stride_tricks.as_strided(
        xpad, shape=phase_shape(xpad.shape[0], g),
        strides=(s_n, s_c, s_h, s_w, g.sh * g.pkh * s_h, g.sw * g.pkw * s_w))


def phase_window_view(planes, g: ConvGeometry):
    """View (KH, KW, C, N, PKH, PKW, QH, QW) of C-contiguous phase planes (N, C, U, V, QH, QW):
    the K-major grouped im2col (``grouped_window_view`` transposed), read as
    planes[n, c, sh*a + kh, sw*b + kw]."""
    xp = get_array_module(planes)
    s_n, s_c, s_u, s_v, s_i, s_j = planes.strides
    return xp.lib.stride_tricks.as_strided(
        planes, shape=(g.kh, g.kw, g.c, planes.shape[0], g.pkh, g.pkw, g.qh, g.qw),
        strides=(s_u, s_v, s_c, s_n, g.sh * s_u, g.sw * s_v, s_i, s_j))
