"""Winograd F(2x2, 3x3) convolution for the fused conv blocks (``conv_block``).

A 3x3, stride-1, 'same' convolution (even output size, a pool of 1 or 2 in each
direction after it, ``applies``) is computed tile by tile, each 2x2 output tile
holding whole pool windows (Lavin and Gray, "Fast Algorithms for Convolutional
Neural Networks", 2016): the 2x2 output tile Y of each 4x4 input tile d is

    Y = A^T [ U (.) V ] A,    U = G W G^T (per input and output channel),  V = B^T d B,

where (.) is, for each of the 16 tile positions xi, a matrix product over the
channels: M[xi] = V[xi] (tiles, C) @ U[xi] (C, F).  That is 16 products of
(tiles, C) x (C, F) instead of one (4*tiles, 9C) x (9C, F): 2.25x fewer
multiplications, paid for by the transforms, which are additions of strided
slices (B, A and G hold only 0, +-1 and +-1/2).  The output transform writes
each (pi, pj) position of the output tiles straight into its place in the
pool-grouped row order of ``grouped_im2col`` (pools of 1 or 2 in each direction:
a tile holds whole pool windows).

Backward is the transpose of each linear step, in reverse order:

    dM[xi] = (A dY A^T)[xi],   dU[xi] = V[xi]^T dM[xi],   dV[xi] = dM[xi] U[xi]^T,
    dW = G^T dU G,             dd = B dV B^T, added into the overlapping input tiles.

Shapes: the padded input chunk is (N, 2*TH + 2, 2*TW + 2, C) for TH x TW tiles
an image; V is (4, 4, N, TH, TW, C), M and dM (4, 4, N, TH, TW, F), U and dU
(4, 4, C, F), W (F, C, 3, 3) as the layers store it.
"""

from __future__ import annotations

import numpy

# Rows of B^T, A^T and G for F(2x2, 3x3) (Lavin and Gray, section 4.1).
B_T = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
A_T = ((1, 1, 1, 0), (0, 1, -1, -1))
G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))
# B (the transpose of B^T) and A: the backward's transforms.
B = tuple(zip(*B_T))
A = tuple(zip(*A_T))


# Below this many input channels the im2col product (K = 9C) stays: the 16 products of K = C are
# too thin.  Measured (2 cores, batch 64, three BatchNorm blocks at 32x80, 16x40, 8x20): 16 channels
# ran 6-13% slower by Winograd, 32 channels 18% faster.
MIN_CHANNELS = 32


def applies(geom) -> bool:
    """Whether a conv block's geometry is one this module computes.

    3x3 kernel, stride 1, padding 1 (output size = input size, even in both
    directions: whole 2x2 tiles), and a pool of 1 or 2 in each direction, so that
    every tile holds whole pool windows; at least MIN_CHANNELS input channels.
    """
    return ((geom.kh, geom.kw, geom.sh, geom.sw, geom.ph, geom.pw) == (3, 3, 1, 1, 1, 1)
            and geom.pkh in (1, 2) and geom.pkw in (1, 2) and geom.h % 2 == 0 and geom.w % 2 == 0
            and geom.c >= MIN_CHANNELS)


_KRON_G: dict = {}  # dtype -> kron(G, G)


def _kron_g(dtype):
    """kron(G, G) (16, 9): row 4a + b, column 3k + l holds G[a][k] * G[b][l]."""
    gg = _KRON_G.get(dtype)
    if gg is None:
        g = numpy.asarray(G, dtype=dtype)
        gg = _KRON_G[dtype] = numpy.kron(g, g)
    return gg


def kernel_transform(taps, out=None):
    """U = G W G^T for every kernel: taps (9, ...) (tap 3k + l first) -> (16, ...) (position 4a + b first).

    One product with kron(G, G) (16, 9), in taps' dtype (G's entries are exact in binary).
    Taps laid out (9, C, F) give U as the (16, C, F) stack the forward products read.
    """
    return numpy.matmul(_kron_g(taps.dtype), taps.reshape(9, -1), out=None if out is None else out.reshape(16, -1))


def kernel_transform_transpose(du, out=None):
    """dW = G^T dU G for every kernel: (16, ...) -> (9, ...) (tap 3k + l first)."""
    return numpy.matmul(_kron_g(du.dtype).T, du.reshape(16, -1), out=None if out is None else out.reshape(9, -1))


def combine(coefficients, inputs, outputs):
    """outputs[i] = sum_j coefficients[i][j] * inputs[j] for coefficients in {-1, 0, 1}.

    One NumPy call per term after the first two (add or subtract with out=); a
    lone term is a copy or a negation.  Inputs and outputs may be strided views.
    """
    for row, out in zip(coefficients, outputs):
        terms = [(c, x) for c, x in zip(row, inputs) if c]
        (c0, x0) = terms[0]
        if len(terms) == 1:
            (numpy.copyto if c0 > 0 else _negate)(out, x0)
            continue
        (c1, x1) = terms[1]
        if c0 > 0:
            (numpy.add if c1 > 0 else numpy.subtract)(x0, x1, out=out)
        elif c1 > 0:
            numpy.subtract(x1, x0, out=out)
        else:
            numpy.add(x0, x1, out=out)
            numpy.negative(out, out=out)
        for c, x in terms[2:]:
            (numpy.add if c > 0 else numpy.subtract)(out, x, out=out)


