"""docs/deployment.md's quick start, run as written: export, index, serve, curl, the Python clients.

The commands are read from the document itself (the fenced ``bash`` and ``python`` blocks
of its "Quick start" section), so the documentation cannot drift from the code. They run
in a scratch folder laid out like the quickstart's ``demo/`` (a tiny checkpoint and random
features instead of the trained demo), with ``python`` the interpreter running the tests.
The one change: the server gets free ports instead of 8000-8002 (``--http-port`` etc. on
the ``serve`` line, the same numbers swapped into the other commands), so a test never
collides with a server already running on this machine.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "deployment.md"
SECTION = "## Quick start: serve the demo with Triton"


def quick_start_blocks() -> list[tuple[str, str]]:
    """``(language, code)`` of every fenced block of the quick-start section, in order."""
    text = DOC.read_text(encoding="utf-8")
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start : end if end >= 0 else len(text)]
    return [(m.group(1), m.group(2)) for m in re.finditer(r"```(\w+)\n(.*?)```", section, re.DOTALL)]


def test_the_quick_start_section_has_the_commands_this_test_runs() -> None:
    blocks = quick_start_blocks()
    commands = [line for lang, code in blocks if lang == "bash" for line in code.splitlines() if line.strip()]
    assert [c.split()[:4] for c in commands[:3]] == [
        ["python", "-m", "export", "--checkpoint"],
        ["python", "-m", "mssan_infer", "index"],
        ["python", "-m", "mssan_infer", "serve"],
    ]
    assert sum("curl" in c for c in commands) == 3 and sum(lang == "python" for lang, _ in blocks) == 2


def _layout_demo(work: Path, checkpoint: Path) -> None:
    """What ``python -m quickstart`` leaves in ``demo/`` (a tiny model: D=32, Dv=24)."""
    from tests.conftest import WORDS

    shutil.copytree(checkpoint, work / "demo" / "checkpoint")
    data = work / "demo" / "data"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    np.save(data / "test_ims.npy", np.abs(rng.standard_normal((20, 12, 24))).astype(np.float32))
    caps = [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 9)))) for _ in range(100)]
    (data / "test_caps.txt").write_text("\n".join(caps) + "\n", encoding="utf-8")


class _Output:
    """Collects a process's output lines on a thread."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        assert proc.stdout is not None
        self._t = threading.Thread(target=self._read, args=(proc.stdout,), daemon=True)
        self._t.start()

    def _read(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.lines)


@pytest.mark.triton
def test_the_deployment_quick_start_works_as_written(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from mssan_infer import Retriever
    from mssan_infer.triton.server import free_port

    _layout_demo(tmp_path, tiny_checkpoint)
    ports = {"8000": str(free_port()), "8001": str(free_port()), "8002": str(free_port())}

    def localize(cmd: str) -> str:
        return re.sub(r"\b(800[012])\b", lambda m: ports[m.group(1)], cmd)

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    serve: subprocess.Popen[str] | None = None
    out: _Output | None = None
    outputs: list[str] = []
    try:
        for lang, code in quick_start_blocks():
            if lang == "python":
                res = subprocess.run(
                    [sys.executable, "-c", localize(code)],
                    cwd=tmp_path,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=300,
                )
                assert res.returncode == 0, f"python block failed:\n{code}\n{res.stderr[-3000:]}"
                outputs.append(res.stdout)
                continue
            for cmd in (line for line in code.splitlines() if line.strip()):
                if " mssan_infer serve " in f" {cmd} ":
                    cmd += (
                        f" --http-port {ports['8000']} --grpc-port {ports['8001']}"
                        f" --metrics-port {ports['8002']}"
                    )
                    serve = subprocess.Popen(
                        shlex.split(cmd),
                        cwd=tmp_path,
                        env=env,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT,
                        text=True,
                        start_new_session=True,
                    )
                    out = _Output(serve)
                    deadline = time.monotonic() + 240
                    while "Press Ctrl-C" not in out.text:
                        assert serve.poll() is None, f"serve exited:\n{out.text[-3000:]}"
                        assert time.monotonic() < deadline, f"serve not ready:\n{out.text[-3000:]}"
                        time.sleep(0.2)
                    assert (
                        f"http://127.0.0.1:{ports['8000']}" in out.text
                        and f"127.0.0.1:{ports['8001']}" in out.text
                    )
                    continue
                res = subprocess.run(
                    localize(cmd),
                    shell=True,
                    cwd=tmp_path,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=600,
                )
                assert res.returncode == 0, f"{cmd}\nfailed:\n{res.stderr[-3000:]}"
                outputs.append(res.stdout)
        # what the commands printed: readiness, a ranking equal to the in-process one, the encoder's vectors
        export_out, index_out, ready, retriever, encoder, client, plain = outputs
        assert "indexed 20 images and 100 captions into demo/served-index" in index_out
        assert ready.strip() == "200"
        reply = {o["name"]: o for o in json.loads(retriever)["outputs"]}
        with Retriever.load(tmp_path / "demo" / "served", index=tmp_path / "demo" / "served-index") as local:
            want = local.search(text="a red dog on the beach", k=5)
        assert reply["ids"]["data"] == [str(h.id) for h in want]
        np.testing.assert_allclose(reply["scores"]["data"], [h.score for h in want], atol=1e-5)
        stage1 = {o["name"]: o for o in json.loads(encoder)["outputs"]}["txt_stage1"]
        assert stage1["shape"] == [1, 64] and len(stage1["data"]) == 64
        assert [line.split()[0] for line in client.splitlines()[:5]] == [str(h.id) for h in want]
        assert "Hit(id=" in client.splitlines()[5]
        assert all(f"b'{h.id}'" in plain for h in want)
        # Ctrl-C stops the server cleanly
        assert serve is not None and out is not None
        os.killpg(serve.pid, signal.SIGINT)
        assert serve.wait(timeout=60) == 0, out.text[-3000:]
        assert out.text.rstrip().endswith("stopped")
        time.sleep(0.5)
        from mssan_infer.triton.server import _check_port

        _check_port("127.0.0.1", int(ports["8000"]), "http")  # the port is free again
    finally:
        if serve is not None and serve.poll() is None:
            os.killpg(serve.pid, signal.SIGTERM)
            serve.wait(timeout=60)
