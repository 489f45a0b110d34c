"""Backends behind one contract (:class:`Backend`) and a small registry to pick one by name.

A backend is made by a factory ``factory(bundle, options) -> Backend`` (a subclass of
:class:`Backend`, checked when it is made), with ``options`` a :class:`~mssan_infer.options.BackendOptions`
(the subclass registered with the name, e.g. :class:`~mssan_infer.options.OnnxRuntimeOptions`).
Factories are registered by name, either as a callable
or as a ``"module:attribute"`` string imported only when that backend is
asked for, so optional packages (tensorrt, tritonclient) are never imported
by ``import mssan_infer``.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Union

from mssan_infer.backends.base import Backend
from mssan_infer.bundle import Bundle
from mssan_infer.errors import BackendUnavailableError, InputError, MssanError
from mssan_infer.options import BackendOptions, OnnxRuntimeOptions, TensorRTOptions, TritonOptions

__all__ = ["BackendFactory", "register_backend", "create_backend", "available_backends", "backend_options"]

BackendFactory = Callable[[Bundle, BackendOptions], Backend]

_REGISTRY: dict[str, Union[str, BackendFactory]] = {
    "onnxruntime": "mssan_infer.backends.onnxruntime:OnnxRuntimeBackend.from_bundle",
    "tensorrt": "mssan_infer.backends.tensorrt:TensorRTBackend.from_bundle",
    "triton": "mssan_infer.backends.triton:TritonBackend.from_bundle",
}


_OPTIONS: dict[str, type[BackendOptions]] = {
    "onnxruntime": OnnxRuntimeOptions,
    "tensorrt": TensorRTOptions,
    "triton": TritonOptions,
}


def register_backend(
    name: str,
    factory: Union[str, BackendFactory],
    *,
    options: type[BackendOptions] = BackendOptions,
    replace: bool = False,
) -> None:
    """Make ``Retriever.load(..., backend=name)`` use ``factory``.

    Args:
        name: backend name (lower case).
        factory: a callable ``(bundle, options) -> Backend`` or a ``"package.module:attr[.attr]"``
            string resolved lazily.
        options: the options class of this backend (``Retriever.load(bundle, backend=name)`` makes
            one with its defaults).
        replace: allow replacing an existing registration.

    Raises:
        InputError: ``name`` is already registered and ``replace`` is false.
    """
    if not isinstance(name, str) or not name:
        raise InputError(f"backend name must be a non-empty str, got {name!r}")
    if name in _REGISTRY and not replace:
        raise InputError(f"backend {name!r} is already registered; pass replace=True to override it")
    if not (isinstance(options, type) and issubclass(options, BackendOptions)):
        raise InputError(f"options must be a subclass of BackendOptions, got {options!r}")
    _REGISTRY[name] = factory
    _OPTIONS[name] = options


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


def backend_options(backend: str | BackendOptions) -> tuple[str, BackendOptions]:
    """``(name, options)`` for a backend name (its options class with defaults) or an options object.

    Raises:
        InputError: an unknown name, an options object of no registered backend, or anything else.
    """
    if isinstance(backend, BackendOptions):
        name = type(backend).backend
        if name not in _REGISTRY:
            raise InputError(
                f"{type(backend).__name__} names no registered backend ({name!r}); set its `backend` "
                f"class attribute to one of {available_backends()} or register_backend(...) it"
            )
        return name, backend
    if not isinstance(backend, str) or backend not in _REGISTRY:
        raise InputError(f"unknown backend {backend!r}; choose one of {available_backends()}")
    return backend, _OPTIONS.get(backend, BackendOptions)()


def create_backend(backend: str | BackendOptions, bundle: Bundle) -> Backend:
    """Build a backend for ``bundle``: by name (default options) or from an options object
    (:class:`~mssan_infer.options.OnnxRuntimeOptions`, ...).

    Raises:
        InputError: an unknown backend, or options that do not fit it.
        BackendUnavailableError: the backend's package is not installed.
        BundleError: the bundle lacks a graph the backend needs.
        MssanError: the factory returned something that is not a :class:`Backend`.
    """
    name, options = backend_options(backend)
    entry = _REGISTRY[name]
    factory = _resolve(name, entry) if isinstance(entry, str) else entry
    made = factory(bundle, options)
    if not isinstance(made, Backend):
        raise MssanError(
            f"the factory of backend {name!r} returned {type(made).__name__}, not a mssan_infer.Backend; "
            "subclass Backend (implement _run) so feeds are checked the same way on every backend"
        )
    return made
