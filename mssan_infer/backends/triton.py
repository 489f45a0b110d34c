"""Triton backend: the bundle's graphs run on a Triton server (``python -m export ... --triton``).

``Retriever.load(bundle, backend="triton", url="127.0.0.1:8000", protocol="http")``
keeps the galleries and stage 1 local and sends every encoder and scorer call
to the server's ``image_encoder`` / ``text_encoder`` / ``scorer`` models. On
creation the backend checks that the server is live, that the three models are
ready and that they serve this bundle (the ``mssan_bundle_id`` parameter in
their configs), so a wrong or stopped server fails early with
:class:`TritonUnavailableError` instead of returning wrong scores.

tritonclient is imported lazily. Clients are made per thread (the HTTP client
is not thread-safe), so a Retriever on this backend can be searched from
several threads.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Mapping

import numpy as np

from mssan_infer.backends.base import Backend, declared_dims
from mssan_infer.bundle import Bundle
from mssan_infer.deps import optional_import
from mssan_infer.errors import BackendUnavailableError, InputError, MssanError
from mssan_infer.names import BUNDLE_ID_PARAM
from mssan_infer.options import BackendOptions, TritonOptions
from mssan_infer.spec import GRAPHS

__all__ = ["TritonBackend", "TritonUnavailableError", "TritonRequestError", "PROTOCOLS"]

log = logging.getLogger(__name__)

PROTOCOLS = ("http", "grpc")
_NP_TO_TRITON = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64", np.dtype(np.float16): "FP16"}


class TritonUnavailableError(BackendUnavailableError):
    """The Triton server cannot be reached, is not ready, or does not serve the bundle's models."""


class TritonRequestError(MssanError):
    """The server rejected or failed an inference request."""


def _import_client(protocol: str) -> Any:
    return optional_import(
        f"tritonclient.{protocol}", f"'tritonclient[{protocol}]'", "backend 'triton'", "backend='onnxruntime'"
    )


def _is_connection_error(e: BaseException) -> bool:
    if isinstance(e, (OSError, TimeoutError)):
        return True
    text = str(e).lower()
    status = str(getattr(e, "status", lambda: "")() or "").lower()
    return any(
        s in text or s in status
        for s in (
            "unavailable",
            "failed to connect",
            "connection refused",
            "connect failed",
            "deadline",
            "timed out",
            "timeout",
            "socket closed",
            "broken pipe",
            "connection reset",
        )
    )


