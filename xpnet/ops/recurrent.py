"""A gated recurrent unit (GRU, Cho et al. 2014) over a whole sequence, one direction.

Shapes: x (N, T, F); wx (F, 3H), wh (H, 3H), bx (3H,), bh (3H,) -> y (N, T, H).
The gate blocks of the 3H columns are in the order (r, z, n), as in PyTorch and cuDNN;
the reset gate acts after the hidden product ("linear before reset", as in cuDNN and
ONNX's ``linear_before_reset=1``), so each step needs one (N, H) @ (H, 3H) product::

    gx = x_t @ wx + bx ;  gh = h_{t-1} @ wh + bh          (split into r, z, n blocks)
    r = sigmoid(gx_r + gh_r) ;  z = sigmoid(gx_z + gh_z)
    n = tanh(gx_n + r * gh_n)
    h_t = (1 - z) * n + z * h_{t-1}                        (h before the first step: 0)

``reverse=True`` runs from t = T - 1 down to 0 (the backward half of a bidirectional
layer); y[:, t] is still the state after reading x[:, t].

The input projections of all steps are one (N*T, F) @ (F, 3H) product; the loop over T
does one hidden product and element-wise work on whole-batch (N, .) slices, writing into
preallocated arrays.  Backward collects the per-step gate gradients and finishes with
one product each for dx, dwx and dwh.  Both are declared with ``xpnet.dispatch`` so that a
faster implementation can register for a backend (a backward that reads its own forward's
cache registers with ``follows_cache=True``); this code stays the reference.
"""

from __future__ import annotations

from .. import dispatch
from ..backend import check_same_backend, get_array_module
from ..errors import ShapeError


def _sigmoid_(a, xp):
    """In place: sigmoid(a) = 0.5 * tanh(a / 2) + 0.5 (no overflow, keeps the dtype)."""
    a *= 0.5
    xp.tanh(a, out=a)
    a *= 0.5
    a += 0.5


def check_gru_args(x, wx, wh, bx, bh):
    """Refuse arguments the GRU cannot take, one sentence each."""
    if getattr(x, "ndim", None) != 3:
        raise ShapeError(f"gru needs x of shape (N, T, F), got shape {getattr(x, 'shape', None)}.")
    if getattr(wh, "ndim", None) != 2 or wh.shape[1] != 3 * wh.shape[0]:
        raise ShapeError(f"gru needs wh of shape (H, 3H), got shape {getattr(wh, 'shape', None)}.")
    h = wh.shape[0]
    if getattr(wx, "ndim", None) != 2 or wx.shape != (x.shape[2], 3 * h):
        raise ShapeError(f"gru input has {x.shape[2]} features, so wx must have shape {(x.shape[2], 3 * h)}, "
                         f"got {getattr(wx, 'shape', None)}.")
    for name, b in (("bx", bx), ("bh", bh)):
        if getattr(b, "shape", None) != (3 * h,):
            raise ShapeError(f"gru needs {name} of shape ({3 * h},), got {getattr(b, 'shape', None)}.")
    for name, a in (("wx", wx), ("wh", wh), ("bx", bx), ("bh", bh)):
        if a.dtype != x.dtype:
            raise ShapeError(f"gru input is {x.dtype} but {name} is {a.dtype}: cast one of them "
                             "(xpnet never upcasts silently).")
        check_same_backend(x, a, f"gru ({name})")
    if x.dtype.kind != "f":
        raise ShapeError(f"gru needs floating-point inputs, got {x.dtype}.")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ShapeError(f"gru needs at least one sample and one time step, got x of shape {x.shape}.")


