"""xpnet's CUDA kernels for CuPy, and the tools that check them without a GPU.

* ``kernels``  -- the kernels as array functions (im2col, col2im, max pooling,
  bias/ReLU epilogues, fused loss), the ``usable()`` guard and the
  ``XPNET_CUDA_KERNELS`` switch;
* ``ops``      -- kernel-backed versions of the public ops (``KernelCache``),
  and ``install()`` to route ``xpnet.ops`` through them;
* ``source``   -- the CUDA C source, one text for NVRTC, nvcc and g++;
* ``emulate``  -- ``nvcc_check()`` and the g++/ctypes CPU emulation.

Importable without CuPy: CuPy comes only through ``xpnet.backend``.
"""
