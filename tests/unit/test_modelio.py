"""model.pt: weights-only round trip, prefixes, warm starts and the ImageNet weights path."""

import pytest
import torch

from modelio import (
    CheckpointError,
    build_model,
    cached_imagenet_path,
    load_checkpoint,
    load_imagenet_backbone,
    make_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
    strip_module_prefix,
    warm_start,
)

pytestmark = pytest.mark.unit


def _checkpoint(model, classes=("chicken", "turkey")):
    return make_checkpoint(
        arch="resnet18",
        state_dict=model.state_dict(),
        class_names=list(classes),
        image_size=64,
        metrics={"best_val_acc": 0.75},
        manifest_sha256="ab" * 32,
    )


def test_model_pt_round_trips_with_weights_only_and_carries_its_metadata(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet18", 2).eval()
    digest = save_checkpoint(_checkpoint(model), tmp_path / "model.pt")
    raw = torch.load(tmp_path / "model.pt", weights_only=True)  # no pickled code anywhere
    assert raw["arch"] == "resnet18"
    assert raw["class_names"] == ["chicken", "turkey"]
    assert raw["image_size"] == 64
    assert raw["normalization"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert raw["metrics"]["best_val_acc"] == 0.75
    assert raw["manifest_sha256"] == "ab" * 32
    assert len(digest) == 64
    restored = model_from_checkpoint(load_checkpoint(tmp_path / "model.pt")).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(restored(x), model(x))


def test_ddp_and_compile_prefixes_are_stripped():
    state = {"module.fc.weight": 1, "module._orig_mod.conv1.weight": 2, "layer1.0.bn1.bias": 3}
    assert strip_module_prefix(state) == {"fc.weight": 1, "conv1.weight": 2, "layer1.0.bn1.bias": 3}


def test_a_checkpoint_written_from_a_ddp_wrapper_has_no_module_prefix(tmp_path):
    model = build_model("resnet18", 2)
    wrapped_state = {f"module.{k}": v for k, v in model.state_dict().items()}
    ck = make_checkpoint(arch="resnet18", state_dict=wrapped_state, class_names=["a", "b"], image_size=32, metrics={}, manifest_sha256="")
    save_checkpoint(ck, tmp_path / "m.pt")
    assert not any(k.startswith("module.") for k in torch.load(tmp_path / "m.pt", weights_only=True)["state_dict"])


def test_a_pickled_module_is_refused_rather_than_executed(tmp_path):
    torch.save(build_model("resnet18", 2), tmp_path / "pickled.pt")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(tmp_path / "pickled.pt")


def test_missing_and_foreign_files_are_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="no state_dict"):
        load_checkpoint(tmp_path / "other.pt")


def test_warm_start_with_the_same_classes_loads_the_head_too():
    torch.manual_seed(0)
    champion = build_model("resnet18", 2)
    model = build_model("resnet18", 2)
    assert warm_start(model, _checkpoint(champion), ["chicken", "turkey"]) is True
    assert torch.equal(model.fc.weight, champion.fc.weight)


def test_warm_start_with_new_classes_keeps_only_the_backbone():
    torch.manual_seed(0)
    champion = build_model("resnet18", 2)
    model = build_model("resnet18", 3)
    assert warm_start(model, _checkpoint(champion), ["chicken", "duck", "turkey"]) is False
    assert torch.equal(model.conv1.weight, champion.conv1.weight)
    assert model.fc.weight.shape[0] == 3


def test_imagenet_auto_without_a_local_cache_starts_random(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert load_imagenet_backbone(build_model("resnet18", 2), "resnet18", "auto") == "random"


def test_imagenet_auto_loads_the_backbone_from_the_local_torchvision_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(1)
    imagenet_like = build_model("resnet18", 1000)  # stands in for the real file, same layout
    path = cached_imagenet_path("resnet18")
    assert path.parent == tmp_path / "hub" / "checkpoints"
    path.parent.mkdir(parents=True)
    torch.save(imagenet_like.state_dict(), path)
    model = build_model("resnet18", 2)
    assert load_imagenet_backbone(model, "resnet18", "auto") == "imagenet"
    assert torch.equal(model.layer4[1].conv2.weight, imagenet_like.layer4[1].conv2.weight)
    assert model.fc.out_features == 2


def test_unknown_architectures_are_refused():
    with pytest.raises(CheckpointError, match="unsupported architecture"):
        build_model("vgg11", 2)
