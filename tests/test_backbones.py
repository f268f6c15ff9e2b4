"""Every benchmark backbone builds from timm's registry and runs a forward."""
import pytest
import torch

from manidp.errors import UserError
from manidp.models import BENCHMARK_BACKBONES, build_backbone


@pytest.mark.parametrize("name", BENCHMARK_BACKBONES)
def test_backbone_builds_and_runs(name):
    size = 32 if name.startswith("cifar") else 64
    model = build_backbone(name, num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, size, size)).shape == (2, 7)


def test_cifar_resnet_uses_parameter_free_shortcuts():
    model = build_backbone("cifar_resnet20", 10)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(0.27e6, rel=0.02)
    assert not any("downsample" in n for n, _ in model.named_parameters())


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(UserError, match="resnet18"):
        build_backbone("resnet_nope", 10)


def test_local_checkpoint_loads_and_new_head_is_fresh(tmp_path):
    src = build_backbone("cifar_resnet20", 10)
    torch.save({"model": src.state_dict()}, tmp_path / "w.pt")
    same = build_backbone("cifar_resnet20", 10, pretrained=str(tmp_path / "w.pt"))
    assert torch.equal(same.conv1.weight, src.conv1.weight)
    other_head = build_backbone("cifar_resnet20", 4, pretrained=str(tmp_path / "w.pt"))
    assert other_head.fc.out_features == 4 and torch.equal(other_head.conv1.weight, src.conv1.weight)


def test_corrupt_checkpoint_says_so(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="corrupt"):
        build_backbone("cifar_resnet20", 10, pretrained=str(bad))


def test_hub_unreachable_suggests_local_file(monkeypatch):
    import timm

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(UserError, match="local file"):
        build_backbone("resnet18", 10, pretrained="hub")
