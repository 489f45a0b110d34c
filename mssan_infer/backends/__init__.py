"""Backends behind one contract (:class:`Backend`) and a small registry to pick one by name.

A backend is made by a factory ``factory(bundle, *, device, precision, threads,
**options) -> Backend`` (a subclass of :class:`Backend`, checked when it is made).
Factories are registered by name, either as a callable
or as a ``"module:attribute"`` string imported only when that backend is
asked for, so optional packages (tensorrt, tritonclient) are never imported
by ``import mssan_infer``.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Union

from ..bundle import Bundle
from ..errors import BackendUnavailableError, InputError, MssanError
from .base import Backend, Device, parse_device

__all__ = [
    "Backend", "Device", "parse_device", "BackendFactory", "register_backend", "create_backend", "available_backends",
]

BackendFactory = Callable[..., Backend]

_REGISTRY: dict[str, Union[str, BackendFactory]] = {
    "onnxruntime": "mssan_infer.backends.onnxruntime:OnnxRuntimeBackend.from_bundle",
    "tensorrt": "mssan_infer.backends.tensorrt:TensorRTBackend.from_bundle",
    "triton": "mssan_infer.backends.triton:TritonBackend.from_bundle",
}


def register_backend(name: str, factory: Union[str, BackendFactory], *, replace: bool = False) -> None:
    """Make ``Retriever.load(..., backend=name)`` use ``factory``.

    Args:
        name: backend name (lower case).
        factory: a callable ``(bundle, *, device, precision, threads, **options) -> Backend``
            or a ``"package.module:attr[.attr]"`` string resolved lazily.
        replace: allow replacing an existing registration.

    Raises:
        InputError: ``name`` is already registered and ``replace`` is false.
    """
    if not isinstance(name, str) or not name:
        raise InputError(f"backend name must be a non-empty str, got {name!r}")
    if name in _REGISTRY and not replace:
        raise InputError(f"backend {name!r} is already registered; pass replace=True to override it")
    _REGISTRY[name] = factory


def available_backends() -> list[str]:
    """Registered backend names (registered is not the same as installed)."""
    return sorted(_REGISTRY)


def _resolve(name: str, target: str) -> BackendFactory:
    module_name, _, attr = target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise BackendUnavailableError(
                f"backend {name!r} is not available in this installation ({module_name} not found); "
                f"installed backends are {available_backends()}, use backend='onnxruntime'"
            ) from e
        raise BackendUnavailableError(
            f"backend {name!r} needs the package {e.name!r}, which is not installed; "
            f"install it (e.g. `pip install {e.name}`) or use backend='onnxruntime'"
        ) from e
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj  # type: ignore[no-any-return]


def create_backend(
    name: str,
    bundle: Bundle,
    *,
    device: str | Device = "cpu",
    precision: str = "fp32",
    threads: int | None = None,
    **options: Any,
) -> Backend:
    """Build the backend registered as ``name`` for ``bundle``.

    Raises:
        InputError: ``name`` is not a registered backend.
        BackendUnavailableError: the backend's package is not installed.
        BundleError: the bundle lacks a graph the backend needs.
        MssanError: the factory returned something that is not a :class:`Backend`.
    """
    if name not in _REGISTRY:
        raise InputError(f"unknown backend {name!r}; choose one of {available_backends()}")
    entry = _REGISTRY[name]
    factory = _resolve(name, entry) if isinstance(entry, str) else entry
    backend = factory(bundle, device=device, precision=precision, threads=threads, **options)
    if not isinstance(backend, Backend):
        raise MssanError(
            f"the factory of backend {name!r} returned {type(backend).__name__}, not a mssan_infer.backends.Backend; "
            "subclass Backend (implement _run) so feeds are checked the same way on every backend"
        )
    return backend
