"""training.backbone: torchvision-layout ResNets, their feature grid, strict weight loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mssan_infer.errors import InputError
from training.backbone import (
    BACKBONES,
    BackboneSpec,
    ResNetBackbone,
    build_backbone,
    grid_side,
    load_backbone_weights,
)

TORCHVISION_PARAMS = {"resnet50": 25_557_032, "resnet101": 44_549_160, "resnet152": 60_192_808}
TORCHVISION_KEYS = {"resnet50": 320, "resnet101": 626, "resnet152": 932}  # len(state_dict()) incl. BN buffers


def _meta(name: str) -> ResNetBackbone:
    with torch.device("meta"):  # shapes only: no 240 MB allocation for resnet152
        return ResNetBackbone(BACKBONES[name])


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMS))
def test_real_resnets_have_torchvision_parameter_counts_and_key_counts(name: str) -> None:
    net = _meta(name)
    assert sum(p.numel() for p in net.parameters()) == TORCHVISION_PARAMS[name]
    assert len(net.state_dict()) == TORCHVISION_KEYS[name]
    assert net.out_dim == 2048


def test_resnet50_keys_and_shapes_follow_torchvision_v1_5() -> None:
    sd = {k: tuple(v.shape) for k, v in _meta("resnet50").state_dict().items()}
    assert sd["conv1.weight"] == (64, 3, 7, 7)
    assert sd["bn1.running_var"] == (64,) and "bn1.num_batches_tracked" in sd
    assert sd["layer1.0.downsample.0.weight"] == (256, 64, 1, 1)  # projection even at stride 1
    assert sd["layer1.0.downsample.1.running_mean"] == (256,)
    assert sd["layer2.0.conv1.weight"] == (128, 256, 1, 1)  # stride on the 3x3 (v1.5) ...
    assert sd["layer2.0.conv2.weight"] == (128, 128, 3, 3)
    assert sd["layer4.0.downsample.0.weight"] == (2048, 1024, 1, 1)
    assert sd["layer4.2.conv3.weight"] == (2048, 512, 1, 1)
    assert sd["fc.weight"] == (1000, 2048) and sd["fc.bias"] == (1000,)
    assert not any(k.startswith("layer1.1.downsample") for k in sd)
    assert {k.split(".")[0] for k in sd} == {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"}
    net = _meta("resnet50")
    assert net.layer2[0].conv2.stride == (2, 2) and net.layer2[0].conv1.stride == (1, 1)


@pytest.mark.parametrize("size, side", [(224, 7), (448, 14), (64, 2), (100, 4), (32, 1)])
def test_grid_side_is_the_stride_32_grid(size: int, side: int) -> None:
    assert grid_side(size) == side


def test_forward_returns_row_major_grid_regions() -> None:
    torch.manual_seed(0)
    net = ResNetBackbone(BACKBONES["resnet-tiny"]).eval()
    x = torch.randn(2, 3, 96, 64)
    with torch.inference_mode():
        regions, fmap = net(x), net.feature_map(x)
    assert fmap.shape == (2, 256, 3, 2) and regions.shape == (2, 6, 256)
    assert torch.equal(regions[:, 1], fmap[:, :, 0, 1])  # cell (row 0, col 1) is region 1
    assert torch.equal(regions[:, 2], fmap[:, :, 1, 0])


def _tiny(seed: int = 0) -> ResNetBackbone:
    torch.manual_seed(seed)
    net = ResNetBackbone(BACKBONES["resnet-tiny"])
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "wrapped", "ddp"])
def test_weights_load_from_local_files_and_reproduce_outputs(tmp_path: Path, fmt: str) -> None:
    src = _tiny(1)
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    path = tmp_path / ("w.safetensors" if fmt == "safetensors" else "w.pth")
    if fmt == "safetensors":
        save_file(sd, str(path))
    elif fmt == "wrapped":
        torch.save({"state_dict": sd, "epoch": 3}, path)
    elif fmt == "ddp":
        torch.save({f"module.{k}": v for k, v in sd.items()}, path)
    else:
        torch.save(sd, path)
    net = build_backbone("resnet-tiny", path)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(net(x), src(x))


def test_headless_weights_without_fc_are_accepted(tmp_path: Path) -> None:
    src = _tiny(2)
    torch.save({k: v for k, v in src.state_dict().items() if not k.startswith("fc.")}, tmp_path / "w.pth")
    net = build_backbone("resnet-tiny", tmp_path / "w.pth")
    assert torch.equal(net.layer4[0].conv3.weight, src.layer4[0].conv3.weight)


def test_missing_key_is_a_clear_error(tmp_path: Path) -> None:
    sd = _tiny().state_dict()
    del sd["layer3.0.bn2.weight"]
    torch.save(sd, tmp_path / "w.pth")
    with pytest.raises(InputError, match=r"missing.*layer3\.0\.bn2\.weight"):
        build_backbone("resnet-tiny", tmp_path / "w.pth")


def test_weights_of_another_depth_or_width_are_refused(tmp_path: Path) -> None:
    torch.save(_tiny().state_dict(), tmp_path / "w.pth")
    deeper = ResNetBackbone(BackboneSpec("deeper", (2, 1, 1, 1), width=8))
    with pytest.raises(InputError, match=r"missing.*layer1\.1\."):
        load_backbone_weights(deeper, tmp_path / "w.pth")
    wider = ResNetBackbone(BackboneSpec("wider", (1, 1, 1, 1), width=16))
    with pytest.raises(InputError, match="another shape.*conv1.weight"):
        load_backbone_weights(wider, tmp_path / "w.pth")
    sd = _tiny().state_dict()
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "x.pth")
    with pytest.raises(InputError, match=r"unexpected.*extra\.weight"):
        build_backbone("resnet-tiny", tmp_path / "x.pth")


class _NotATensor:
    pass


def test_pickled_objects_are_not_executed_and_bad_files_are_clear_errors(tmp_path: Path) -> None:
    torch.save({"conv1.weight": _NotATensor()}, tmp_path / "evil.pth")
    with pytest.raises(InputError, match="cannot read backbone weights"):
        build_backbone("resnet-tiny", tmp_path / "evil.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(InputError, match="cannot read backbone weights"):
        build_backbone("resnet-tiny", tmp_path / "junk.pth")
    with pytest.raises(InputError, match="not found"):
        build_backbone("resnet-tiny", tmp_path / "absent.pth")
    with pytest.raises(InputError, match="unknown backbone"):
        build_backbone("resnet18")
