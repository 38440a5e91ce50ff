"""The fused path of ``Sequential`` on NumPy: a plan of fused stages run batch-parallel.

Registered with ``xpnet.dispatch`` as the chain executor for NumPy batches of
models made only of the built-in layers listed below.  ``FusedExecutor(model)`` turns the
layer list into stages:

* ``ConvBlock`` -- a ``Conv2D`` with what directly follows it among
  [``BatchNorm``] [``ReLU``] [``MaxPool2D`` with stride == size, no padding],
  computed channel-last (N, H, W, C) over small batch chunks so the im2col
  matrix and the conv output stay in cache: one strided im2col copy, one matrix
  product whose rows are grouped by pool window (``grouped_im2col``), pooling
  as element-wise maxima of contiguous blocks, bias and ReLU after the pool
  (max commutes with a per-channel shift and with ReLU), the input gradient one
  kernel tap at a time.  With BatchNorm the whole-batch statistics are
  all-reduced between shards before the normalisation.
* one stage per remaining layer (Dense, ReLU, Flatten, Dropout, BatchNorm,
  MaxPool2D of any kind), each on the same per-shard contract;
* for sequence models (CRNN readers: conv blocks -> ``Columns`` -> ``GRU`` ->
  ``TimeDense``) one stage per sequence layer (``sequence_stages``), on the
  layers' own ops; 3-D sequences (N, T, F) travel in the "flat" layout.

Planned layer types (``PLANNED_TYPES``): Conv2D, MaxPool2D, Dense, ReLU, Flatten,
Dropout, BatchNorm, Columns, GRU, TimeDense.

The batch is split into T contiguous shards (``xpnet.set_num_threads``), each
run with single-threaded BLAS: shard 0 in the calling thread, the others in
worker processes that hold a replica of the model (``process_shards``; no
interpreter lock shared between shards) or, with ``XPNET_SHARDS=threads``, on
threads of this process (``threads``).  Both give the same bits.  Per-shard partial
gradients are added in shard order and BatchNorm statistics are all-reduced in
shard order, so a run is reproducible for a given T.  Dropout masks are drawn
for the whole batch before the split, from the same generator and in the same
order as the plain path, so a seed gives the same masks on both paths.

Only exact instances of the built-in layer classes are planned; a model with
any other layer runs on the plain path.  Conv blocks keep their buffers and
prebuilt views per shard and batch size, reused from step to step.
"""

from __future__ import annotations

import numpy

from .. import config, dispatch
from .conv_block import ConvBlock
from ..errors import ShapeError, UsageError
from ..nn.layers import BatchNorm, Conv2D, Dense, Dropout, Flatten, MaxPool2D, ReLU
from ..nn.recurrent import GRU
from ..nn.sequence import Columns, TimeDense
from . import process_shards
from .threads import can_limit_blas, shard_pool
from .stages import (FLAT, NCHW, BatchNormStage, DenseStage, DropoutStage, FlattenStage, PoolStage, ReLUStage,
                     Shard, Stage, Step, convert)
from .sequence_stages import ColumnsStage, GRUStage, TimeDenseStage

PLANNED_TYPES = (Conv2D, MaxPool2D, Dense, ReLU, Flatten, Dropout, BatchNorm, Columns, GRU, TimeDense)

# No shard gets fewer images than this (threads cost more than they give below it).
MIN_SHARD = 4

# Elements per NumPy ufunc buffer inside the shards (NumPy's default: 8192).  With
# the default, an element-wise op on a strided view whose contiguous runs are
# shorter than the buffer (a kernel tap's (rows, C) slab added into dx) is copied
# through buffers to make longer inner loops, several times slower than using the
# runs in place, which a smaller buffer does (measured in benchmarks/NOTES.md).
# Only the iteration chunking changes, never the arithmetic of element-wise ops.
UFUNC_BUFSIZE = 1024


