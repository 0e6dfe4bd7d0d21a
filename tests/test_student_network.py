"""The student network: frozen text classifier, any input size, backbone weights offline."""

from __future__ import annotations

import pytest
import torch

from napari_maskclip.errors import WeightsUnavailableError
from napari_maskclip.progress import run_to_completion
from napari_maskclip.student.network import (
    backbone_weights_iter,
    build_student,
    imagenet_weights_file,
    load_backbone_state,
)

from test_student_train import random_embeddings


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty torch hub cache and no download attempts."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("NAPARI_MASKCLIP_OFFLINE", "1")
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_tiny_student_sees_only_a_local_neighbourhood():
    """``tiny`` has no image pooling: a pixel's prediction depends on its 27 px neighbourhood
    only, so the student cannot learn the teacher's context leaks (see network's docstring)."""
    net = build_student("tiny", random_embeddings(4, 16)).eval()
    image = torch.rand(1, 3, 96, 96)
    changed = image.clone()
    changed[..., 60:, 60:] = torch.rand(1, 3, 36, 36)  # far from the top-left corner
    with torch.no_grad():
        a, b = net(image), net(changed)
    assert torch.allclose(a[..., :24, :24], b[..., :24, :24], rtol=0, atol=1e-6)
    assert not torch.allclose(a[..., 60:, 60:], b[..., 60:, 60:])


def test_classifier_is_the_frozen_text_embeddings():
    emb = random_embeddings(5, 24)
    net = build_student("tiny", emb).train()
    assert all(p is not net.class_embeddings for p in net.parameters())
    logits = net(torch.rand(2, 3, 37, 53))
    assert logits.shape == (2, 5, 37, 53)
    # The logits are the dot products of the features with the embeddings.
    feat = net.features(torch.rand(2, 3, 37, 53))
    assert feat.shape[1] == 24
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    loss = net(torch.rand(2, 3, 32, 32)).logsumexp(1).mean()
    loss.backward()
    opt.step()
    assert torch.equal(net.class_embeddings, emb)


def test_cosine_classifier_option_bounds_the_logits():
    emb = random_embeddings(3, 16)
    net = build_student("tiny", emb, normalize_features=True, feature_scale=5.0).eval()
    with torch.no_grad():
        logits = net(torch.rand(1, 3, 40, 40))
    assert float(logits.abs().max()) <= 5.0 + 1e-4


def test_same_seed_same_initial_weights():
    a = build_student("tiny", random_embeddings(3), seed=4).state_dict()
    b = build_student("tiny", random_embeddings(3), seed=4).state_dict()
    c = build_student("tiny", random_embeddings(3), seed=5).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_offline_without_cached_weights_falls_back_to_random(offline_hub):
    state, note = run_to_completion(backbone_weights_iter("mobilenet_v3_large", "auto"))
    assert state is None
    assert note.startswith("random") and "unreachable" in note
    with pytest.raises(WeightsUnavailableError, match="not in"):
        run_to_completion(backbone_weights_iter("mobilenet_v3_large", "imagenet"))
    state, note = run_to_completion(backbone_weights_iter("tiny", "auto"))
    assert state is None and "no ImageNet weights" in note


def test_cached_imagenet_weights_are_loaded(offline_hub):
    from torchvision.models import mobilenet_v3_large

    torch.manual_seed(0)
    imagenet = mobilenet_v3_large().state_dict()
    path = imagenet_weights_file("mobilenet_v3_large")
    assert path.parent == offline_hub
    path.parent.mkdir(parents=True)
    torch.save(imagenet, path)
    state, note = run_to_completion(backbone_weights_iter("mobilenet_v3_large", "auto"))
    assert "ImageNet" in note
    net = build_student("mobilenet_v3_large", random_embeddings(3))
    load_backbone_state(net, state, note)
    loaded = net.backbone.state_dict()
    assert torch.equal(loaded["0.0.weight"], imagenet["features.0.0.weight"])
    assert torch.equal(loaded["16.0.weight"], imagenet["features.16.0.weight"])
