"""CUDA C source of xpnet's custom kernels, shared by three compilers.

The same text is compiled by CuPy's NVRTC on a GPU (``xpnet.cuda.kernels``),
by ``nvcc -c`` on a CPU machine as a syntax and type check, and by ``g++``
with a few shim macros as a CPU emulation that tests the index arithmetic
against xpnet's NumPy ops (``xpnet.cuda.emulate``).  To keep that possible
the kernels follow three rules:

* plain pointer arguments and flat indices, one output element per loop
  iteration of a grid-stride loop (no shared memory, no ``__syncthreads``,
  no atomics: every output is written by exactly one thread, so results are
  deterministic and threads may run in any order, one after the other too);
* the element type ``T`` and the index type ``I`` come from a prelude
  (``typedef float T; typedef int I;``), one compiled module per pair;
* math goes through the ``xp_*`` overloads defined here, so one body serves
  float and double.

Layouts are those of ``xpnet.ops`` (see ``xpnet.ops.im2col`` for the notation):
x (N, C, H, W) and col (N, OH, OW, C, KH, KW), all C-contiguous.
"""

# Which element types and index types the prelude can name.
ELEMENT_TYPES = {"f": "float", "d": "double"}
INDEX_TYPES = {False: "int", True: "long long"}

# -inf without <math.h>: NVRTC has no host headers, so build it from bits.
CUDA_PRELUDE = {
    "f": "#define XP_NEG_INF (-__int_as_float(0x7f800000))\n",
    "d": "#define XP_NEG_INF (-__longlong_as_double(0x7ff0000000000000LL))\n",
}

KERNEL_NAMES = (
    "xpnet_im2col",
    "xpnet_col2im",
    "xpnet_maxpool_fwd",
    "xpnet_maxpool_bwd",
    "xpnet_nhwc_to_nchw",
    "xpnet_relu_bwd",
    "xpnet_bce_logits",
    "xpnet_im2col_cnhw",
    "xpnet_col2im_cnhw",
    "xpnet_fnp_to_nfp",
)