def _negate(out, x):
    numpy.negative(x, out=out)


def split_columns(x, phases):
    """Copy x (N, H, W, C) into the interior of its zero-padded map stored by column parity.

    phases (2, N, H+2, W/2+1, C): phases[p][:, :, j] is padded column 2j + p (padded
    column w holds x's column w - 1), so every column slice the transforms read,
    padded[:, :, k::2], is a contiguous slice of one phase.  The border stays as it is (zero).
    """
    h, w = x.shape[1], x.shape[2]
    numpy.copyto(phases[0][:, 1:h + 1, 1:w // 2 + 1], x[:, :, 1::2])
    numpy.copyto(phases[1][:, 1:h + 1, 0:w // 2], x[:, :, 0::2])


def join_columns(phases, dx):
    """The inverse of ``split_columns`` on the interior: dx (N, H, W, C) from phases (2, N, H+2, W/2+1, C)."""
    h, w = dx.shape[1], dx.shape[2]
    numpy.copyto(dx[:, :, 1::2], phases[0][:, 1:h + 1, 1:w // 2 + 1])
    numpy.copyto(dx[:, :, 0::2], phases[1][:, 1:h + 1, 0:w // 2])


def input_transform(phases, cols, v):
    """V = B^T d B for every 4x4 tile of a padded chunk.

    phases (2, N, 2TH+2, TW+1, C): the padded chunk by column parity (``split_columns``);
    cols (4, N, 2TH+2, TW, C) scratch (the column pass); v (4, 4, N, TH, TW, C) out.
    Tile (i, j) reads padded rows 2i..2i+3 and columns 2j..2j+3.  Column pass first:
    on the phases, every slice is contiguous in (TW, C).
    """
    th, tw = v.shape[3], v.shape[4]
    even, odd = phases[0], phases[1]
    combine(B_T, [even[:, :, 0:tw], odd[:, :, 0:tw], even[:, :, 1:tw + 1], odd[:, :, 1:tw + 1]], cols)
    for b in range(4):
        combine(B_T, [cols[b][:, k:k + 2 * th:2] for k in range(4)], [v[a, b] for a in range(4)])


def output_transform(m, scratch, blocks):
    """Y = A^T M A for every tile.

    m (4, 4, N, TH, TW, F); scratch (2, 4, N, TH, TW, F); blocks[pi][pj] (N, TH, TW, F):
    views (any strides) where output position (2i + pi, 2j + pj) of every tile (i, j) goes.
    """
    for pi in range(2):
        combine([A_T[pi]], list(m), [scratch[pi]])
    for pi in range(2):
        combine(A_T, list(scratch[pi]), blocks[pi])


def output_transform_transpose(blocks, scratch, dm):
    """dM = A dY A^T: the gradient at M from the gradient at the four pool positions.

    blocks[pi][pj] (N, TH, TW, F) views of dY; scratch (4, 2, N, TH, TW, F); dm (4, 4, N, TH, TW, F) out.
    """
    for pj in range(2):
        combine(A, [blocks[0][pj], blocks[1][pj]], [scratch[a][pj] for a in range(4)])
    for a in range(4):
        combine(A, list(scratch[a]), dm[a])


def input_transform_transpose(dv, cols, dphases):
    """dd = B dV B^T, each tile's 4x4 gradient added where the tiles overlap.

    dv (4, 4, N, TH, TW, C); cols (4, N, 2TH+2, TW, C) scratch; dphases
    (2, N, 2TH+2, TW+1, C) out by column parity, overwritten (the border too: the
    padding's gradient).  The transposes of ``input_transform``'s passes, in reverse order.
    """
    th, tw = dv.shape[3], dv.shape[4]
    for b in range(4):
        col = cols[b]
        _overlap_add([dv[a, b] for a in range(4)], col[:, 0::2], col[:, 1::2], th, axis=1)
    _overlap_add(list(cols), dphases[0], dphases[1], tw, axis=2)


def _overlap_add(d, even, odd, q, axis):
    """The transpose of reading slices k = 0..3 of a (2q + 2)-long axis through B^T.

    The forward read, along ``axis``, position 2t + k for tile t: even[t], odd[t],
    even[t + 1], odd[t + 1] (even, odd: the q + 1 even and odd positions).  d[a] is
    the gradient at B^T's row a, so slice k's gradient is sum_a B^T[a][k] d[a] = B[k] . d:
    k = 0: d0, 1: d1 - d2 + d3, 2: -d0 + d1 + d2, 3: -d3.  Tile t's k = 2 and 3 parts meet
    tile t + 1's k = 0 and 1 parts.  even and odd are overwritten.
    """
    def span(a, s):  # a[..., s, ...] on ``axis``
        index = [slice(None)] * a.ndim
        index[axis] = s
        return a[tuple(index)]

    combine([B[0]], d, [span(even, slice(0, q))])
    span(even, slice(q, q + 1)).fill(0)
    combine([B[1]], d, [span(odd, slice(0, q))])
    span(odd, slice(q, q + 1)).fill(0)
    for target, coefficients in ((span(even, slice(1, q + 1)), B[2]), (span(odd, slice(1, q + 1)), B[3])):
        for c, x in zip(coefficients, d):
            if c:
                (numpy.add if c > 0 else numpy.subtract)(target, x, out=target)
