"""xpnet's CUDA kernels for CuPy, and the tools that check them without a GPU.

* ``kernels``  -- the kernels as array functions (im2col, col2im, max pooling,
  bias/ReLU epilogues, fused loss) and the ``usable()`` guard;
* ``ops``      -- kernel-backed versions of the public ops (``KernelCache``),
  registered with ``xpnet.dispatch`` for CuPy arrays;
* ``source``   -- the CUDA C source, one text for NVRTC, nvcc and g++;
* ``emulate``  -- ``nvcc_check()`` and the g++/ctypes CPU emulation;
* ``driver``   -- the sentence for a CuPy built for a newer CUDA than the driver;
* ``transfer`` -- host -> device copies of training batches on a stream of their own
  (used by ``xpnet.training.prefetch``).

Importable without CuPy: CuPy comes only through ``xpnet.backend``.
Importing this package registers the kernels (they apply to CuPy arrays only).
"""

from . import ops as _ops

_ops.register()
