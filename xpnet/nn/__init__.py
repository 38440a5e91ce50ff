"""Layers, ``Sequential``, the model zoo, optimizers and schedules, model files (no pickle).

Layers hold parameters and caches; the math lives in ``xpnet.ops``.
"""