class TritonBackend(Backend):
    """Runs the three graphs on a Triton server.

    Args:
        url: ``host:port`` of the server's HTTP (default port 8000) or gRPC (8001) endpoint.
        protocol: ``"http"`` or ``"grpc"``.
        bundle_id: when given, every model must carry this ``mssan_bundle_id`` parameter.
        models: graph name -> model name on the server (default: the graph names).
        model_version: version to call (``""``: the server's policy).
        timeout_s: per request (network timeout for HTTP, deadline for gRPC).
        connect_timeout_s: connection timeout (HTTP) and readiness checks.
        wait_ready_s: keep polling for readiness this long before giving up (0: check once).

    Raises:
        BackendUnavailableError: tritonclient missing.
        TritonUnavailableError: server down, models not ready, or serving another bundle.
        InputError: bad protocol or option.
    """

    name = "triton"

    def __init__(
        self,
        url: str = "127.0.0.1:8000",
        *,
        protocol: str = "http",
        bundle_id: str | None = None,
        models: Mapping[str, str] | None = None,
        model_version: str = "",
        timeout_s: float = 60.0,
        connect_timeout_s: float = 5.0,
        wait_ready_s: float = 0.0,
    ) -> None:
        super().__init__("cpu")  # the client's side; the server places the models
        if protocol not in PROTOCOLS:
            raise InputError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        if not isinstance(url, str) or not url:
            raise InputError(f"url must be 'host:port', got {url!r}")
        for label, v in (("timeout_s", timeout_s), ("connect_timeout_s", connect_timeout_s)):
            if not isinstance(v, (int, float)) or v <= 0:
                raise InputError(f"{label} must be a positive number of seconds, got {v!r}")
        self.url = url.split("://", 1)[-1]
        self.protocol = protocol
        self.timeout_s = float(timeout_s)
        self.connect_timeout_s = float(connect_timeout_s)
        self.model_version = str(model_version)
        self.models = {g: g for g in GRAPHS}
        unknown = set(models or {}) - set(GRAPHS)
        if unknown:
            raise InputError(f"models maps unknown graphs {sorted(unknown)}; graphs are {sorted(GRAPHS)}")
        self.models.update(models or {})
        self._client_mod = _import_client(protocol)
        self._local = threading.local()
        self._clients: list[Any] = []
        self._lock = threading.Lock()
        self._limits: dict[str, dict[str, int]] = {}
        self._check_server(bundle_id, float(wait_ready_s))

    # ---- construction -----------------------------------------------------------
    @classmethod
    def from_bundle(cls, bundle: Bundle, options: BackendOptions | None = None) -> "TritonBackend":
        """A client of the server at ``options.url`` serving ``bundle``'s repository (with
        ``check_bundle``, the server must serve this bundle).

        Raises:
            InputError: options of another backend.
            TritonUnavailableError: as in :class:`TritonBackend`.
        """
        opts = options if options is not None else TritonOptions()
        if not isinstance(opts, TritonOptions):
            raise InputError(
                f"backend 'triton' takes TritonOptions (url=..., protocol=...), got {type(opts).__name__}"
            )
        return cls(
            opts.url,
            protocol=opts.protocol,
            bundle_id=bundle.bundle_id if opts.check_bundle else None,
            models=opts.models,
            model_version=opts.model_version,
            timeout_s=opts.timeout_s,
            connect_timeout_s=opts.connect_timeout_s,
            wait_ready_s=opts.wait_ready_s,
        )

    def _new_client(self) -> Any:
        if self.protocol == "http":
            return self._client_mod.InferenceServerClient(
                self.url, connection_timeout=self.connect_timeout_s, network_timeout=self.timeout_s
            )
        return self._client_mod.InferenceServerClient(self.url)

    def _client(self) -> Any:
        if self._closed:
            raise MssanError("this triton backend is closed")
        c = getattr(self._local, "client", None)
        if c is None:
            c = self._new_client()
            self._local.client = c
            with self._lock:
                self._clients.append(c)
        return c

    def _unavailable(self, what: str, e: BaseException | None = None) -> TritonUnavailableError:
        detail = f" ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})" if e else ""
        return TritonUnavailableError(
            f"Triton server at {self.url} ({self.protocol}) {what}{detail}. Start it with the bundle's "
            "repository "
            "(tritonserver --model-repository BUNDLE/triton, see docs/deployment.md), check url/protocol "
            "(HTTP is port 8000, gRPC 8001 by default), or use backend='onnxruntime'"
        )

    def _check_server(self, bundle_id: str | None, wait_s: float) -> None:
        deadline = time.monotonic() + max(0.0, wait_s)
        last: BaseException | None = None
        while True:
            try:
                client = self._client()
                if not client.is_server_live(**self._control_timeout()):
                    raise self._unavailable("is not live")
                not_ready = [
                    m
                    for m in self.models.values()
                    if not client.is_model_ready(m, self.model_version, **self._control_timeout())
                ]
                if not not_ready:
                    break
                last = self._unavailable(f"has not loaded models {not_ready} (not ready)")
            except TritonUnavailableError as e:
                last = e
            except Exception as e:  # noqa: BLE001 - tritonclient/gevent/grpc raise many types
                last = self._unavailable("cannot be reached", e)
                self._local.client = None
            if time.monotonic() >= deadline:
                assert last is not None
                raise last
            time.sleep(0.2)
        client = self._client()
        for graph, model in self.models.items():
            cfg = self._model_config(client, model)
            params = cfg.get("parameters") or {}
            served = (params.get(BUNDLE_ID_PARAM) or {}).get("string_value")
            if bundle_id is not None and served is not None and served != bundle_id:
                raise TritonUnavailableError(
                    f"Triton model {model!r} at {self.url} serves bundle {served}, but this Retriever "
                    "loaded bundle "
                    f"{bundle_id}; their vectors would not match. Serve this bundle's triton/ repository, "
                    "or pass "
                    "check_bundle=False if you know better"
                )
            mbs = int(cfg.get("max_batch_size", 0) or 0)
            self._limits[graph] = {"B": mbs} if mbs > 0 else {}
            self._add_graph(
                graph, declared_dims(GRAPHS[graph], _config_shapes(cfg, mbs > 0), f"Triton model {model!r}")
            )
        log.info("triton backend ready: %s (%s), models %s", self.url, self.protocol, self.models)

    def _control_timeout(self) -> dict[str, float]:
        """Deadline of readiness/config calls: gRPC takes it per call (HTTP has it on the client)."""
        return {"client_timeout": self.connect_timeout_s} if self.protocol == "grpc" else {}

    def _model_config(self, client: Any, model: str) -> dict[str, Any]:
        try:
            if self.protocol == "grpc":
                cfg = client.get_model_config(
                    model, self.model_version, as_json=True, **self._control_timeout()
                )
                return dict(cfg.get("config", cfg))
            return dict(client.get_model_config(model, self.model_version))
        except Exception as e:  # noqa: BLE001
            raise self._unavailable(f"did not return the config of model {model!r}", e) from e

    # ---- inference ------------------------------------------------------------------
    def limits(self, graph: str) -> dict[str, int]:
        """``{"B": max_batch_size}`` of a batching model (encoder batches above it are split)."""
        return dict(self._limits.get(graph, {}))

    def _run(self, graph: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = GRAPHS[graph]
        mod = self._client_mod
        inputs = []
        for t in spec.inputs:
            arr = feeds[t.name]
            inp = mod.InferInput(t.name, list(arr.shape), _NP_TO_TRITON[arr.dtype])
            if self.protocol == "http":
                inp.set_data_from_numpy(arr, binary_data=True)
            else:
                inp.set_data_from_numpy(arr)
            inputs.append(inp)
        if self.protocol == "http":
            outputs = [mod.InferRequestedOutput(n, binary_data=True) for n in spec.output_names]
            kwargs: dict[str, Any] = {}
        else:
            outputs = [mod.InferRequestedOutput(n) for n in spec.output_names]
            kwargs = {"client_timeout": self.timeout_s}
        try:
            result = self._client().infer(
                self.models[graph], inputs, model_version=self.model_version, outputs=outputs, **kwargs
            )
        except MssanError:
            raise
        except Exception as e:  # noqa: BLE001 - tritonclient raises InferenceServerException, socket errors...
            if _is_connection_error(e):
                self._local.client = None
                raise self._unavailable(f"failed during {graph} inference", e) from e
            raise TritonRequestError(f"Triton model {self.models[graph]!r} rejected the request: {e}") from e
        out = {}
        for n in spec.output_names:
            a = result.as_numpy(n)
            if a is None:
                raise TritonRequestError(f"Triton model {self.models[graph]!r} returned no output {n!r}")
            out[n] = a.astype(np.float32) if a.dtype != np.float32 else a
        return out

    def _close(self) -> None:
        with self._lock:
            for c in self._clients:
                try:
                    c.close()
                except Exception:  # noqa: BLE001 - closing a dead connection
                    pass
            self._clients.clear()


def _config_shapes(cfg: Mapping[str, Any], batched: bool) -> dict[str, list[int]]:
    """``{input: full shape}`` declared by a model config (JSON form; the batch dim added when batching)."""
    shapes: dict[str, list[int]] = {}
    for i in cfg.get("input") or []:
        try:
            dims = [int(d) for d in i.get("dims") or []]
        except (TypeError, ValueError):
            continue
        shapes[str(i.get("name"))] = ([-1] if batched else []) + dims
    return shapes
