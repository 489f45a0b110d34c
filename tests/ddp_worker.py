"""Run by tests/test_distributed.py under torchrun: one DDP step on this rank's half of a fixed batch."""

from __future__ import annotations

import json
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.ddp_common import make_batch, make_model  # noqa: E402
from training.distributed import cleanup, init_distributed  # noqa: E402
from training.loss import AdaptiveMarginLoss  # noqa: E402
from training.train import EncodeBoth, train_step  # noqa: E402


def main(out: str) -> None:
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    model = make_model()
    batch = make_batch()
    half = batch["regions"].shape[0] // info.world
    part = {k: v[info.rank * half : (info.rank + 1) * half] for k, v in batch.items()}
    # each rank pads its captions to its own longest one, as a real loader does
    length = int(part["token_mask"].sum(1).max())
    part["tokens"], part["token_mask"] = part["tokens"][:, :length], part["token_mask"][:, :length]
    enc = torch.nn.parallel.DistributedDataParallel(EncodeBoth(model))
    loss_fn = AdaptiveMarginLoss(m0=0.2, rho=0.1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss, stats = train_step(enc, model, loss_fn, opt, part, "hardest", info, grad_clip=50.0)
    if info.rank == 0:
        save_file(
            {k: v.detach().contiguous() for k, v in model.state_dict().items()}, f"{out}/params.safetensors"
        )
        save_file(
            {k: p.grad.contiguous() for k, p in model.named_parameters() if p.grad is not None},
            f"{out}/grads.safetensors",
        )
    with open(f"{out}/rank{info.rank}.json", "w") as f:
        json.dump({"loss": loss, "margins": loss_fn.margin.tolist(), "stats": stats}, f)
    cleanup()


if __name__ == "__main__":
    main(sys.argv[1])
