"""Serve a generated Triton repository with a local ``tritonserver`` binary (tests, benchmarks, demos).

Finds the binary in ``$TRITONSERVER`` / ``$PATH`` (NVIDIA's containers) or in the
nvidia-pytriton wheel, which bundles a real tritonserver with only the Python
backend (so serve the ``python`` flavour of the repository with it). The
server listens on 127.0.0.1 only, on free ports, and is always stopped (its
whole process group) when the context exits, even on error.

The Python backend stub embeds the interpreter of this Python, so the server's
environment gets ``LD_LIBRARY_PATH`` = this interpreter's ``LIBDIR`` (where
``libpython3.x.so`` lives) and ``PYTHONPATH`` = this interpreter's ``sys.path``
(numpy, onnxruntime).
"""
from __future__ import annotations

import contextlib
import os
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
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from .errors import ExportError

__all__ = ["TritonBinary", "RunningServer", "find_tritonserver", "free_port", "local_tritonserver", "server_env"]


@dataclass(frozen=True)
class TritonBinary:
    server: Path            # the tritonserver executable
    backends: Path          # --backend-directory
    libs: Path | None       # extra shared libraries the binary needs (pytriton's vendored libs)
    stub: Path | None       # Python backend stub to place beside libtriton_python.so (pytriton)


@dataclass(frozen=True)
class RunningServer:
    http_url: str           # "127.0.0.1:PORT"
    grpc_url: str
    metrics_port: int
    pid: int
    log_path: Path

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def find_tritonserver() -> TritonBinary:
    """The tritonserver to use: ``$TRITONSERVER``, ``/opt/tritonserver``, ``$PATH``, then nvidia-pytriton's.

    Raises:
        ExportError: none found.
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
    try:
        import pytriton
    except ImportError:
        raise ExportError(
            "no tritonserver found: set $TRITONSERVER, put tritonserver on PATH, use NVIDIA's tritonserver container, "
            "or `pip install nvidia-pytriton` (bundles a tritonserver with the Python backend)"
        ) from None
    root = Path(pytriton.__file__).resolve().parent / "tritonserver"
    ver = f"{sys.version_info[0]}.{sys.version_info[1]}"
    stub = root / "python_backend_stubs" / ver / "triton_python_backend_stub"
    libs = root.parent.parent / "nvidia_pytriton.libs"
    if not (root / "bin" / "tritonserver").is_file() or not stub.is_file():
        raise ExportError(f"nvidia-pytriton at {root} lacks the tritonserver binary or a Python {ver} backend stub")
    return TritonBinary(root / "bin" / "tritonserver", root / "backends", libs if libs.is_dir() else None, stub)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_env(binary: TritonBinary, python_path: Sequence[str] | None = None) -> dict[str, str]:
    """Environment of the server: libpython and the binary's libs on LD_LIBRARY_PATH, sys.path on PYTHONPATH."""
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
    return env


def _backend_dir(binary: TritonBinary, work: Path) -> Path:
    """A backend directory with the Python backend stub of this interpreter in place (pytriton ships it apart)."""
    if binary.stub is None:
        return binary.backends
    dest = work / "backends"
    shutil.copytree(binary.backends, dest, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(binary.stub, dest / "python" / "triton_python_backend_stub")
    return dest


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
    startup_timeout_s: float = 60.0,
    python_path: Sequence[str] | None = None,
    extra_args: Sequence[str] = (),
    binary: TritonBinary | None = None,
    log_verbose: int = 0,
) -> Iterator[RunningServer]:
    """Run tritonserver on ``repository`` (127.0.0.1, free ports) until the context exits.

    Readiness is polled (``/v2/health/ready``) until ``startup_timeout_s``; on failure the
    error shows the tail of the server log. The server's process group is always stopped
    (SIGTERM, then SIGKILL).

    Raises:
        ExportError: no binary, or the server exited / did not become ready in time.
    """
    binary = binary or find_tritonserver()
    repo = Path(repository).resolve()
    work = Path(tempfile.mkdtemp(prefix="mssan-triton-"))
    proc: subprocess.Popen[bytes] | None = None
    shm_prefix = ""
    try:
        backends = _backend_dir(binary, work)
        http, grpc, metrics = free_port(), free_port(), free_port()
        log_path = work / "server.log"
        shm_prefix = f"mssan{os.getpid()}x{http}"
        args = [
            str(binary.server),
            f"--model-repository={repo}",
            f"--backend-directory={backends}",
            "--http-address=127.0.0.1", f"--http-port={http}",
            "--grpc-address=127.0.0.1", f"--grpc-port={grpc}",
            "--metrics-address=127.0.0.1", f"--metrics-port={metrics}", "--allow-gpu-metrics=false",
            "--strict-readiness=true", "--exit-on-error=true", "--disable-auto-complete-config",
            f"--log-verbose={log_verbose}",
            f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
            "--exit-timeout-secs=3",            # do not wait long for clients that keep connections open
            "--pinned-memory-pool-byte-size=0",
            *extra_args,
        ]
        with open(log_path, "wb") as logf:
            proc = subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT, env=server_env(binary, python_path),
                                    cwd=work, start_new_session=True)
        server = RunningServer(f"127.0.0.1:{http}", f"127.0.0.1:{grpc}", metrics, proc.pid, log_path)
        deadline = time.monotonic() + startup_timeout_s
        while not _ready(server.http_url, 1.0):
            if proc.poll() is not None:
                raise ExportError(f"tritonserver exited with code {proc.returncode} during startup; log tail:\n"
                                  f"{server.log_tail()}")
            if time.monotonic() > deadline:
                raise ExportError(f"tritonserver was not ready after {startup_timeout_s:.0f} s; log tail:\n"
                                  f"{server.log_tail()}")
            time.sleep(0.25)
        yield server
    finally:
        if proc is not None:
            _stop(proc)
        _remove_shm(shm_prefix)
        shutil.rmtree(work, ignore_errors=True)
