"""Text side (method.md section 2): templates, class embeddings, truncated encoding, caches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine_helpers import REF_DTYPE, build_clip, text_embeddings, tiny_config
from napari_maskclip.engine import (
    TextEmbeddingCache,
    TextEncoder,
    maskclip_templates,
    resolve_templates,
    wrap_model,
)
from napari_maskclip.errors import InvalidInputError

PROMPTS = [
    "cat",
    "a photo of a dog.",
    "an extremely long and winding description of a very particular striped orange cat "
    "sitting on a mat beside a window on a sunny afternoon in spring",  # longer than 24 tokens
    "x",
    "there is a traffic light in the scene.",
]


class TokenCount:
    """Counts the prompts the text tower embeds (hook on ``token_embedding``), engine-independent."""

    def __init__(self, model) -> None:
        self.calls = 0
        self.prompts = 0
        self.lengths: list[int] = []
        self._h = model.token_embedding.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.calls += 1
        self.prompts += args[0].shape[0]
        self.lengths.append(args[0].shape[1])

    def close(self):
        self._h.remove()


def _context77_model(seed: int = 3):
    cfg = tiny_config("tiny_vit")
    cfg["text_cfg"]["context_length"] = 77
    return wrap_model(build_clip(cfg, seed=seed), name="ctx77")


# ---- templates ----------------------------------------------------------------------------
def test_maskclip_has_85_templates_with_the_5_scene_templates():
    templates = maskclip_templates()
    assert len(templates) == 85
    assert len(set(templates)) == 85
    assert all(t.count("{}") == 1 for t in templates)
    scene = [
        "there is a {} in the scene.",
        "there is the {} in the scene.",
        "this is a {} in the scene.",
        "this is the {} in the scene.",
        "this is one {} in the scene.",
    ]
    assert set(scene) <= set(templates)
    # A few of CLIP's 80 ImageNet templates, by their exact text.
    for t in ("a bad photo of a {}.", "a photo of a {}.", "itap of my {}.", "a tattoo of the {}.",
              "a origami {}.", "the plushie {}."):
        assert t in templates


def test_template_sets_resolve():
    assert resolve_templates("maskclip85") == maskclip_templates()
    assert resolve_templates(None) == maskclip_templates()
    single = resolve_templates("single")
    assert len(single) == 1 and single[0].count("{}") == 1
    assert resolve_templates(["a micrograph of {}.", "{} cells"]) == ("a micrograph of {}.", "{} cells")
    assert resolve_templates("an image of {}.") == ("an image of {}.",)


@pytest.mark.parametrize("bad", ["nonsense-set", ["a photo of a cat."], ["{} and {}"], []])
def test_bad_templates_are_refused(bad):
    with pytest.raises(InvalidInputError):
        resolve_templates(bad)


# ---- truncated encoding -------------------------------------------------------------------
@pytest.mark.parametrize("which", ["fixture-ctx24", "ctx77"])
def test_truncated_encoding_equals_full_context_encoding(tiny_vit, which):
    loaded = tiny_vit if which == "fixture-ctx24" else _context77_model()
    encoder = TextEncoder(loaded, cache=None)
    with torch.no_grad():
        full = loaded.model.encode_text(loaded.tokenizer(PROMPTS)).to(REF_DTYPE)
    full = full / full.norm(dim=-1, keepdim=True)
    counter = TokenCount(loaded.model)
    try:
        truncated = encoder.encode_prompts(PROMPTS, truncate=True)
    finally:
        counter.close()
    torch.testing.assert_close(truncated.to(REF_DTYPE), full, atol=1e-5, rtol=0)
    untruncated = encoder.encode_prompts(PROMPTS, truncate=False)
    torch.testing.assert_close(untruncated.to(REF_DTYPE), full, atol=1e-5, rtol=0)
    # The promise behind truncation: short prompts are not run at the full context length.
    context = loaded.tokenizer(["a"]).shape[1]
    if which == "ctx77":
        assert counter.lengths and min(counter.lengths) < context


def test_short_prompts_only_run_a_fraction_of_the_context(tiny_vit):
    loaded = _context77_model()
    encoder = TextEncoder(loaded, cache=None)
    counter = TokenCount(loaded.model)
    try:
        encoder.encode_prompts(["cat", "a photo of a dog."], truncate=True)
    finally:
        counter.close()
    assert counter.prompts == 2
    assert max(counter.lengths) <= 10  # "a photo of a dog." is 8 tokens with start/end


def test_encode_prompts_is_unit_norm_float32(tiny_vit):
    out = TextEncoder(tiny_vit, cache=None).encode_prompts(["cat", "dog"])
    assert out.dtype == torch.float32 and out.shape == (2, tiny_vit.embed_dim)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2), atol=1e-6, rtol=0)


# ---- class embeddings ---------------------------------------------------------------------
@pytest.mark.parametrize("templates", [("a photo of a {}.",), ("a photo of a {}.", "{}", "art of the {}.")])
def test_class_embedding_is_normalised_mean_of_normalised_templates(tiny_vit, templates):
    names = ["cat", "traffic light", "dog"]
    out = TextEncoder(tiny_vit, cache=None).embed_texts(names, list(templates))
    ref = text_embeddings(tiny_vit.model, tiny_vit.tokenizer, names, list(templates))
    torch.testing.assert_close(out.to(REF_DTYPE), ref, atol=1e-5, rtol=0)


def test_embed_texts_keeps_order_and_duplicates(tiny_vit):
    enc = TextEncoder(tiny_vit, cache=None)
    t = ["a photo of a {}."]
    out = enc.embed_texts(["dog", "cat", "dog"], t)
    single = enc.embed_texts(["cat", "dog"], t)
    torch.testing.assert_close(out[0], single[1])
    torch.testing.assert_close(out[1], single[0])
    torch.testing.assert_close(out[2], single[1])


def test_different_templates_give_different_vectors(tiny_vit, tmp_path):
    cache = TextEmbeddingCache(tmp_path)
    enc = TextEncoder(tiny_vit, cache=cache)
    a = enc.embed_texts(["cat"], ["a photo of a {}."])
    b = enc.embed_texts(["cat"], ["a drawing of a {}."])
    assert (a - b).abs().max() > 1e-4
    ref_b = text_embeddings(tiny_vit.model, tiny_vit.tokenizer, ["cat"], ["a drawing of a {}."])
    torch.testing.assert_close(b.to(REF_DTYPE), ref_b, atol=1e-5, rtol=0)


# ---- caches -------------------------------------------------------------------------------
def test_memory_cache_skips_the_text_encoder(tiny_vit):
    enc = TextEncoder(tiny_vit, cache=TextEmbeddingCache(None))
    t = ["a photo of a {}.", "art of the {}."]
    counter = TokenCount(tiny_vit.model)
    try:
        first = enc.embed_texts(["cat", "dog"], t)
        after_first = counter.prompts
        again = enc.embed_texts(["dog", "cat"], t)
        assert counter.prompts == after_first
        enc.embed_texts(["cat", "bird"], t)  # only the new name is encoded
        assert counter.prompts == after_first + len(t)
    finally:
        counter.close()
    assert after_first == 2 * len(t)
    torch.testing.assert_close(again, first.flip(0))


def test_disk_cache_serves_a_fresh_encoder_without_running_the_text_tower(tiny_vit, tmp_path):
    t = ["a photo of a {}."]
    first = TextEncoder(tiny_vit, cache=TextEmbeddingCache(tmp_path)).embed_texts(["cat", "dog"], t)
    assert any(tmp_path.rglob("*")), "nothing was written to the cache directory"
    fresh = TextEncoder(tiny_vit, cache=TextEmbeddingCache(tmp_path))  # empty memory, same dir
    counter = TokenCount(tiny_vit.model)
    try:
        second = fresh.embed_texts(["cat", "dog"], t)
    finally:
        counter.close()
    assert counter.calls == 0 and fresh.forward_calls == 0
    torch.testing.assert_close(second, first, atol=0, rtol=0)


def test_cache_is_keyed_by_model_identity(tiny_vit, tmp_path):
    """Another model sharing the cache directory gets its own vectors, not the first model's."""
    t = ["a photo of a {}."]
    a = TextEncoder(tiny_vit, cache=TextEmbeddingCache(tmp_path)).embed_texts(["cat"], t)
    other = wrap_model(build_clip(tiny_config("tiny_vit"), seed=11), name="other")
    assert other.identity != tiny_vit.identity
    counter = TokenCount(other.model)
    try:
        b = TextEncoder(other, cache=TextEmbeddingCache(tmp_path)).embed_texts(["cat"], t)
    finally:
        counter.close()
    assert counter.calls >= 1
    assert (a - b).abs().max() > 1e-3
    ref = text_embeddings(other.model, other.tokenizer, ["cat"], t)
    torch.testing.assert_close(b.to(REF_DTYPE), ref, atol=1e-5, rtol=0)