@dispatch.op("gru_forward")
def gru_forward(x, wx, wh, bx, bh, reverse: bool = False):
    """Returns (y (N, T, H), cache).  y is a view of the cache's state array: do not modify it."""
    check_gru_args(x, wx, wh, bx, bh)
    xp = get_array_module(x)
    n, t_len, f = x.shape
    h = wh.shape[0]
    x2 = x.reshape(n * t_len, f)  # a copy only when x is not contiguous
    gates = (x2 @ wx).reshape(n, t_len, 3 * h)  # gx for every step; becomes (r, z, n) in place
    gates += bx
    hn_all = xp.empty((n, t_len, h), dtype=x.dtype)  # gh_n, needed by backward
    # states[:, s] for s in 0..T: the state entering / leaving each step, zeros at the start
    states = xp.empty((n, t_len + 1, h), dtype=x.dtype)
    gh = xp.empty((n, 3 * h), dtype=x.dtype)
    tmp = xp.empty((n, h), dtype=x.dtype)
    steps = range(t_len - 1, -1, -1) if reverse else range(t_len)
    first = t_len if reverse else 0
    states[:, first] = 0
    for t in steps:
        prev, out = (t + 1, t) if reverse else (t, t + 1)
        hp = states[:, prev]
        xp.matmul(hp, wh, out=gh)
        gh += bh
        g = gates[:, t]
        rz = g[:, :2 * h]
        rz += gh[:, :2 * h]
        _sigmoid_(rz, xp)
        r, z, nn = g[:, :h], g[:, h:2 * h], g[:, 2 * h:]
        hn_all[:, t] = gh[:, 2 * h:]
        xp.multiply(r, gh[:, 2 * h:], out=tmp)
        nn += tmp
        xp.tanh(nn, out=nn)
        hnew = states[:, out]
        xp.subtract(hp, nn, out=hnew)
        hnew *= z
        hnew += nn
    y = states[:, :t_len] if reverse else states[:, 1:]
    return y, (x2, x.shape, wx, wh, gates, hn_all, states, bool(reverse))


@dispatch.op("gru_backward")
def gru_backward(dy, cache, need_dx: bool = True):
    """Gradients (dx (N, T, F) or None, dwx (F, 3H), dwh (H, 3H), dbx (3H,), dbh (3H,)).

    dy (N, T, H): the gradient of the loss with respect to y (any strides).
    """
    x2, x_shape, wx, wh, gates, hn_all, states, reverse = cache
    n, t_len, f = x_shape
    h = wh.shape[0]
    if dy.shape != (n, t_len, h):
        raise ShapeError(f"gru_backward got dy of shape {dy.shape}, expected {(n, t_len, h)}.")
    if dy.dtype != wh.dtype:
        raise ShapeError(f"gru_backward got a {dy.dtype} dy for {wh.dtype} weights: cast it.")
    xp = get_array_module(dy)
    dt = wh.dtype
    dgx = xp.empty((n, t_len, 3 * h), dtype=dt)  # gradients of the gate pre-activations, x side
    dgh = xp.empty((n, t_len, 3 * h), dtype=dt)  # and hidden side (they differ in the n block)
    dh = xp.zeros((n, h), dtype=dt)  # gradient reaching the state from later steps
    a = xp.empty((n, h), dtype=dt)
    b = xp.empty((n, h), dtype=dt)
    steps = range(t_len) if reverse else range(t_len - 1, -1, -1)
    wh_t = wh.T
    for t in steps:
        prev = t + 1 if reverse else t
        hp = states[:, prev]
        g = gates[:, t]
        r, z, nn = g[:, :h], g[:, h:2 * h], g[:, 2 * h:]
        dh += dy[:, t]
        dx_t, dh_t = dgx[:, t], dgh[:, t]
        dr, dz, dn = dx_t[:, :h], dx_t[:, h:2 * h], dx_t[:, 2 * h:]
        # dn_pre = dh * (1 - z) * (1 - n^2)
        xp.multiply(nn, nn, out=a)
        xp.subtract(1, a, out=a)
        xp.subtract(1, z, out=b)
        b *= dh
        xp.multiply(a, b, out=dn)
        # dz_pre = dh * (h_prev - n) * z * (1 - z)
        xp.subtract(hp, nn, out=a)
        a *= dh
        xp.subtract(1, z, out=b)
        b *= z
        xp.multiply(a, b, out=dz)
        # d gh_n = dn_pre * r ;  dr_pre = dn_pre * gh_n * r * (1 - r)
        xp.multiply(dn, r, out=dh_t[:, 2 * h:])
        xp.multiply(dn, hn_all[:, t], out=a)
        xp.subtract(1, r, out=b)
        b *= r
        xp.multiply(a, b, out=dr)
        dh_t[:, :2 * h] = dx_t[:, :2 * h]
        # the state's gradient for the step before: dh * z + dgh @ wh.T
        dh *= z
        dh += dh_t @ wh_t
    dgx2 = dgx.reshape(n * t_len, 3 * h)
    dgh2 = dgh.reshape(n * t_len, 3 * h)
    prev_states = states[:, 1:] if reverse else states[:, :t_len]
    dwx = x2.T @ dgx2
    dwh = prev_states.reshape(n * t_len, h).T @ dgh2
    dbx = dgx2.sum(axis=0)
    dbh = dgh2.sum(axis=0)
    dx = (dgx2 @ wx.T).reshape(n, t_len, f) if need_dx else None
    return dx, dwx, dwh, dbx, dbh
