"""Run a ``tritonserver`` on a generated model repository: ``python -m mssan_infer serve``, tests, benchmarks.

Finds the binary in ``$TRITONSERVER``, ``/opt/tritonserver`` or ``$PATH`` (NVIDIA's
containers), else the one in the nvidia-pytriton wheel (``pip install mssan[triton]``),
a real CPU ``tritonserver`` with only the Python backend. For that one it sets up
what the wheel leaves to the user:

- a backend directory (in a temp folder) with pytriton's Python backend and the
  backend stub of this Python copied beside ``libtriton_python.so``;
- a Python-based backend named ``onnxruntime`` there (``onnx_model.py`` with the search
  core beside it: ONNX Runtime inside the Python backend), so repositories of the
  default ``onnxruntime`` flavour load unchanged;
- ``LD_LIBRARY_PATH`` = this interpreter's ``LIBDIR`` (the stub links ``libpython3.X.so``)
  + the wheel's ``nvidia_pytriton.libs``; ``PYTHONPATH`` = this interpreter's ``sys.path``
  and its ``bin`` first on ``PATH`` (numpy, onnxruntime for the models).

The server listens on 127.0.0.1 unless told otherwise, and its whole process group is
always stopped when :func:`local_tritonserver` exits, even on error. Nothing here
imports torch or the exporter.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence, TextIO

from mssan_infer.deps import optional_import
from mssan_infer.errors import BackendUnavailableError, InputError
from mssan_infer.gallery.folder import read_index_manifest
from mssan_infer.names import BUNDLE_ID_PARAM, INDEX_MANIFEST
from mssan_infer.triton import ONNX_MODEL, copy_runtime

__all__ = [
    "TritonBinary",
    "RunningServer",
    "find_tritonserver",
    "free_port",
    "local_tritonserver",
    "server_env",
    "repository_backends",
    "serve",
    "DEFAULT_PORTS",
    "INDEX_ENV",
]

log = logging.getLogger(__name__)

DEFAULT_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}  # Triton's own defaults
INDEX_ENV = "MSSAN_RETRIEVER_INDEX"  # read by the retriever model
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class TritonBinary:
    server: Path  # the tritonserver executable
    backends: Path  # --backend-directory
    libs: Path | None  # extra LD_LIBRARY_PATH entry the binary needs (pytriton's vendored libs)
    stub: Path | None  # Python backend stub to place beside libtriton_python.so (pytriton)


@dataclass(frozen=True)
class RunningServer:
    http_url: str  # "127.0.0.1:PORT"
    grpc_url: str
    metrics_port: int
    pid: int
    log_path: Path
    process: "subprocess.Popen[bytes] | None" = field(default=None, repr=False, compare=False)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def find_tritonserver() -> TritonBinary:
    """The tritonserver to use: ``$TRITONSERVER``, ``/opt/tritonserver``, ``$PATH``, then nvidia-pytriton's.

    Raises:
        BackendUnavailableError: none found.
    """
    env = os.environ.get("TRITONSERVER")
    candidates = [Path(env)] if env else []
    candidates.append(Path("/opt/tritonserver/bin/tritonserver"))
    which = shutil.which("tritonserver")
    if which:
        candidates.append(Path(which))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            backends = c.parent.parent / "backends"
            return TritonBinary(c, backends, None, None)
    pytriton = optional_import(
        "pytriton",
        "nvidia-pytriton",
        "serving without a tritonserver on PATH (its wheel holds a CPU tritonserver)",
        "$TRITONSERVER, put tritonserver on PATH, or NVIDIA's tritonserver container (docs/deployment.md)",
    )
    root = Path(pytriton.__file__).resolve().parent / "tritonserver"
    ver = f"{sys.version_info[0]}.{sys.version_info[1]}"
    stub = root / "python_backend_stubs" / ver / "triton_python_backend_stub"
    libs = root.parent.parent / "nvidia_pytriton.libs"
    if not (root / "bin" / "tritonserver").is_file() or not stub.is_file():
        raise BackendUnavailableError(
            f"nvidia-pytriton at {root} lacks the tritonserver binary or a Python {ver} backend stub; "
            "reinstall it (`pip install --force-reinstall nvidia-pytriton`) or use a Python it ships a stub "
            "for"
        )
    return TritonBinary(
        root / "bin" / "tritonserver", root / "backends", libs if libs.is_dir() else None, stub
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _check_port(host: str, port: int, what: str) -> None:
    """Refuse a port something listens on (SO_REUSEADDR, as the server binds: a port in TIME_WAIT is free)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise InputError(
                f"the {what} port {host}:{port} is not free ({e.strerror}); stop what uses it or pass "
                f"--{what}-port N"
            ) from None


