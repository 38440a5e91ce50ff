"""Both directions of a GRU layer in one loop, time-major: the CPU executor's GRU arithmetic.

The reverse direction of a bidirectional GRU is the forward recurrence run over the
time-reversed sequence.  So the D directions (1 or 2) are stacked on a leading axis,
each reading its own copy of the input in its reading order, and every step does one
batched (D, N, H) @ (D, H, 3H) product and one set of element-wise calls for all
directions -- half the calls of running ``xpnet.ops.recurrent`` once per direction.
Time-major storage (D, T, N, .) makes every step's slice contiguous.

The equations, gate order (r, z, n) and the backward's factorisation are those of
``xpnet.ops.recurrent`` (its docstrings derive them); that module stays the reference,
and the fused-path tests hold this one to it.

Shapes: xs (D, T, N, F); wx (D, F, 3H); wh (D, H, 3H); bx, bh (D, 3H);
states (D, T + 1, N, H) with states[:, 0] = 0 and states[:, t + 1] the state after
reading step t of each direction's sequence.

``buf(name, shape, dtype)`` gives the work arrays (default: fresh ones); the executor
passes its shard's reused buffers (``stages.Shard.buffer``).  The weight gradients are
always fresh arrays.
"""

from __future__ import annotations

import numpy

from ..ops.recurrent import gate_factors, gru_step


def fresh(name, shape, dtype):
    """The default ``buf``: a new array each call."""
    return numpy.empty(shape, dtype)


def time_major(x, directions: int, buf=fresh):
    """(N, T, F) batch-major -> (D, T, N, F): direction 0 reads t = 0..T-1, direction 1 backwards."""
    n, t_len, f = x.shape
    xs = buf("xs", (directions, t_len, n, f), x.dtype)
    seq = x.transpose(1, 0, 2)
    xs[0] = seq
    if directions == 2:
        xs[1] = seq[::-1]
    return xs


def stacked_gru_forward(xs, wx, wh, bx, bh, buf=fresh):
    """Returns (states (D, T + 1, N, H), cache)."""
    d_count, t_len, n, f = xs.shape
    h = wh.shape[1]
    dt = xs.dtype
    # gx for every step of every direction: one batched product
    gates = buf("gates", (d_count, t_len, n, 3 * h), dt)
    numpy.matmul(xs.reshape(d_count, t_len * n, f), wx, out=gates.reshape(d_count, t_len * n, 3 * h))
    gates += bx[:, None, None, :]
    gates[..., :2 * h] += bh[:, None, None, :2 * h]  # bh_r, bh_z add like bx; bh_n stays with gh_n
    bh_n = bh[:, None, 2 * h:]
    hn_all = buf("hn_all", (d_count, t_len, n, h), dt)  # gh_n, which backward needs
    states = buf("states", (d_count, t_len + 1, n, h), dt)
    states[:, 0] = 0
    gh = buf("gh", (d_count, n, 3 * h), dt)
    tmp = buf("tmp", (d_count, n, h), dt)
    for t in range(t_len):
        gru_step(states[:, t], gates[:, t], wh, bh_n, gh, hn_all[:, t], tmp, states[:, t + 1])
    return states, (xs, wx, wh, gates, hn_all, states)


def stacked_gru_backward(dys, cache, need_dx: bool = True, buf=fresh):
    """Gradients (dxs (D, T, N, F) or None, dwx (D, F, 3H), dwh (D, H, 3H), dbx (D, 3H), dbh (D, 3H)).

    dys (D, T, N, H): the loss gradient at states[:, 1:], in each direction's reading order.
    """
    xs, wx, wh, gates, hn_all, states = cache
    d_count, t_len, n, f = xs.shape
    h = wh.shape[1]
    dt = wh.dtype
    r, z, nn = gates[..., :h], gates[..., h:2 * h], gates[..., 2 * h:]
    prev_states = states[:, :t_len]
    # per-step factors (D, T, N, H); coef_h holds (a_n gh_n r (1-r), a_z, a_n r) as (D, T, N, 3, H)
    coef_h = buf("coef_h", (d_count, t_len, n, 3, h), dt)
    dh_all = buf("dh_all", (d_count, t_len, n, h), dt)
    a_n = gate_factors(r, z, nn, hn_all, prev_states, coef_h[..., 0, :], coef_h[..., 1, :], coef_h[..., 2, :],
                       a_n=buf("a_n", (d_count, t_len, n, h), dt), scratch=dh_all)  # dh_all: free until the loop
    dgh = buf("dgh", (d_count, t_len, n, 3, h), dt)  # hidden-side pre-activation gradients
    carry = buf("carry", (d_count, n, h), dt)  # gradient reaching the state from later steps
    carry.fill(0)
    tmp = buf("tmp", (d_count, n, h), dt)
    wh_t = wh.transpose(0, 2, 1)
    for t in range(t_len - 1, -1, -1):
        dh = dh_all[:, t]
        numpy.add(carry, dys[:, t], out=dh)
        dgh_t = dgh[:, t]
        numpy.multiply(dh[:, :, None, :], coef_h[:, t], out=dgh_t)
        if t == 0:
            break  # the state before the first step is a constant
        numpy.multiply(dh, z[:, t], out=carry)
        numpy.matmul(dgh_t.reshape(d_count, n, 3 * h), wh_t, out=tmp)
        carry += tmp
    rows = t_len * n
    dgh2 = dgh.reshape(d_count, rows, 3 * h)
    dgx = buf("dgx", (d_count, t_len, n, 3 * h), dt)  # the x side: dgh with dn_pre in the n block
    dgx[..., :2 * h] = dgh[..., :2, :].reshape(d_count, t_len, n, 2 * h)
    numpy.multiply(dh_all, a_n, out=dgx[..., 2 * h:])
    dgx2 = dgx.reshape(d_count, rows, 3 * h)
    dwx = numpy.matmul(xs.reshape(d_count, rows, f).transpose(0, 2, 1), dgx2)
    dwh = numpy.matmul(prev_states.reshape(d_count, rows, h).transpose(0, 2, 1), dgh2)
    dbx = dgx2.sum(axis=1)
    dbh = dgh2.sum(axis=1)
    dxs = None
    if need_dx:
        dxs = buf("dxs", (d_count, t_len, n, f), dt)
        numpy.matmul(dgx2, wx.transpose(0, 2, 1), out=dxs.reshape(d_count, rows, f))
    return dxs, dwx, dwh, dbx, dbh