def test_same_weights_loaded_twice_share_the_identity(tiny_vit_files):
    from napari_maskclip.engine import load_clip

    config, ckpt = tiny_vit_files
    a = load_clip(str(config), str(ckpt), device="cpu")
    b = load_clip(str(config), str(ckpt), device="cpu")
    assert a.identity == b.identity


def test_default_cache_lives_in_the_configured_cache_dir(tiny_vit, _isolated_cache):
    enc = TextEncoder(tiny_vit)  # cache="default"
    enc.embed_texts(["cat"], ["a photo of a {}."])
    files = [p for p in _isolated_cache.rglob("*") if p.is_file()]
    assert files, "the default text cache wrote nothing under NAPARI_MASKCLIP_CACHE_DIR"


def test_unwritable_cache_dir_degrades_to_memory(tiny_vit, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    enc = TextEncoder(tiny_vit, cache=TextEmbeddingCache(blocker / "sub"))
    out = enc.embed_texts(["cat"], ["a photo of a {}."])
    ref = text_embeddings(tiny_vit.model, tiny_vit.tokenizer, ["cat"], ["a photo of a {}."])
    torch.testing.assert_close(out.to(REF_DTYPE), ref, atol=1e-5, rtol=0)


def test_corrupt_disk_entry_is_recomputed(tiny_vit, tmp_path):
    t = ["a photo of a {}."]
    first = TextEncoder(tiny_vit, cache=TextEmbeddingCache(tmp_path)).embed_texts(["cat"], t)
    for path in tmp_path.rglob("*.npz"):
        path.write_bytes(b"garbage")
    second = TextEncoder(tiny_vit, cache=TextEmbeddingCache(tmp_path)).embed_texts(["cat"], t)
    torch.testing.assert_close(second, first, atol=1e-6, rtol=0)
    assert np.isfinite(second.numpy()).all()


def test_small_batches_keep_prompt_order(tiny_vit):
    """Prompts are batched by length internally; the output rows must still follow the input."""
    enc = TextEncoder(tiny_vit, cache=None, batch_size=2)
    out = enc.encode_prompts(PROMPTS, truncate=True)
    assert enc.forward_calls == 3
    with torch.no_grad():
        full = tiny_vit.model.encode_text(tiny_vit.tokenizer(PROMPTS)).to(REF_DTYPE)
    full = full / full.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(out.to(REF_DTYPE), full, atol=1e-5, rtol=0)


def test_segmenter_uses_the_85_templates_by_default(tiny_vit):
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    from napari_maskclip.engine import Segmenter

    templates = [t("{}") for t in OPENAI_IMAGENET_TEMPLATES] + [
        "there is a {} in the scene.", "there is the {} in the scene.", "this is a {} in the scene.",
        "this is the {} in the scene.", "this is one {} in the scene."]
    seg = Segmenter(tiny_vit, text_cache=None)
    assert seg.settings.templates == "maskclip85"
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    result = seg(image, "cat, dog", denoise=False)
    assert result.settings["n_templates"] == 85
    got = seg.text.embed_texts(["cat", "dog"], resolve_templates("maskclip85"))
    ref = text_embeddings(tiny_vit.model, tiny_vit.tokenizer, ["cat", "dog"], templates)
    torch.testing.assert_close(got.to(REF_DTYPE), ref, atol=1e-5, rtol=0)