# --------------------------------------------------------------------------- planning
def plan_stages(layers, winograd: bool = True) -> list[Stage]:
    """Group a layer list into stages (the list must hold only PLANNED_TYPES, built).

    ``winograd``: whether conv blocks may convolve by Winograd where it applies.
    """
    stages: list[Stage] = []
    i = 0
    while i < len(layers):
        layer = layers[i]
        idx = len(stages)
        if type(layer) is Conv2D:
            j = i + 1
            bn = relu = pool = None
            if j < len(layers) and type(layers[j]) is BatchNorm:
                bn, j = layers[j], j + 1
            if j < len(layers) and type(layers[j]) is ReLU:
                relu, j = layers[j], j + 1
            if j < len(layers) and type(layers[j]) is MaxPool2D and ConvBlock.can_group(layer, bn, layers[j]):
                pool, j = layers[j], j + 1
            stages.append(ConvBlock(idx, layer, bn, relu, pool, winograd=winograd))
            i = j
            continue
        cls = {Dense: DenseStage, ReLU: ReLUStage, Flatten: FlattenStage, Dropout: DropoutStage,
               BatchNorm: BatchNormStage, MaxPool2D: PoolStage, Columns: ColumnsStage, GRU: GRUStage,
               TimeDense: TimeDenseStage}[type(layer)]
        stages.append(cls(idx, [layer]))
        i += 1
    return stages


def plannable(model) -> bool:
    return all(type(l) in PLANNED_TYPES for l in model.layers)


def applies(model, x) -> bool:
    """The dispatch predicate: a NumPy batch and a model of built-in layers only."""
    return isinstance(x, numpy.ndarray) and plannable(model)


def _plan_key(model):
    return (tuple(id(l) for l in model.layers), numpy.dtype(model.dtype).str)


