"""The shared read-out (engine/readout.py) on hand-made features: the prompt layout, prompt
denoising decided per crop in a batch, and a batch read exactly as its crops read alone."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from napari_maskclip.classes import parse_classes
from napari_maskclip.engine.readout import DENOISE_SCALE, PromptLayout, Readout
from napari_maskclip.engine.settings import SegmentSettings


def test_prompt_layout_groups_synonyms_and_gives_background_label_zero():
    layout = PromptLayout.from_classes(parse_classes("cat, dog; puppy"), parse_classes("floor; ground"))
    assert layout.prompts == ("cat", "dog", "puppy", "floor", "ground")
    assert layout.groups == ((0,), (1, 2), (3, 4))
    assert layout.values == (1, 2, 0)
    assert layout.names == ("cat", "dog", "floor") and layout.fg_count == 2


def _one_hot_features(grid: list[list[int]], dim: int = 3) -> torch.Tensor:
    """D x h x w unit features, each cell the basis vector of its entry."""
    idx = torch.tensor(grid)
    return F.one_hot(idx, dim).permute(2, 0, 1).float()


def test_denoising_is_decided_per_crop_and_a_batch_reads_like_its_crops():
    """Crop 0 shows only class a: PD removes b and c there, so its weak second choices never win;
    crop 1 shows b and c. Read together, each crop is read as if alone, bit for bit."""
    layout = PromptLayout.from_classes(parse_classes("a, b, c"))
    text = torch.eye(3)
    crop0 = _one_hot_features([[0, 0], [0, 0]])
    crop0[:, 1, 1] = F.normalize(torch.tensor([1.0, 0.98, 0.0]), dim=0)  # nearly a tie with b
    crop1 = _one_hot_features([[1, 1], [2, 2]])
    features = torch.stack([crop0, crop1])
    readout = Readout(layout, text, SegmentSettings(denoise=True, denoise_threshold=0.5, logit_scale=1.0))
    class_max = readout.class_max(readout.logits(features))
    assert class_max.shape == (2, 3)
    assert [readout.select(m).classes for m in class_max] == [(0,), (1, 2)]
    labels, confidence = readout(features, patch=1, size=(2, 2))
    assert labels[0].tolist() == [[1, 1], [1, 1]]  # only a survives in crop 0
    assert labels[1].tolist() == [[2, 2], [3, 3]]
    assert torch.equal(confidence[0], torch.ones(2, 2))  # one class left: probability 1
    for i in range(2):
        alone_labels, alone_conf = readout(features[i:i + 1], patch=1, size=(2, 2))
        assert torch.equal(alone_labels[0], labels[i]) and torch.equal(alone_conf[0], confidence[i])
    # Without denoising, the low temperature (scale 1) leaves crop 0's cells undecided-looking
    # but a still wins; b appears nowhere.
    plain = Readout(layout, text, SegmentSettings(denoise=False, logit_scale=1.0))
    labels_plain, conf_plain = plain(features, patch=1, size=(2, 2))
    assert labels_plain[0].tolist() == [[1, 1], [1, 1]]
    assert float(conf_plain[0].max()) < 0.6


def test_denoising_uses_clip_scale_whatever_the_temperature():
    """PD's threshold is calibrated at softmax(100 x cosine): the user's temperature does not move
    which classes survive."""
    layout = PromptLayout.from_classes(parse_classes("a, b"))
    features = F.normalize(torch.tensor([1.0, 0.9]), dim=0).reshape(1, 2, 1, 1)
    text = torch.eye(2)
    kept = []
    for scale in (1.0, 100.0):
        readout = Readout(layout, text, SegmentSettings(denoise=True, logit_scale=scale))
        kept.append(readout.select(readout.class_max(readout.logits(features))[0]).classes)
    cos = features.flatten()
    p_b = torch.softmax(cos * DENOISE_SCALE, 0)[1]
    assert float(p_b) < 0.5  # so b is removed at CLIP's scale...
    assert kept == [(0,), (0,)]  # ...at either temperature
