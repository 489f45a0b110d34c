"""The fixed model and batch shared by the DDP test and its torchrun worker."""

from __future__ import annotations

import torch

from training.config import ModelConfig
from training.model import MSSAN


def make_model() -> MSSAN:
    torch.manual_seed(0)
    return MSSAN(ModelConfig(vocab_size=30, word_dim=8, embed_size=16, img_dim=12))


def make_batch(n: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([3, 5, 2, 4, 6, 3, 2, 5])[:n]
    mask = (torch.arange(6).unsqueeze(0) < lengths.unsqueeze(1)).float()
    tokens = torch.randint(4, 30, (n, 6), generator=g) * mask.long()
    img_ids = torch.tensor([0, 0, 1, 2, 3, 4, 4, 5])[:n]  # repeated images: masked as negatives
    regions = torch.randn(n, 4, 12, generator=g)
    regions[1] = regions[0]
    regions[6] = regions[5]
    return {
        "regions": regions,
        "region_mask": torch.ones(n, 4),
        "tokens": tokens,
        "token_mask": mask,
        "img_ids": img_ids,
    }