class FusedExecutor:
    """Runs a built ``Sequential`` through fused stages as T shards (worker processes or threads).

    The interface ``Sequential`` uses: ``matches(model)``, ``forward(x, train)``,
    ``has_pending``, ``backward(dout)``, ``invalidate()``.
    """

    def __init__(self, model, winograd: bool | None = None):
        self.model = model
        self.key = _plan_key(model)
        # Fixed when built (default ``ConvBlock.USE_WINOGRAD``); a shard worker's replica is built
        # with the main executor's choice, so every shard computes the same way.
        self.winograd = ConvBlock.USE_WINOGRAD if winograd is None else bool(winograd)
        self.stages = plan_stages(model.layers, self.winograd)
        for s in self.stages:
            s.dtype = model.dtype
        self.shards: list[Shard] = []
        self.pending: Step | None = None

    def matches(self, model) -> bool:
        """True while ``model`` has the layers and dtype this plan was made for."""
        return model is self.model and self.key == _plan_key(model)

    @property
    def has_pending(self) -> bool:
        """A training forward ran and its backward has not (backward must come here)."""
        return self.pending is not None

    def threads_for(self, n: int) -> int:
        if not can_limit_blas():
            return 1
        return max(1, min(config.get_num_threads(), n // MIN_SHARD))

    def _shard(self, k: int) -> Shard:
        while len(self.shards) <= k:
            self.shards.append(Shard(len(self.shards)))
        return self.shards[k]

    def forward(self, x, train: bool):
        n = x.shape[0]
        t = self.threads_for(n)
        self.pending = None
        out = numpy.empty((n,) + tuple(self.model.output_shape), dtype=x.dtype)
        workers = process_shards.group_for(self, t)
        if workers is not None:
            try:
                step = workers.forward(self, x, out, train, t)
            except process_shards.NoSharedMemory as exc:
                process_shards.give_up(f"have no room for their shared memory ({exc})")
                workers = None
        if workers is None:
            step = self.new_step(x, train, t, shard_pool().reducer(t))
            self._run(lambda k: self.forward_shard(k, step, x, out), t)
        if train:
            self.pending = step
        return out

    def new_step(self, x, train: bool, t: int, reducer, data=None) -> Step:
        """The step's shared state: stages prepared, and the layout each stage gets its input in.

        ``data``: step data made elsewhere (a worker process gets the main process's dropout masks).
        """
        step = Step(train, x.shape[0], t, reducer)
        step.data.update(data or {})
        for s in self.stages:
            s.prepare(step)
        # The layout each stage gets its input in: the one it accepts, converting
        # between NCHW and NHWC (a free view) when it does not take the current one.
        layouts, src_layouts = [], []
        layout = NCHW if x.ndim == 4 else FLAT
        for s in self.stages:
            src_layouts.append(layout)
            if layout not in s.accepts:
                layout = next(a for a in s.accepts if a != FLAT)
            layouts.append(layout)
            layout = s.out_layout(layout)
        step.layouts, step.src_layouts, step.out_layout = layouts, src_layouts, layout
        return step

    def forward_shard(self, k: int, step: Step, x, out):
        """Shard k's forward: rows bounds[k] of the batch x, written into the same rows of out."""
        sh = self._shard(k)
        sh.cache.clear()
        sh.grads.clear()
        a, e = step.bounds[k]
        h = x[a:e]
        for s, src, dst in zip(self.stages, step.src_layouts, step.layouts):
            h = s.forward(convert(h, src, dst), sh, step)
        out[a:e] = convert(h, step.out_layout, NCHW)

    def backward(self, dout):
        step = self.pending
        if step is None:
            raise UsageError("Model backward called without a forward(train=True) before it.")
        self.pending = None
        if tuple(dout.shape) != (step.n,) + tuple(self.model.output_shape):
            raise ShapeError(f"backward got d(logits) of shape {tuple(dout.shape)}, expected "
                             f"{(step.n,) + tuple(self.model.output_shape)}.")
        need = [s.layers[0].needs_input_grad for s in self.stages]
        want_dx = self.model.compute_input_grad
        dx_full = numpy.empty((step.n,) + tuple(self.model.input_shape), dtype=dout.dtype) if want_dx else None
        keys = self.param_keys()
        if isinstance(step.reducer, process_shards.MainReducer):
            step.reducer.group.backward(self, step, dout, dx_full, need, keys)
        else:
            def run_shard(k):
                sh = self.backward_shard(k, step, dout, dx_full, need)
                if step.t > 1:
                    for key, g in sh.grads.items():
                        if not g.flags.c_contiguous:  # slices of it are summed in place
                            sh.grads[key] = numpy.ascontiguousarray(g)
                    step.reducer.wait()  # every shard's partial gradients are ready
                    self._add_partial_gradients(k, step.t, keys)

            self._run(run_shard, step.t)
        for layer, name in keys:
            layer.grads[name] = self.shards[0].grads[(layer, name)]  # now the whole-batch sum
        for sh in self.shards[:step.t]:
            sh.grads.clear()
        return dx_full

    def param_keys(self) -> list:
        """(layer, parameter name) of every parameter, in layer order: the order partial gradients are summed in."""
        return [(layer, name) for layer in self.model.layers for name in layer.params]

    def backward_shard(self, k: int, step: Step, dout, dx_full, need) -> Shard:
        """Shard k's backward through every stage; its partial gradients are left in the shard's grads."""
        sh = self._shard(k)
        a, e = step.bounds[k]
        d = convert(dout[a:e], NCHW, step.out_layout)
        for i in range(len(self.stages) - 1, -1, -1):
            d = self.stages[i].backward(d, sh, step, need[i])
            if d is None:
                break
            d = convert(d, step.layouts[i], step.src_layouts[i])
        if dx_full is not None:
            dx_full[a:e] = convert(d, step.src_layouts[0], NCHW)
        return sh

    def _add_partial_gradients(self, k, t, keys):
        """Add slice k of every shard's partial gradient into shard 0's, in shard order.

        All shards at once instead of after the run; (p0 + p1) + p2 ... as before, so
        the same bits for a given T.  Shard 0's partials are fresh arrays of the step
        (never a reused buffer), so they can hold the total.
        """
        for key in keys:
            parts = [sh.grads[key] for sh in self.shards[:t] if key in sh.grads]
            if len(parts) < 2:
                continue  # e.g. BatchNorm's gamma/beta: all-reduced already, on shard 0 only
            total = parts[0].reshape(-1)
            lo, hi = k * total.size // t, (k + 1) * total.size // t
            for part in parts[1:]:
                numpy.add(total[lo:hi], part.reshape(-1)[lo:hi], out=total[lo:hi])

    def _run(self, fn, t):
        # One BLAS thread per shard, also when there is a single shard (a small
        # batch): waking BLAS helper threads for tiny products costs more than it
        # gives, and on a busy machine it can wait a whole scheduler slice.
        return shard_pool().run(fn, t, blas=1, bufsize=UFUNC_BUFSIZE)

    def invalidate(self):
        self.pending = None


dispatch.register_chain("numpy", "fused CPU executor (batch shards in worker processes or threads)", FusedExecutor,
                        applies)
