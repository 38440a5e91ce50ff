"""(op, backend) -> implementation: the one place where a faster path is chosen.

The generic ``xp`` code in ``xpnet.ops`` is the reference.  An op that has
other implementations is declared with ``@dispatch.op("name")`` on its
reference function; a faster implementation registers itself for
(op, backend) with a predicate saying when it applies::

    @dispatch.op("relu_backward")               # in xpnet/ops: the reference
    def relu_backward(dy, y): ...

    dispatch.register("relu_backward", "cupy", "cuda kernel",
                      kernel_relu_backward, applies=kernels.usable)   # in xpnet/cuda

At call time the op looks at its arrays' backend and runs the first
registered implementation whose predicate accepts the arguments, else the
reference.  Chains of layers that a fast path can fuse (``Sequential`` on
NumPy) are dispatched the same way with ``register_chain`` / ``chain_for``.

One switch forces the reference everywhere, for tests and debugging:
``XPNET_REFERENCE=1`` or ``with xpnet.reference_paths():``.  A backward
implementation marked ``follows_cache=True`` still runs when its forward
produced the cache (a cache of another path cannot be read by the reference).
``describe()`` (``xpnet info``) lists what would run.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Callable

from . import backend, config

BACKENDS = ("numpy", "cupy")


@dataclass(frozen=True)
class Implementation:
    """A registered implementation of ``op`` on ``backend`` (``name`` is what ``xpnet info`` shows)."""

    op: str
    backend: str
    name: str
    fn: Callable
    applies: Callable[..., bool]
    follows_cache: bool = False  # a backward chosen by its forward's cache, even under the switch
    available: Callable[[], str | None] = lambda: None  # None, or why it can never run here


_references: dict[str, Callable] = {}
_implementations: dict[tuple[str, str], list[Implementation]] = {}
_chains: dict[str, list[Implementation]] = {}
_chains_off = False


def _backend_of(a) -> str:
    return "cupy" if backend.is_cupy_array(a) else "numpy"


def op(name: str, array_arg: Callable | None = None):
    """Declare ``name`` with the decorated function as its reference.

    ``array_arg(*args, **kwargs)`` picks the argument whose backend decides
    (default: the first positional argument).
    """

    def decorate(reference):
        _references[name] = reference
        pick = array_arg or (lambda *args, **kwargs: args[0] if args else None)

        @functools.wraps(reference)
        def dispatched(*args, **kwargs):
            impls = _implementations.get((name, _backend_of(pick(*args, **kwargs))))
            if impls:
                forced = config.reference_forced()
                for impl in impls:
                    if (not forced or impl.follows_cache) and impl.applies(*args, **kwargs):
                        return impl.fn(*args, **kwargs)
            return reference(*args, **kwargs)

        dispatched.reference = reference
        dispatched.op_name = name
        return dispatched

    return decorate


def register(op_name: str, backend_name: str, name: str, fn: Callable, applies: Callable[..., bool],
             follows_cache: bool = False, available: Callable[[], str | None] | None = None) -> Implementation:
    """Register ``fn`` for (``op_name``, ``backend_name``), tried before the reference when ``applies``.

    Registering the same ``name`` again replaces it (modules may be reloaded).
    """
    if backend_name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend_name!r}")
    impl = Implementation(op_name, backend_name, name, fn, applies, follows_cache,
                          available or (lambda: None))
    impls = [i for i in _implementations.get((op_name, backend_name), []) if i.name != name]
    _implementations[(op_name, backend_name)] = impls + [impl]
    return impl


def unregister(impl: Implementation) -> None:
    """Remove a registered implementation (see ``xpnet.cuda.ops.registered``)."""
    key = (impl.op, impl.backend)
    _implementations[key] = [i for i in _implementations.get(key, []) if i is not impl]


def prefer(impl: Implementation) -> None:
    """Try ``impl`` before the other implementations of its op and backend."""
    key = (impl.op, impl.backend)
    _implementations[key] = [impl] + [i for i in _implementations.get(key, []) if i is not impl]


def register_chain(backend_name: str, name: str, factory: Callable, applies: Callable[..., bool],
                   available: Callable[[], str | None] | None = None) -> Implementation:
    """Register an executor for whole layer chains: ``factory(model)`` when ``applies(model, x)``."""
    impl = Implementation("Sequential", backend_name, name, factory, applies, False, available or (lambda: None))
    _chains[backend_name] = [i for i in _chains.get(backend_name, []) if i.name != name] + [impl]
    return impl


def chain_for(model, x) -> Implementation | None:
    """The chain executor that would run ``model`` on batch ``x``, or None for layer by layer."""
    if _chains_off or config.reference_forced():
        return None
    for impl in _chains.get(_backend_of(x), []):
        if impl.applies(model, x):
            return impl
    return None


def implementations(op_name: str, backend_name: str) -> list[Implementation]:
    """The registered implementations of an op on a backend, in the order they are tried."""
    return list(_implementations.get((op_name, backend_name), []))


def ops() -> list[str]:
    """Every op declared with ``@dispatch.op``."""
    return sorted(_references)


@contextlib.contextmanager
def reference_paths(enabled: bool = True):
    """``with xpnet.reference_paths():`` -- the reference ops and layer-by-layer models for a block."""
    previous = config.force_reference(enabled)
    try:
        yield
    finally:
        config.force_reference(previous)


@contextlib.contextmanager
def layer_by_layer():
    """``with dispatch.layer_by_layer():`` -- models run layer by layer (no chain executor) while each
    op still dispatches: to test or measure an op implementation inside whole models."""
    global _chains_off
    previous, _chains_off = _chains_off, True
    try:
        yield
    finally:
        _chains_off = previous


def describe() -> list[str]:
    """Lines saying which implementation each op and layer chain would use, per backend."""
    forced = config.reference_forced()
    lines = []
    if forced:
        lines.append("reference paths forced (XPNET_REFERENCE or xpnet.reference_paths): "
                     "every op runs its xpnet.ops code")
    rows = [(name, b, _implementations.get((name, b), [])) for name in ops() for b in BACKENDS]
    rows += [("Sequential (fusable chains)", b, _chains.get(b, [])) for b in BACKENDS]
    width = max(len(r[0]) for r in rows)
    for name, b, impls in rows:
        choices = []
        for impl in impls:
            why_not = impl.available()
            if why_not:
                choices.append(f"{impl.name} [not here: {why_not}]")
            elif forced and not impl.follows_cache:
                choices.append(f"{impl.name} [off: reference forced]")
            else:
                choices.append(f"{impl.name} (when it applies)")
        fallback = "layer by layer" if name.startswith("Sequential") else "reference"
        lines.append(f"{name.ljust(width)}  {b:5}  {', then '.join(choices + [fallback])}")
    return lines
