"""ResNet backbones (torch only) whose grid of last-stage features serves as image regions.

The module and parameter names are torchvision's (``conv1``, ``bn1``,
``layer1.0.conv1`` ... ``layer4.2.downsample.0/1``, ``fc``), so ImageNet weights
saved from torchvision load with a strict key check from a local file; nothing is
downloaded. ``resnet50/101/152`` are torchvision's v1.5 layouts (stride on the 3x3
convolution); ``resnet-tiny`` (one block per stage, 8 stem channels) exists for
tests. The output is the last stage's feature map flattened to regions in row-major
order: ``[B, H'*W', C]`` with ``H' = ceil(H/32)`` (7x7 at 224, 14x14 at 448).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn

from mssan_infer.errors import InputError

__all__ = [
    "BackboneSpec",
    "BACKBONES",
    "ResNetBackbone",
    "Bottleneck",
    "build_backbone",
    "load_backbone_weights",
    "read_state_dict",
    "grid_side",
]

log = logging.getLogger(__name__)

EXPANSION = 4
STRIDE = 32


@dataclass(frozen=True)
class BackboneSpec:
    """A bottleneck ResNet: blocks per stage and the stem width (64 in torchvision)."""

    name: str
    layers: tuple[int, int, int, int]
    width: int = 64

    @property
    def out_dim(self) -> int:
        """Channels of the last stage: the region feature size (2048 for the real ResNets)."""
        return self.width * 8 * EXPANSION


BACKBONES: dict[str, BackboneSpec] = {
    s.name: s
    for s in (
        BackboneSpec("resnet50", (3, 4, 6, 3)),
        BackboneSpec("resnet101", (3, 4, 23, 3)),
        BackboneSpec("resnet152", (3, 8, 36, 3)),
        BackboneSpec("resnet-tiny", (1, 1, 1, 1), width=8),  # tests: out_dim 256
    )
}


def grid_side(size: int) -> int:
    """Side of the feature grid for an input side ``size`` (stem, max-pool and three stride-2 stages)."""
    for _ in range(5):
        size = (size - 1) // 2 + 1
    return size


class Bottleneck(nn.Module):
    """torchvision's ``Bottleneck`` (v1.5): 1x1 -> 3x3 (stride) -> 1x1 (x4), identity or projected
    shortcut."""

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * EXPANSION, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * EXPANSION)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNetBackbone(nn.Module):
    """A bottleneck ResNet that returns its last feature map as regions.

    ``fc`` (and the average pool) are kept only so a torchvision state dict loads
    strictly and parameter counts match (resnet50: 25,557,032); ``forward`` never uses them.
    """

    def __init__(self, spec: BackboneSpec, num_classes: int = 1000) -> None:
        super().__init__()
        self.spec = spec
        w = spec.width
        self.inplanes = w
        self.conv1 = nn.Conv2d(3, w, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(w, spec.layers[0], 1)
        self.layer2 = self._make_layer(2 * w, spec.layers[1], 2)
        self.layer3 = self._make_layer(4 * w, spec.layers[2], 2)
        self.layer4 = self._make_layer(8 * w, spec.layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(spec.out_dim, num_classes)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * EXPANSION:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * EXPANSION, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * EXPANSION),
            )
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * EXPANSION
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    @property
    def out_dim(self) -> int:
        return self.spec.out_dim

    def feature_map(self, pixels: Tensor) -> Tensor:
        """``pixels [B,3,H,W]`` (normalised) -> last-stage map ``[B,C,H',W']``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(pixels))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, pixels: Tensor) -> Tensor:
        """``pixels [B,3,H,W]`` -> region features ``[B,H'*W',C]`` (grid cells in row-major order)."""
        return self.feature_map(pixels).flatten(2).transpose(1, 2)


def build_backbone(name: str, weights: str | os.PathLike[str] | None = None) -> ResNetBackbone:
    """A backbone by name (``BACKBONES``), in eval mode, with weights from a local file or random init.

    Raises:
        InputError: unknown name, or a weights file that is missing, unreadable or does not fit.
    """
    if name not in BACKBONES:
        raise InputError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    net = ResNetBackbone(BACKBONES[name])
    if weights is not None:
        load_backbone_weights(net, weights)
    else:
        log.warning(
            "backbone %s: random initialisation (no --backbone-weights); its features carry no "
            "ImageNet knowledge",
            name,
        )
    return net.eval()


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Tensors of a ``.safetensors`` file or of a torch file read with ``weights_only=True`` (no pickle code).

    A torch file may hold the state dict itself or wrap it under ``"state_dict"`` / ``"model"``;
    a ``"module."`` prefix (DataParallel) is removed.

    Raises:
        InputError: missing or unreadable file, or no mapping of names to tensors in it.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(
            f"backbone weights {p} not found; pass a local .pth/.pt/.safetensors file "
            "(e.g. torchvision's resnet152-*.pth copied to this machine)"
        )
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: object = load_file(str(p))
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch/safetensors raise many types
        raise InputError(f"cannot read backbone weights {p}: {e}") from e
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise InputError(f"backbone weights {p} do not hold a state dict (a mapping of names to tensors)")
    state = {str(k): v for k, v in obj.items()}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def load_backbone_weights(net: ResNetBackbone, path: str | os.PathLike[str]) -> ResNetBackbone:
    """Load a torchvision-layout state dict into ``net`` with a strict key and shape check.

    Only ``fc.weight``/``fc.bias`` may be absent (a headless backbone): ``forward`` does not use them.

    Raises:
        InputError: missing or unexpected keys, or shapes that differ (named in the message).
    """
    state = read_state_dict(path)
    own = net.state_dict()
    missing = [k for k in own if k not in state and not k.startswith("fc.")]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if shapes:
            parts.append(f"{len(shapes)} of another shape (e.g. {shapes[:2]})")
        raise InputError(
            f"backbone weights {path} do not fit {net.spec.name}: "
            + "; ".join(parts)
            + ". Expected torchvision's key layout for this depth (conv1, bn1, layer1.0.conv1, ..., fc); "
            "check --backbone against the file"
        )
    for k, v in own.items():
        if k in state:
            v.copy_(state[k].to(v.dtype))
    log.info("backbone %s: loaded %d tensors from %s", net.spec.name, len(state), path)
    return net
