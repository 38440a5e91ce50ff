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


def sigmoid_inplace(a, xp):
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
    # The hidden biases of r and z add to the pre-activations like bx (whole sequence at
    # once); bh_n stays with gh_n, which the reset gate scales.
    gates[:, :, :2 * h] += bh[:2 * h]
    bh_n = bh[2 * h:]
    hn_all = xp.empty((n, t_len, h), dtype=x.dtype)  # gh_n = h_{t-1} @ wh_n + bh_n, needed by backward
    # states[:, s] for s in 0..T: the state entering / leaving each step, zeros at the start
    states = xp.empty((n, t_len + 1, h), dtype=x.dtype)
    gh = xp.empty((n, 3 * h), dtype=x.dtype)
    tmp = xp.empty((n, h), dtype=x.dtype)
    steps = range(t_len - 1, -1, -1) if reverse else range(t_len)
    first = t_len if reverse else 0
    states[:, first] = 0
    for t in steps:
        prev, out = (t + 1, t) if reverse else (t, t + 1)
        gru_step(states[:, prev], gates[:, t], wh, bh_n, gh, hn_all[:, t], tmp, states[:, out])
    y = states[:, :t_len] if reverse else states[:, 1:]
    return y, (x2, x.shape, wx, wh, gates, hn_all, states, bool(reverse))


def gru_step(hp, g, wh, bh_n, gh, hn, tmp, hnew):
    """One step of the recurrence, in place, for any leading axes (a batch, or directions x batch).

    hp (.., H) the state before; g (.., 3H) the step's x-side pre-activations (bx and bh_r,
    bh_z added), which become (r, z, n); writes gh = hp @ wh (.., 3H), hn = gh_n + bh_n
    (.., H), the new state into hnew (.., H); tmp (.., H) is scratch.
    """
    xp = get_array_module(hp)
    h = hp.shape[-1]
    xp.matmul(hp, wh, out=gh)
    rz = g[..., :2 * h]
    rz += gh[..., :2 * h]
    sigmoid_inplace(rz, xp)
    r, z, nn = g[..., :h], g[..., h:2 * h], g[..., 2 * h:]
    xp.add(gh[..., 2 * h:], bh_n, out=hn)
    xp.multiply(r, hn, out=tmp)
    nn += tmp
    xp.tanh(nn, out=nn)
    xp.subtract(hp, nn, out=hnew)
    hnew *= z
    hnew += nn


def gate_factors(r, z, nn, hn, prev, c_r, c_z, c_n, a_n=None, scratch=None):
    """The backward's per-step factors (any shape, element-wise; see ``gru_backward``):
    writes c_r = a_n gh_n r (1 - r), c_z = (h_prev - n) z (1 - z), c_n = a_n r into the given
    arrays and returns a_n = (1 - n^2)(1 - z) (into ``a_n`` when given; ``scratch``, of the
    same shape, holds 1 - z when given)."""
    xp = get_array_module(r)
    one_minus_z = xp.subtract(1, z, out=scratch)
    a_n = xp.multiply(nn, nn, out=a_n)
    xp.subtract(1, a_n, out=a_n)
    a_n *= one_minus_z
    xp.subtract(1, r, out=c_r)
    c_r *= r
    c_r *= hn
    c_r *= a_n
    xp.subtract(prev, nn, out=c_z)
    c_z *= z
    c_z *= one_minus_z
    xp.multiply(a_n, r, out=c_n)
    return a_n


@dispatch.op("gru_backward")
def gru_backward(dy, cache, need_dx: bool = True):
    """Gradients (dx (N, T, F) or None, dwx (F, 3H), dwh (H, 3H), dbx (3H,), dbh (3H,)).

    dy (N, T, H): the gradient of the loss with respect to y (any strides).

    With dh the gradient reaching h_t (from y and from the step after), the gate
    pre-activation gradients are dh times per-step factors that depend only on the
    forward values, so they are computed for the whole sequence before the loop::

        dn_pre = dh * (1 - z) * (1 - n^2)             = dh * a_n
        dz_pre = dh * (h_prev - n) * z * (1 - z)      = dh * a_z
        d gh_n = dn_pre * r                           = dh * a_n * r
        dr_pre = dn_pre * gh_n * r * (1 - r)          = dh * a_n * gh_n * r * (1 - r)

    The hidden side's gradient is dgh = (dr_pre, dz_pre, d gh_n) = dh * coef_h (dh
    repeated over the three blocks); the x side's, dgx, is dgh with dn_pre in the n
    block.  The loop over T then only carries dh back: h_{t-1} gets dh * z + dgh @ wh.T.
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
    r, z, nn = gates[:, :, :h], gates[:, :, h:2 * h], gates[:, :, 2 * h:]
    prev_states = states[:, 1:] if reverse else states[:, :t_len]
    # the per-step factors, (N, T, H) each; coef_h holds (a_n gh_n r (1-r), a_z, a_n r) as (N, T, 3, H)
    coef_h = xp.empty((n, t_len, 3, h), dtype=dt)
    a_n = gate_factors(r, z, nn, hn_all, prev_states, coef_h[:, :, 0], coef_h[:, :, 1], coef_h[:, :, 2])
    dgh = xp.empty((n, t_len, 3, h), dtype=dt)  # gradients of the hidden-side pre-activations
    dh_all = xp.empty((n, t_len, h), dtype=dt)  # dh at every step
    carry = xp.zeros((n, h), dtype=dt)  # gradient reaching the state from later steps
    tmp = xp.empty((n, h), dtype=dt)
    steps = range(t_len) if reverse else range(t_len - 1, -1, -1)
    wh_t = wh.T
    for i, t in enumerate(steps):
        dh = dh_all[:, t]
        xp.add(carry, dy[:, t], out=dh)
        dgh_t = dgh[:, t]
        xp.multiply(dh[:, None, :], coef_h[:, t], out=dgh_t)
        if i == t_len - 1:
            break  # the state before the first step is a constant
        # the state's gradient for the step before: dh * z + dgh @ wh.T
        xp.multiply(dh, z[:, t], out=carry)
        xp.matmul(dgh_t.reshape(n, 3 * h), wh_t, out=tmp)
        carry += tmp
    dgh2 = dgh.reshape(n * t_len, 3 * h)
    dgx = xp.empty((n, t_len, 3 * h), dtype=dt)  # the x side: dgh with dn_pre in the n block
    dgx[:, :, :2 * h] = dgh[:, :, :2].reshape(n, t_len, 2 * h)
    xp.multiply(dh_all, a_n, out=dgx[:, :, 2 * h:])
    dgx2 = dgx.reshape(n * t_len, 3 * h)
    dwx = x2.T @ dgx2
    dwh = prev_states.reshape(n * t_len, h).T @ dgh2
    dbx = dgx2.sum(axis=0)
    dbh = dgh2.sum(axis=0)
    dx = (dgx2 @ wx.T).reshape(n, t_len, f) if need_dx else None
    return dx, dwx, dwh, dbx, dbh