SOURCE = r"""
// One loop iteration per output element; the loop strides by the whole grid
// so any launch shape covers any size.
#define XP_LOOP(i, total) \
    for (I i = (I)blockIdx.x * (I)blockDim.x + (I)threadIdx.x; i < (total); \
         i += (I)blockDim.x * (I)gridDim.x)

__device__ __forceinline__ float xp_exp(float v) { return expf(v); }
__device__ __forceinline__ double xp_exp(double v) { return exp(v); }
__device__ __forceinline__ float xp_log1p(float v) { return log1pf(v); }
__device__ __forceinline__ double xp_log1p(double v) { return log1p(v); }
__device__ __forceinline__ float xp_abs(float v) { return fabsf(v); }
__device__ __forceinline__ double xp_abs(double v) { return fabs(v); }

// col[n, oh, ow, c, kh, kw] = x[n, c, oh*SH - PH + kh, ow*SW - PW + kw], 0 outside x.
extern "C" __global__ void xpnet_im2col(
    const T* __restrict__ x, T* __restrict__ col, I total,
    I C, I H, I W, I OH, I OW, I KH, I KW, I SH, I SW, I PH, I PW)
{
    XP_LOOP(i, total) {
        I t = i;
        const I kw = t % KW; t /= KW;
        const I kh = t % KH; t /= KH;
        const I c = t % C; t /= C;
        const I ow = t % OW; t /= OW;
        const I oh = t % OH;
        const I n = t / OH;
        const I h = oh * SH - PH + kh;
        const I w = ow * SW - PW + kw;
        T v = (T)0;
        if (h >= 0 && h < H && w >= 0 && w < W) {
            v = x[((n * C + c) * H + h) * W + w];
        }
        col[i] = v;
    }
}

// Adjoint of im2col by gathering: one thread per input pixel adds, in
// kernel-offset order (kh, then kw), every col entry that was copied from it.
// Same order as the reference's slice additions; no atomics.
extern "C" __global__ void xpnet_col2im(
    const T* __restrict__ col, T* __restrict__ dx, I total,
    I C, I H, I W, I OH, I OW, I KH, I KW, I SH, I SW, I PH, I PW)
{
    XP_LOOP(i, total) {
        I t = i;
        const I w = t % W; t /= W;
        const I h = t % H; t /= H;
        const I c = t % C;
        const I n = t / C;
        T acc = (T)0;
        for (I kh = 0; kh < KH; ++kh) {
            const I dh = h + PH - kh;       // = oh * SH for the window that covers h
            if (dh < 0) break;              // grows more negative with kh
            if (dh % SH != 0) continue;
            const I oh = dh / SH;
            if (oh >= OH) continue;
            for (I kw = 0; kw < KW; ++kw) {
                const I dw = w + PW - kw;
                if (dw < 0) break;
                if (dw % SW != 0) continue;
                const I ow = dw / SW;
                if (ow >= OW) continue;
                acc += col[((((n * OH + oh) * OW + ow) * C + c) * KH + kh) * KW + kw];
            }
        }
        dx[i] = acc;
    }
}

// Max pooling: y[n, c, oh, ow] = max of the window, idx = its position in the
// window in row-major order (kh * KW + kw).  Padding counts as -inf; the first
// maximum wins and a NaN wins over numbers, as numpy.argmax does.
extern "C" __global__ void xpnet_maxpool_fwd(
    const T* __restrict__ x, T* __restrict__ y, int* __restrict__ idx, I total,
    I C, I H, I W, I OH, I OW, I KH, I KW, I SH, I SW, I PH, I PW)
{
    XP_LOOP(i, total) {
        I t = i;
        const I ow = t % OW; t /= OW;
        const I oh = t % OH; t /= OH;    // t = n * C + c
        const T* plane = x + t * H * W;
        const I h0 = oh * SH - PH;
        const I w0 = ow * SW - PW;
        T best = XP_NEG_INF;
        int arg = 0;
        for (I kh = 0; kh < KH; ++kh) {
            const I h = h0 + kh;
            for (I kw = 0; kw < KW; ++kw) {
                const I w = w0 + kw;
                const T v = (h >= 0 && h < H && w >= 0 && w < W) ? plane[h * W + w] : XP_NEG_INF;
                const int k = (int)(kh * KW + kw);
                if (k == 0 || v > best || (v != v && best == best)) {
                    best = v;
                    arg = k;
                }
            }
        }
        y[i] = best;
        idx[i] = arg;
    }
}

// Max-pool backward by gathering: one thread per input pixel adds dy of every
// window whose argmax sits on it (kernel-offset order, no atomics).  With
// mask_by_y != 0 it also applies the backward of a ReLU before the pool:
// the routed value is y itself, so dy counts only where y > 0.
extern "C" __global__ void xpnet_maxpool_bwd(
    const T* __restrict__ dy, const int* __restrict__ idx, const T* __restrict__ y,
    T* __restrict__ dx, I total, int mask_by_y,
    I C, I H, I W, I OH, I OW, I KH, I KW, I SH, I SW, I PH, I PW)
{
    XP_LOOP(i, total) {
        I t = i;
        const I w = t % W; t /= W;
        const I h = t % H; t /= H;      // t = n * C + c
        const I base = t * OH * OW;
        T acc = (T)0;
        for (I kh = 0; kh < KH; ++kh) {
            const I dh = h + PH - kh;
            if (dh < 0) break;
            if (dh % SH != 0) continue;
            const I oh = dh / SH;
            if (oh >= OH) continue;
            for (I kw = 0; kw < KW; ++kw) {
                const I dw = w + PW - kw;
                if (dw < 0) break;
                if (dw % SW != 0) continue;
                const I ow = dw / SW;
                if (ow >= OW) continue;
                const I o = base + oh * OW + ow;
                if (idx[o] == (int)(kh * KW + kw) && (!mask_by_y || y[o] > (T)0)) {
                    acc += dy[o];
                }
            }
        }
        dx[i] = acc;
    }
}

// Conv output: y2 (N*P, F) rows of pixels -> out (N, F, P) channels first,
// P = OH*OW, adding the bias and applying ReLU on the way (one pass instead of
// bias add, transpose copy and ReLU).
extern "C" __global__ void xpnet_nhwc_to_nchw(
    const T* __restrict__ y2, const T* __restrict__ b, T* __restrict__ out, I total,
    I F, I P, int has_bias, int relu)
{
    XP_LOOP(i, total) {
        const I p = i % P;
        const I t = i / P;
        const I f = t % F;
        const I n = t / F;
        T v = y2[(n * P + p) * F + f];
        if (has_bias) v += b[f];
        if (relu && v < (T)0) v = (T)0;
        out[i] = v;
    }
}

// ReLU backward: dx = dy where y > 0, else 0.
extern "C" __global__ void xpnet_relu_bwd(
    const T* __restrict__ dy, const T* __restrict__ y, T* __restrict__ dx, I total)
{
    XP_LOOP(i, total) {
        dx[i] = y[i] > (T)0 ? dy[i] : (T)0;
    }
}

// Sigmoid + binary cross-entropy on logits, one pass: per-unit loss terms
// max(x, 0) - x*t + log1p(exp(-|x|)) (summed afterwards) and the gradient
// (sigmoid(x) - t) / n.  exp(-|x|) is in (0, 1]: nothing overflows.
extern "C" __global__ void xpnet_bce_logits(
    const T* __restrict__ x, const T* __restrict__ t, T* __restrict__ dx,
    T* __restrict__ terms, I total, T n)
{
    XP_LOOP(i, total) {
        const T xi = x[i];
        const T ti = t[i];
        const T e = xp_exp(-xp_abs(xi));
        const T relu = xi > (T)0 ? xi : (T)0;
        terms[i] = relu - xi * ti + xp_log1p(e);
        const T s = xi >= (T)0 ? (T)1 / ((T)1 + e) : e / ((T)1 + e);
        dx[i] = (s - ti) / n;
    }
}

// ---- the channels-outermost column layout used by the kernel-backed conv ----
// colT (C, KH, KW, N, OH, OW), i.e. (C*KH*KW, N*OH*OW): consecutive threads
// walk consecutive output pixels, so reading x and writing colT are both
// coalesced (and so are col2im's reads).  One GEMM w (F, CKK) @ colT gives
// (F, N*OH*OW); xpnet_fnp_to_nfp puts the batch axis first.

extern "C" __global__ void xpnet_im2col_cnhw(
    const T* __restrict__ x, T* __restrict__ colT, I total, I N,
    I C, I H, I W, I OH, I OW, I KH, I KW, I SH, I SW, I PH, I PW)
{
    XP_LOOP(i, total) {
        I t = i;
        const I ow = t % OW; t /= OW;
        const I oh = t % OH; t /= OH;
        const I n = t % N; t /= N;
        const I kw = t % KW; t /= KW;
        const I kh = t % KH;
        const I c = t / KH;
        const I h = oh * SH - PH + kh;
        const I w = ow * SW - PW + kw;
        T v = (T)0;
        if (h >= 0 && h < H && w >= 0 && w < W) {
            v = x[((n * C + c) * H + h) * W + w];
        }
        colT[i] = v;
    }
}

// Adjoint of xpnet_im2col_cnhw by gathering, kernel-offset order (kh, then kw).
extern "C" __global__ void xpnet_col2im_cnhw(
    const T* __restrict__ colT, T* __restrict__ dx, I total, I N,
    I C, I H, I W, I OH, I OW, I KH, I KW, I SH, I SW, I PH, I PW)
{
    XP_LOOP(i, total) {
        I t = i;
        const I w = t % W; t /= W;
        const I h = t % H; t /= H;
        const I c = t % C;
        const I n = t / C;
        const I npix = N * OH * OW;
        T acc = (T)0;
        for (I kh = 0; kh < KH; ++kh) {
            const I dh = h + PH - kh;
            if (dh < 0) break;
            if (dh % SH != 0) continue;
            const I oh = dh / SH;
            if (oh >= OH) continue;
            for (I kw = 0; kw < KW; ++kw) {
                const I dw = w + PW - kw;
                if (dw < 0) break;
                if (dw % SW != 0) continue;
                const I ow = dw / SW;
                if (ow >= OW) continue;
                acc += colT[((c * KH + kh) * KW + kw) * npix + (n * OH + oh) * OW + ow];
            }
        }
        dx[i] = acc;
    }
}

// out (N, F, P) = yT (F, N, P) with the first two axes swapped, + bias, ReLU if asked.
extern "C" __global__ void xpnet_fnp_to_nfp(
    const T* __restrict__ yT, const T* __restrict__ b, T* __restrict__ out, I total,
    I N, I F, I P, int has_bias, int relu)
{
    XP_LOOP(i, total) {
        const I p = i % P;
        const I t = i / P;
        const I f = t % F;
        const I n = t / F;
        T v = yT[(f * N + n) * P + p];
        if (has_bias) v += b[f];
        if (relu && v < (T)0) v = (T)0;
        out[i] = v;
    }
}
"""


def prelude(dtype_char: str, wide: bool, target: str = "cuda") -> str:
    """The typedefs (and -inf) that make SOURCE one concrete module.

    dtype_char: "f" (float32) or "d" (float64); wide: 64-bit indices;
    target: "cuda" (NVRTC / nvcc) or "cpu" (the g++ emulation shim defines -inf).
    """
    text = f"typedef {ELEMENT_TYPES[dtype_char]} T;\ntypedef {INDEX_TYPES[bool(wide)]} I;\n"
    if target == "cuda":
        text += CUDA_PRELUDE[dtype_char]
    return text


def module_source(dtype_char: str, wide: bool, target: str = "cuda") -> str:
    return prelude(dtype_char, wide, target) + SOURCE
