"""The fused NumPy path: conv blocks over cache-sized chunks, run batch-parallel on the CPU's cores.

* ``executor``       -- ``FusedExecutor``: plans a ``Sequential`` into stages and runs them per shard;
* ``sliced_update``  -- the optimizer update in slices on the same threads;
* ``conv_block``     -- conv [BatchNorm] [ReLU] [non-overlapping max pool] as one stage;
* ``conv_plan``      -- a conv block's per-shard buffers and prebuilt views;
* ``stages``         -- the other stages (dense, ReLU, flatten, dropout, BatchNorm, pool);
* ``sequence_stages``-- the stages of CRNN readers (Columns, GRU, TimeDense);
* ``grouped_im2col`` -- conv-block geometry: pool-grouped im2col rows, kernel taps, phase planes;
* ``workspace``      -- reusable, cache-line aligned buffers;
* ``process_shards`` -- shards 1..T-1 in worker processes (``shard_worker``), the default;
* ``threads``        -- the shard thread pool (``XPNET_SHARDS=threads``) and
                        BLAS thread control.

Importing this package registers its implementations with ``xpnet.dispatch``;
``xpnet.ops`` (and ``nn.optim.apply_updates``) is its reference and imports
nothing from here.
"""

from . import executor, sliced_update  # noqa: F401  (registration)
