"""Two gloo processes under torchrun take the same step as one process with the doubled batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.ddp_common import make_batch, make_model
from training.loss import AdaptiveMarginLoss
from training.train import EncodeBoth, train_step

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_process_ddp_step_equals_single_process_on_doubled_batch(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--nnodes",
        "1",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        str(ROOT / "tests" / "ddp_worker.py"),
        str(tmp_path),
    ]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]

    model = make_model()
    loss_fn = AdaptiveMarginLoss(m0=0.2, rho=0.1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss, _ = train_step(EncodeBoth(model), model, loss_fn, opt, make_batch(), "hardest", grad_clip=50.0)

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert abs(r["loss"] - loss) < 1e-5
        assert torch.allclose(torch.tensor(r["margins"]), loss_fn.margin, atol=1e-6)
    ddp = load_file(str(tmp_path / "params.safetensors"))
    moved = 0.0
    for name, p in model.state_dict().items():
        assert torch.allclose(ddp[name], p, atol=1e-5), name
        moved = max(moved, float((p - make_model().state_dict()[name]).abs().max()))
    assert moved > 1e-3  # the step really changed the weights
    grads = load_file(str(tmp_path / "grads.safetensors"))
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.allclose(grads[name], p.grad, atol=1e-6, rtol=1e-4), name
