"""Text embeddings of class names, computed fast and cached.

Per class, every template is encoded, each embedding L2-normalised, the mean taken and normalised
again (as in MaskCLIP). Two things make this cheap:

* Truncation. CLIP's text encoder is causal, so the pooled end-of-text token depends only on the
  tokens before it. Cutting the padded columns after the longest prompt of a batch (prompts are
  batched by length) gives identical embeddings for several times less compute.
* A cache, in memory and on disk, keyed by model identity, template set, precision and the exact
  class text, so a class name is encoded once per model and precision, ever (embeddings of two
  precisions never mix). Disk entries are written atomically.

The text encoder runs in the run's precision (see :mod:`.precision`); the averaging and
normalisation after it are fp32.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..atomic import atomic_write
from .cache_dir import user_cache_dir
from .loading import LoadedModel
from .precision import model_in, run_precision
from .templates import templates_key

__all__ = ["TextEncoder", "TextEmbeddingCache", "DEFAULT_CACHE"]

log = logging.getLogger(__name__)


class TextEmbeddingCache:
    """Class embeddings in memory and (optionally) on disk.

    ``directory=None`` keeps the cache in memory only. An unwritable directory degrades to memory
    only with one warning, since a cache must never be the reason a run fails.
    """

    def __init__(self, directory: Optional[Path | str] = "default") -> None:
        if directory == "default":
            directory = user_cache_dir() / "text-embeddings"
        self.directory = Path(directory) if directory is not None else None
        self._memory: dict[tuple[str, str, str, str], np.ndarray] = {}
        self._warned = False

    def _path(self, model_id: str, tkey: str, text: str, precision: str) -> Path:
        assert self.directory is not None
        name_key = hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]
        suffix = "" if precision == "fp32" else f"-{precision}"  # fp32 keeps its older names
        return self.directory / model_id[:32] / tkey / f"{name_key}{suffix}.npz"

    def get(self, model_id: str, tkey: str, text: str, precision: str = "fp32") -> Optional[np.ndarray]:
        key = (model_id, tkey, text, precision)
        if key in self._memory:
            return self._memory[key]
        if self.directory is None:
            return None
        path = self._path(model_id, tkey, text, precision)
        try:
            with np.load(path, allow_pickle=False) as data:
                if str(data["text"]) != text or str(data["model"]) != model_id:
                    return None
                stored = str(data["precision"]) if "precision" in data.files else "fp32"
                if stored != precision:
                    return None
                vector = np.asarray(data["embedding"], dtype=np.float32)
        except (OSError, KeyError, ValueError):
            return None
        self._memory[key] = vector
        return vector

    def put(self, model_id: str, tkey: str, text: str, vector: np.ndarray,
            precision: str = "fp32") -> None:
        vector = np.asarray(vector, dtype=np.float32)
        self._memory[(model_id, tkey, text, precision)] = vector
        if self.directory is None:
            return
        path = self._path(model_id, tkey, text, precision)
        try:
            with atomic_write(path) as tmp:
                with open(tmp, "wb") as handle:
                    np.savez(handle, embedding=vector, text=np.str_(text), model=np.str_(model_id),
                             precision=np.str_(precision))
        except OSError as exc:
            if not self._warned:
                log.warning("Text-embedding cache %s is not writable (%s); using memory only.",
                            self.directory, exc)
                self._warned = True

    def clear_memory(self) -> None:
        self._memory.clear()


#: The process-wide cache in the user cache directory.
DEFAULT_CACHE: Optional[TextEmbeddingCache] = None


def _default_cache() -> TextEmbeddingCache:
    global DEFAULT_CACHE
    if DEFAULT_CACHE is None or DEFAULT_CACHE.directory != user_cache_dir() / "text-embeddings":
        DEFAULT_CACHE = TextEmbeddingCache("default")
    return DEFAULT_CACHE


@dataclass
class _TextTower:
    """The pieces of an open_clip text tower, whichever model class holds them."""

    token_embedding: nn.Embedding
    positional_embedding: torch.Tensor
    transformer: nn.Module
    ln_final: nn.Module
    text_projection: object
    attn_mask: Optional[torch.Tensor]
    pool_type: str
    eos_id: Optional[int]
    truncatable: bool


def _text_tower(model: nn.Module) -> Optional[_TextTower]:
    from open_clip.transformer import TextTransformer

    text = getattr(model, "text", None)
    if isinstance(text, TextTransformer):
        truncatable = (
            text.attn_mask is not None
            and text.cls_emb is None
            and not text.use_pad_mask
            and text.pool_type in ("argmax", "eos")
        )
        return _TextTower(
            text.token_embedding, text.positional_embedding, text.transformer, text.ln_final,
            text.text_projection, text.attn_mask, text.pool_type, getattr(text, "eos_id", None),
            truncatable,
        )
    if hasattr(model, "token_embedding") and hasattr(model, "transformer"):
        pool_type = getattr(model, "text_pool_type", "argmax")
        attn_mask = getattr(model, "attn_mask", None)
        return _TextTower(
            model.token_embedding, model.positional_embedding, model.transformer, model.ln_final,
            model.text_projection, attn_mask, pool_type, getattr(model, "text_eos_id", None),
            attn_mask is not None and pool_type in ("argmax", "eos"),
        )
    return None


class TextEncoder:
    """Encodes prompts and class names with a loaded model's text tower."""

    def __init__(
        self,
        loaded: LoadedModel,
        cache: Optional[TextEmbeddingCache] | str = "default",
        *,
        batch_size: int = 256,
    ) -> None:
        self.loaded = loaded
        self.cache = _default_cache() if cache == "default" else cache
        self.batch_size = batch_size
        self._tower = _text_tower(loaded.model)
        self._towers: dict[str, Optional[_TextTower]] = {}
        #: Number of text-encoder forward passes run (for the status line and tests).
        self.forward_calls = 0

    # ---- prompts -------------------------------------------------------------------------
    def _pool_index(self, tokens: torch.Tensor) -> torch.Tensor:
        tower = self._tower
        assert tower is not None
        if tower.pool_type == "eos" and tower.eos_id is not None:
            return (tokens == tower.eos_id).int().argmax(dim=-1)
        return tokens.argmax(dim=-1)

    def precision(self, requested: Optional[str] = None) -> str:
        """The precision a request runs in (``None``/``auto``: the model's default)."""
        return run_precision(requested, device=self.loaded.device, weights=self.loaded.dtype,
                             default=self.loaded.precision)

    def _tower_in(self, precision: str) -> Optional[_TextTower]:
        if precision not in self._towers:
            model = model_in(self.loaded, precision)
            self._towers[precision] = self._tower if model is self.loaded.model else _text_tower(model)
        return self._towers[precision]

    @torch.no_grad()
    def _forward_truncated(self, tokens: torch.Tensor, tower: Optional[_TextTower] = None) -> torch.Tensor:
        tower = tower or self._tower
        assert tower is not None
        index = self._pool_index(tokens)
        length = int(index.max().item()) + 1
        tokens = tokens[:, :length]
        cast = tower.positional_embedding.dtype
        x = tower.token_embedding(tokens).to(cast)
        x = x + tower.positional_embedding[:length].to(cast)
        mask = tower.attn_mask[:length, :length] if tower.attn_mask is not None else None
        x = tower.transformer(x, attn_mask=mask)
        x = tower.ln_final(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), index]
        proj = tower.text_projection
        if proj is not None:
            pooled = proj(pooled) if isinstance(proj, nn.Module) else pooled @ proj
        return pooled

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], *, truncate: bool = True,
                       precision: Optional[str] = None) -> torch.Tensor:
        """L2-normalised embeddings (float32, N x D, on the model's device) of raw prompts,
        encoded in ``precision`` (default: the model's)."""
        if not prompts:
            return torch.zeros(0, self.loaded.embed_dim, device=self.loaded.device)
        tokens = self.loaded.tokenizer(list(prompts)).to(self.loaded.device)
        use_truncation = truncate and self._tower is not None and self._tower.truncatable
        if use_truncation:
            # Batch prompts of similar length together: less padding left after the cut.
            order = torch.argsort(self._pool_index(tokens).cpu(), stable=True)
        else:
            order = torch.arange(len(prompts))
        out = torch.empty(len(prompts), self.loaded.embed_dim, dtype=torch.float32,
                          device=self.loaded.device)
        name = self.precision(precision)
        model, tower = model_in(self.loaded, name), self._tower_in(name)
        for start in range(0, len(prompts), self.batch_size):
            idx = order[start:start + self.batch_size].to(self.loaded.device)
            batch = tokens[idx]
            if use_truncation:
                emb = self._forward_truncated(batch, tower)
            else:
                emb = model.encode_text(batch)
            self.forward_calls += 1
            out[idx] = torch.nn.functional.normalize(emb.float(), dim=-1)
        return out

    # ---- classes -------------------------------------------------------------------------
    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str], templates: Sequence[str], *,
                    precision: Optional[str] = None) -> torch.Tensor:
        """One embedding per text (a class name or synonym): mean over templates, normalised.

        Results come from the cache (per precision) where possible; only missing texts are
        encoded, together, in ``precision`` (default: the model's).
        """
        tkey = templates_key(templates)
        model_id = self.loaded.identity
        name = self.precision(precision)
        vectors: dict[str, np.ndarray] = {}
        missing: list[str] = []
        for text in dict.fromkeys(texts):
            cached = self.cache.get(model_id, tkey, text, name) if self.cache is not None else None
            if cached is None:
                missing.append(text)
            else:
                vectors[text] = cached
        if missing:
            prompts = [template.format(text) for text in missing for template in templates]
            emb = self.encode_prompts(prompts, precision=name).view(len(missing), len(templates), -1)
            mean = torch.nn.functional.normalize(emb.mean(dim=1), dim=-1).cpu().numpy()
            for text, vector in zip(missing, mean):
                vectors[text] = vector
                if self.cache is not None:
                    self.cache.put(model_id, tkey, text, vector, name)
        stacked = np.stack([vectors[t] for t in texts]) if texts else np.zeros((0, self.loaded.embed_dim))
        return torch.from_numpy(np.ascontiguousarray(stacked, dtype=np.float32)).to(self.loaded.device)