def server_env(
    binary: TritonBinary, python_path: Sequence[str] | None = None, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Environment of the server: libpython and the binary's libs on LD_LIBRARY_PATH, sys.path on
    PYTHONPATH."""
    env = dict(os.environ)
    libdirs = [str(sysconfig.get_config_var("LIBDIR") or "")]
    if binary.libs is not None:
        libdirs.append(str(binary.libs))
    if env.get("LD_LIBRARY_PATH"):
        libdirs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = ":".join(d for d in libdirs if d)
    paths = list(python_path) if python_path is not None else [p for p in sys.path if p and Path(p).exists()]
    env["PYTHONPATH"] = ":".join(paths)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env.update(extra or {})
    return env


def _available_backends(backends: Path) -> set[str]:
    """Backends a server with this backend directory can run (C++ libraries and Python-based ones)."""
    if not backends.is_dir():
        return set()
    names = set()
    for d in backends.iterdir():
        if d.is_dir() and ((d / f"libtriton_{d.name}.so").is_file() or (d / "model.py").is_file()):
            names.add(d.name)
    return names


def _backend_dir(binary: TritonBinary, work: Path) -> Path:
    """The backend directory to serve with.

    A server that ships its backends (NVIDIA's containers) uses its own. For nvidia-pytriton's,
    a copy with the Python backend stub of this interpreter in place and a Python-based
    ``onnxruntime`` backend (ONNX Runtime inside the Python backend).
    """
    if binary.stub is None:
        return binary.backends
    dest = work / "backends"
    shutil.copytree(binary.backends, dest, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(binary.stub, dest / "python" / "triton_python_backend_stub")
    if "onnxruntime" not in _available_backends(dest):
        ort = dest / "onnxruntime"
        ort.mkdir()
        shutil.copyfile(ONNX_MODEL, ort / "model.py")
        copy_runtime(ort)
    return dest


_BACKEND_RE = re.compile(r'^\s*(backend|platform)\s*:\s*"([^"]+)"', re.MULTILINE)
_PLATFORMS = {"onnxruntime_onnx": "onnxruntime", "tensorrt_plan": "tensorrt", "pytorch_libtorch": "pytorch"}


def repository_backends(repository: str | os.PathLike[str]) -> dict[str, str]:
    """``{model: backend}`` of the models in a repository, read from their ``config.pbtxt``."""
    out: dict[str, str] = {}
    for cfg in sorted(Path(repository).glob("*/config.pbtxt")):
        found: dict[str, str] = dict(_BACKEND_RE.findall(cfg.read_text(encoding="utf-8", errors="replace")))
        platform = found.get("platform", "?")
        out[cfg.parent.name] = found.get("backend") or _PLATFORMS.get(platform, platform)
    return out


def _check_repository(repo: Path, backends: Path) -> None:
    """Refuse, before starting, a repository whose models need backends this server lacks."""
    models = repository_backends(repo)
    if not models:
        raise InputError(
            f"{repo} holds no models (no */config.pbtxt); write one with `python -m export ... --triton`"
        )
    have = _available_backends(backends)
    if not have:  # an unknown layout: let the server decide
        return
    missing = {m: b for m, b in models.items() if b not in have}
    if missing:
        needs = ", ".join(f"{m} ({b})" for m, b in sorted(missing.items()))
        hint = (
            " The `tensorrt` flavour needs a GPU and NVIDIA's container (docs/deployment.md); re-export with "
            "`--triton-backend onnxruntime` to serve on CPU here."
            if "tensorrt" in missing.values()
            else ""
        )
        raise BackendUnavailableError(
            f"this tritonserver ({backends}) has no backend for {needs}; it has {sorted(have)}.{hint}"
        )


def _ready(http_url: str, timeout: float) -> bool:
    try:
        with urllib.request.urlopen(f"http://{http_url}/v2/health/ready", timeout=timeout) as r:
            return int(r.status) == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _remove_shm(prefix: str) -> None:
    """Remove Python-backend shared-memory regions left by a server that had to be killed."""
    shm = Path("/dev/shm")
    if not prefix or not shm.is_dir():
        return
    for p in shm.glob(f"{prefix}*"):
        with contextlib.suppress(OSError):
            p.unlink()


def _stop(proc: subprocess.Popen[bytes], grace_s: float = 15.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@contextlib.contextmanager
def local_tritonserver(
    repository: str | os.PathLike[str],
    *,
    host: str = "127.0.0.1",
    http_port: int = 0,
    grpc_port: int = 0,
    metrics_port: int = 0,
    startup_timeout_s: float = 60.0,
    python_path: Sequence[str] | None = None,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    binary: TritonBinary | None = None,
    log_verbose: int = 0,
    log_path: str | os.PathLike[str] | None = None,
) -> Iterator[RunningServer]:
    """Run tritonserver on ``repository`` until the context exits.

    Args:
        host: address to listen on (loopback by default).
        http_port, grpc_port, metrics_port: ``0`` picks a free port.
        env: extra environment for the server (e.g. ``MSSAN_RETRIEVER_INDEX``).
        log_path: where the server log goes (default: a temp folder removed on exit).

    Readiness is polled (``/v2/health/ready``) until ``startup_timeout_s``; on failure the
    error shows the tail of the server log. The server's process group is always stopped
    (SIGTERM, then SIGKILL).

    Raises:
        BackendUnavailableError: no binary, a backend the repository needs is missing, or the
            server exited / did not become ready in time.
        InputError: a port that is not free.
    """
    binary = binary or find_tritonserver()
    repo = Path(repository).resolve()
    if not repo.is_dir():
        raise InputError(
            f"model repository {repo} does not exist; write one with `python -m export ... --triton`"
        )
    work = Path(tempfile.mkdtemp(prefix="mssan-triton-"))
    proc: subprocess.Popen[bytes] | None = None
    shm_prefix = ""
    try:
        backends = _backend_dir(binary, work)
        _check_repository(repo, backends)
        probe = "127.0.0.1" if host in ("0.0.0.0", "localhost") else host
        ports = []
        for name, port in (("http", http_port), ("grpc", grpc_port), ("metrics", metrics_port)):
            if port:
                _check_port(probe, port, name)
            ports.append(port or free_port(probe))
        http, grpc, metrics = ports
        logp = Path(log_path) if log_path is not None else work / "server.log"
        shm_prefix = f"mssan{os.getpid()}x{http}"
        args = [
            str(binary.server),
            f"--model-repository={repo}",
            f"--backend-directory={backends}",
            f"--http-address={host}",
            f"--http-port={http}",
            f"--grpc-address={host}",
            f"--grpc-port={grpc}",
            f"--metrics-address={host}",
            f"--metrics-port={metrics}",
            "--allow-gpu-metrics=false",
            "--strict-readiness=true",
            "--exit-on-error=true",
            "--disable-auto-complete-config",
            f"--log-verbose={log_verbose}",
            f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
            "--exit-timeout-secs=3",  # do not wait long for clients that keep connections open
            "--pinned-memory-pool-byte-size=0",
            *extra_args,
        ]
        with open(logp, "wb") as logf:
            proc = subprocess.Popen(
                args,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=server_env(binary, python_path, env),
                cwd=work,
                start_new_session=True,
            )
        url_host = "127.0.0.1" if host in ("0.0.0.0", "localhost") else host
        server = RunningServer(f"{url_host}:{http}", f"{url_host}:{grpc}", metrics, proc.pid, logp, proc)
        deadline = time.monotonic() + startup_timeout_s
        while not _ready(server.http_url, 1.0):
            if proc.poll() is not None:
                raise BackendUnavailableError(
                    f"tritonserver exited with code {proc.returncode} during startup; log "
                    f"tail:\n{server.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise BackendUnavailableError(
                    f"tritonserver was not ready after {startup_timeout_s:.0f} s; log "
                    f"tail:\n{server.log_tail()}"
                )
            time.sleep(0.25)
        yield server
    finally:
        if proc is not None:
            _stop(proc)
        _remove_shm(shm_prefix)
        shutil.rmtree(work, ignore_errors=True)


def _served_bundle_id(repo: Path) -> str | None:
    cfg = repo / "retriever" / "config.pbtxt"
    if not cfg.is_file():
        return None
    m = re.search(
        rf'key:\s*"{BUNDLE_ID_PARAM}"\s*value:\s*{{\s*string_value:\s*"([^"]*)"', cfg.read_text("utf-8")
    )
    return m.group(1) if m else None


def _check_index(repo: Path, index: Path) -> None:
    """The index must exist and come from the bundle the repository serves (checked before the server
    starts)."""
    manifest = read_index_manifest(index)
    want = _served_bundle_id(repo)
    if want is None:
        raise InputError(f"{repo} has no retriever model to serve the index with; export with --triton")
    if manifest["bundle_id"] != want:
        raise InputError(
            f"index {index} was built with bundle {manifest['bundle_id']}, but {repo} serves bundle {want}; "
            "index the gallery with the same bundle (`python -m mssan_infer index --bundle ...`)"
        )


def serve(
    repository: str | os.PathLike[str],
    *,
    index: str | os.PathLike[str] | None = None,
    host: str = "127.0.0.1",
    http_port: int = DEFAULT_PORTS["http"],
    grpc_port: int = DEFAULT_PORTS["grpc"],
    metrics_port: int = DEFAULT_PORTS["metrics"],
    startup_timeout_s: float = 120.0,
    log_path: str | os.PathLike[str] | None = None,
    out: TextIO | None = None,
) -> int:
    """Serve ``repository`` in the foreground until Ctrl-C (SIGINT) or SIGTERM; returns the exit status.

    Prints the URLs once the server is ready. With ``index``, the ``retriever`` model serves that
    saved index (checked against the repository's bundle first) instead of the one installed in
    the repository.

    Raises:
        InputError / BackendUnavailableError / IndexFileError: as :func:`local_tritonserver`, a bad index.
    """
    out = out or sys.stdout
    repo = Path(repository)
    env: dict[str, str] = {}
    if index is not None:
        idx = Path(index).resolve()
        _check_index(repo, idx)
        env[INDEX_ENV] = str(idx)
    elif (
        _served_bundle_id(repo) is not None
        and not (repo / "retriever" / "1" / "index" / INDEX_MANIFEST).is_file()
    ):
        log.warning(
            "the retriever model has no index: pass --index DIR (a folder written by "
            "`python -m mssan_infer index`); it answers with an error until then"
        )
    if host not in _LOOPBACK:
        log.warning("listening on %s: anyone who can reach this machine can query the models", host)

    stop = {"signal": 0}

    def on_term(signum: int, frame: object) -> None:
        stop["signal"] = signum
        raise KeyboardInterrupt

    # SIGINT explicitly too: a process started in the background of a non-interactive shell inherits
    # SIGINT ignored, and Python then installs no KeyboardInterrupt handler of its own
    previous = {sig: signal.signal(sig, on_term) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with local_tritonserver(
            repo,
            host=host,
            http_port=http_port,
            grpc_port=grpc_port,
            metrics_port=metrics_port,
            startup_timeout_s=startup_timeout_s,
            env=env,
            log_path=log_path,
        ) as server:
            models = ", ".join(f"{m} ({b})" for m, b in repository_backends(repo).items())
            h, _, _ = server.http_url.rpartition(":")
            print(f"Triton is serving {repo}: {models}", file=out)
            print(
                f"  HTTP/REST  http://{server.http_url}   (KServe v2: POST /v2/models/retriever/infer)",
                file=out,
            )
            print(f"  gRPC       {server.grpc_url}", file=out)
            print(f"  metrics    http://{h}:{server.metrics_port}/metrics", file=out)
            print(f"  log        {server.log_path}", file=out)
            print("Press Ctrl-C to stop.", file=out, flush=True)
            proc_gone = _wait(server)
            if proc_gone is not None:
                print(
                    f"error: tritonserver exited with code {proc_gone}; log tail:\n{server.log_tail()}",
                    file=sys.stderr,
                )
                return 1
    except KeyboardInterrupt:
        print("stopped", file=out, flush=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _wait(server: RunningServer) -> int | None:
    """Block until the server process ends (its exit code) or the user interrupts (KeyboardInterrupt)."""
    assert server.process is not None
    while True:
        code = server.process.poll()
        if code is not None:
            return code
        time.sleep(0.5)
