"""Dense CLIP features: one joint image-text embedding per patch (MaskCLIP, paper section 3.2).

CLIP's image encoder ends in an attention pooling whose output is the global image embedding.
MaskCLIP keeps every weight frozen and only changes how the last layer is read, so that each
spatial position yields an embedding comparable with text embeddings by cosine similarity.

ViT (open_clip ``VisionTransformer``), last block, per ``mode``:

* ``maskclip`` (default): the value path. ``v = out_proj(W_v ln_1(x) + b_v)``, residual and MLP
  kept: ``z = x + v; z = z + mlp(ln_2(z))``. No token mixing in the last layer.
* ``sclip``: attention ``softmax(q q^T s) + softmax(k k^T s)``; residual and MLP kept.
* ``clearclip``: attention ``softmax(q q^T s)``; residual and MLP removed.
* ``naclip``: attention ``softmax(k k^T s + G)``, G a Gaussian of patch distance (sigma 5
  patches, zero for the class token); residual and MLP removed.
* ``scclip``: SC-CLIP (anomaly tokens fixed, intermediate-layer similarity, multi-level
  fusion; see ``scclip.py``); residual and MLP removed.
* ``rfclip``: RF-CLIP (distraction tokens fixed after every block, refocused layer-averaged
  k-k attention; see ``rfclip.py``); also returns each image's global embedding.
* ``resclip``: ResCLIP's last block without its text feedback (see ``resclip.py``); the state
  its query-time semantic feedback needs is returned with the features.
* ``naive``: the unmodified last block (the baseline MaskCLIP improves on).

then ``feat = ln_post(z[:, 1:]) @ proj``, L2-normalised; the class token is dropped. Positional
embeddings are resized bicubically to the input's patch grid, so any input size works (inputs
must be padded to a multiple of the patch size by the caller).

Models with LayerScale (open_clip ``ls_init_value``: ``ls_1``/``ls_2`` per-channel gammas) scale
each branch's output by its gamma; the gamma is part of the branch, so every mode keeps it:
maskclip and sclip scale the attention branch (``ls_1``) and the MLP (``ls_2``) as the block does;
clearclip and naclip drop the residual and the MLP but keep ``ls_1`` on the attention output;
scclip keeps ``ls_1`` on its two attention outputs (not tested against a LayerScale reference).

ResNet (open_clip ``ModifiedResNet``): ``feat = c_proj(v_proj(layer4))`` per position, i.e. the
attention pool's value path applied as 1x1 convolutions (paper eq. 3); only ``maskclip`` applies.

Keys for key smoothing are the last layer's keys of the patches (``W_k ln_1(x) + b_k`` for ViT,
``k_proj(layer4)`` for ResNet), L2-normalised over channels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidInputError, UnsupportedModelError
from .attention_bias import NACLIP_SIGMA, naclip_gaussian
from .modes import MODES, VIT_ONLY_MODES
from .resclip import resclip_encode
from .rfclip import distraction_channels, rfclip_tokens
from .scclip import scclip_tokens

__all__ = [
    "MODES",
    "VIT_ONLY_MODES",
    "DenseOutput",
    "dense_features",
    "interpolate_pos_embed",
    "attnpool_value_features",
    "naclip_gaussian",
    "NACLIP_SIGMA",
]

#: Modes whose last block mixes patches, so attention can be restricted to regions.
ATTENTION_REGION_MODES = ("sclip", "clearclip", "naclip")

# Attention rows are computed in chunks so that a block of scores stays below this many floats.
_ATTN_BLOCK_ELEMENTS = 1 << 25


@dataclass
class DenseOutput:
    """Dense features ``B x D x h x w`` (float32, unit norm over D) and optional keys ``B x N x C``;
    ``state``: what a text-aware mode's query-time read-out needs besides (batch first)."""

    features: torch.Tensor
    keys: Optional[torch.Tensor] = None
    state: dict[str, torch.Tensor] = field(default_factory=dict)


def interpolate_pos_embed(
    pos: torch.Tensor,
    native_grid: tuple[int, int],
    grid: tuple[int, int],
    *,
    method: str = "grid",
    pixels: Optional[tuple[int, int]] = None,
) -> torch.Tensor:
    """Resize a ViT positional embedding (class row + native grid) to ``grid``, bicubically.

    ``method="grid"``: to the exact grid; at the native grid it is returned unchanged.
    ``method="scale_factor"``: the successors' reference code (SCLIP, NACLIP, ClearCLIP's
    ``interpolate_pos_encoding``, after DINO): ``scale_factor=(g + 0.1) / native`` per axis, so
    the bicubic samples sit at slightly other positions; skipped only when the input's pixel
    height equals its width (``pixels``) and the grid is the native one.
    """
    if method == "scale_factor":
        n = int(native_grid[0]) * int(native_grid[1])
        square = pixels is None or pixels[0] == pixels[1]
        if tuple(grid) == tuple(native_grid) and square:
            return pos
        if native_grid[0] != native_grid[1]:
            raise InvalidInputError("scale_factor positional-embedding resize needs a square grid.")
    elif method != "grid":
        raise InvalidInputError(f"Unknown positional-embedding resize {method!r}: use grid or scale_factor.")
    elif tuple(grid) == tuple(native_grid):
        return pos
    width = pos.shape[-1]
    cls_pos, patch_pos = pos[:1], pos[1:]
    gh0, gw0 = native_grid
    patch_pos = patch_pos.reshape(1, gh0, gw0, width).permute(0, 3, 1, 2).float()
    if method == "scale_factor":
        side = math.sqrt(n)
        factors = ((grid[0] + 0.1) / side, (grid[1] + 0.1) / side)
        patch_pos = F.interpolate(patch_pos, scale_factor=factors, mode="bicubic",
                                  align_corners=False)
        if tuple(patch_pos.shape[-2:]) != tuple(grid):  # pragma: no cover - float guard
            raise InvalidInputError(f"Positional embedding resized to {tuple(patch_pos.shape[-2:])}, "
                                    f"not the grid {tuple(grid)}.")
    else:
        patch_pos = F.interpolate(patch_pos, size=tuple(grid), mode="bicubic", align_corners=False)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(-1, width).to(pos.dtype)
    return torch.cat([cls_pos, patch_pos], dim=0)


def attnpool_value_features(attnpool: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """ResNet attention pool read densely: ``c_proj(v_proj(tokens))`` for ``... x C`` tokens."""
    v = F.linear(tokens, attnpool.v_proj.weight, attnpool.v_proj.bias)
    return F.linear(v, attnpool.c_proj.weight, attnpool.c_proj.bias)


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, width = t.shape
    return t.reshape(b, n, heads, width // heads).transpose(1, 2)  # B H N hd


def _merge_heads(t: torch.Tensor) -> torch.Tensor:
    b, h, n, hd = t.shape
    return t.transpose(1, 2).reshape(b, n, h * hd)


def _chunked_attention(
    weights_for_rows: Callable[[slice], torch.Tensor], v: torch.Tensor
) -> torch.Tensor:
    """``A @ v`` with A produced block-of-rows by block-of-rows (memory stays bounded)."""
    b, h, n, hd = v.shape
    rows_per_block = max(1, _ATTN_BLOCK_ELEMENTS // max(1, b * h * n))
    out = torch.empty_like(v)
    for start in range(0, n, rows_per_block):
        rows = slice(start, min(n, start + rows_per_block))
        out[:, :, rows] = weights_for_rows(rows) @ v
    return out


def region_attention_bias(regions: torch.Tensor, rows: slice, dtype=torch.float32) -> torch.Tensor:
    """``B x 1 x rows x (1+N)`` additive bias: 0 between patches of one region (and for the class
    token's row and column), -inf between patches of different regions (CorrCLIP's restriction).
    ``regions``: ``B x N`` region ids of the patches."""
    b, n = regions.shape
    ids = torch.cat([torch.full((b, 1), -1, dtype=regions.dtype, device=regions.device), regions], 1)
    token_rows = torch.arange(n + 1, device=regions.device)[rows]
    same = ids[:, token_rows, None] == ids[:, None, :]
    same[:, :, 0] = True  # every token may attend to the class token
    same[:, token_rows == 0, :] = True  # the class token attends to every patch
    bias = torch.zeros(same.shape, dtype=dtype, device=regions.device)
    return bias.masked_fill_(~same, float("-inf"))[:, None]


def _custom_last_attention(
    block: nn.Module, y: torch.Tensor, mode: str, grid: tuple[int, int],
    regions: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The last block's attention output (before the residual) under a training-free mode;
    ``regions`` (``B x N`` patch region ids) restricts each patch to its own region's patches."""
    attn: nn.MultiheadAttention = block.attn
    heads = attn.num_heads
    q, k, v = F.linear(y, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (_split_heads(t, heads) for t in (q, k, v))
    scale = q.shape[-1] ** -0.5

    def masked(rows: slice) -> torch.Tensor | float:
        return 0.0 if regions is None else region_attention_bias(regions, rows, y.dtype)

    if mode == "sclip":
        def rows_fn(rows: slice) -> torch.Tensor:
            qq = (q[:, :, rows] @ q.transpose(-1, -2)) * scale + masked(rows)
            kk = (k[:, :, rows] @ k.transpose(-1, -2)) * scale + masked(rows)
            return qq.softmax(dim=-1) + kk.softmax(dim=-1)
    elif mode == "clearclip":
        def rows_fn(rows: slice) -> torch.Tensor:
            return ((q[:, :, rows] @ q.transpose(-1, -2)) * scale + masked(rows)).softmax(dim=-1)
    elif mode == "naclip":
        def rows_fn(rows: slice) -> torch.Tensor:
            bias = naclip_gaussian(grid, device=y.device, dtype=y.dtype, rows=rows)
            return ((k[:, :, rows] @ k.transpose(-1, -2)) * scale + bias
                    + masked(rows)).softmax(dim=-1)
    else:  # pragma: no cover - guarded by the caller
        raise InvalidInputError(f"Unknown attention mode {mode!r}.")
    mixed = _merge_heads(_chunked_attention(rows_fn, v))
    return attn.out_proj(mixed)


def _vit_embed(visual: nn.Module, pixels: torch.Tensor,
               pos_embed_resize: str = "grid") -> tuple[torch.Tensor, tuple[int, int]]:
    x = visual.conv1(pixels)  # a partial last patch (partial_patches="drop") is left out
    b, width, gh, gw = x.shape
    x = x.reshape(b, width, gh * gw).permute(0, 2, 1)
    cls = visual.class_embedding.reshape(1, 1, -1).expand(b, -1, -1).to(x.dtype)
    x = torch.cat([cls, x], dim=1)
    pos = interpolate_pos_embed(visual.positional_embedding, tuple(visual.grid_size), (gh, gw),
                                method=pos_embed_resize, pixels=tuple(pixels.shape[-2:]))
    x = x + pos.to(x.dtype)
    x = visual.ln_pre(x)
    return x, (gh, gw)


def _vit_dense(visual: nn.Module, pixels: torch.Tensor, mode: str, with_keys: bool,
               pos_embed_resize: str = "grid", partial_patches: str = "pad",
               token_regions: Optional[torch.Tensor] = None,
               options: Optional[dict] = None) -> DenseOutput:
    patch = visual.patch_size[0] if isinstance(visual.patch_size, (tuple, list)) else visual.patch_size
    if partial_patches != "drop" and (pixels.shape[-2] % patch or pixels.shape[-1] % patch):
        raise InvalidInputError(
            f"Input {tuple(pixels.shape[-2:])} is not a multiple of the patch size {patch}; pad it."
        )
    x, grid = _vit_embed(visual, pixels, pos_embed_resize)
    regions = None
    if token_regions is not None:
        if mode not in ATTENTION_REGION_MODES:
            raise InvalidInputError(
                f"Restricting attention to regions needs a mode that mixes patches in the last "
                f"block ({', '.join(ATTENTION_REGION_MODES)}), not {mode!r}."
            )
        if tuple(token_regions.shape[-2:]) != tuple(grid):
            raise InvalidInputError(f"Token regions {tuple(token_regions.shape[-2:])} do not match "
                                    f"the patch grid {tuple(grid)}.")
        regions = token_regions.reshape(token_regions.shape[0], -1).to(x.device)
    transformer = visual.transformer
    batch_first = getattr(transformer, "batch_first", True)
    blocks = transformer.resblocks
    if mode in ("rfclip", "resclip"):  # batch-first tokens in, whatever the layout
        return _text_aware_dense(visual, pixels, x, grid, mode, with_keys, options or {})
    if not batch_first:
        x = x.transpose(0, 1)
    inter = []  # intermediate outputs (batch-first), kept for SC-CLIP only
    for block in blocks[:-1]:
        x = block(x)
        if mode == "scclip":
            inter.append(x if batch_first else x.transpose(0, 1))
    if not batch_first:
        x = x.transpose(0, 1)
    last = blocks[-1]

    keys = None
    if mode == "naive":
        z = last(x if batch_first else x.transpose(0, 1))
        z = z if batch_first else z.transpose(0, 1)
        z = z[:, 1:]
        y = last.ln_1(x) if with_keys else None
    else:
        y = last.ln_1(x)
        if mode == "maskclip":
            width = y.shape[-1]
            w_v = last.attn.in_proj_weight[2 * width:]
            b_v = last.attn.in_proj_bias[2 * width:] if last.attn.in_proj_bias is not None else None
            v = last.attn.out_proj(F.linear(y[:, 1:], w_v, b_v))
            z = x[:, 1:] + last.ls_1(v)
            z = z + last.ls_2(last.mlp(last.ln_2(z)))
        elif mode == "sclip":
            z = x + last.ls_1(_custom_last_attention(last, y, mode, grid, regions))
            z = z + last.ls_2(last.mlp(last.ln_2(z)))
            z = z[:, 1:]
        elif mode == "scclip":
            z = scclip_tokens(last, inter, grid, layerscale=last.ls_1)
        else:  # clearclip, naclip: the attention branch only (its LayerScale included)
            z = last.ls_1(_custom_last_attention(last, y, mode, grid, regions))[:, 1:]
    if with_keys:
        width = y.shape[-1]
        w_k = last.attn.in_proj_weight[width:2 * width]
        b_k = last.attn.in_proj_bias[width:2 * width] if last.attn.in_proj_bias is not None else None
        keys = F.normalize(F.linear(y[:, 1:], w_k, b_k).float(), dim=-1)

    feat = visual.ln_post(z) @ visual.proj
    feat = F.normalize(feat.float(), dim=-1)
    b = feat.shape[0]
    feat = feat.transpose(1, 2).reshape(b, -1, grid[0], grid[1])
    return DenseOutput(features=feat, keys=keys)


def _run_block(batch_first: bool):
    """Call a block on batch-first tokens whatever the transformer's layout."""
    if batch_first:
        return lambda block, t: block(t)
    return lambda block, t: block(t.transpose(0, 1)).transpose(0, 1)


def _text_aware_dense(visual: nn.Module, pixels: torch.Tensor, x: torch.Tensor,
                      grid: tuple[int, int], mode: str, with_keys: bool, options: dict) -> DenseOutput:
    """rfclip and resclip (their math in :mod:`.rfclip`, :mod:`.resclip`): features, keys of the
    last block's input, and the state their query-time read-out needs."""
    blocks = visual.transformer.resblocks
    run = _run_block(getattr(visual.transformer, "batch_first", True))
    if mode == "rfclip":
        channels = distraction_channels(visual, options.get("channels"))
        z, last_in, cls = rfclip_tokens(blocks, x, grid, channels, run,
                                        global_only=bool(options.get("global_only")))
        state = {"global": F.normalize((visual.ln_post(cls) @ visual.proj).float(), dim=-1)}
    else:
        z, last_in, state = resclip_encode(blocks, x, grid, options.get("base", "naclip"),
                                           tuple(options.get("rcs_weights", (2.0, 0.4))), run)
        state = {**state, "pixels": pixels}
    keys = None
    if with_keys:
        y = blocks[-1].ln_1(last_in)
        width = y.shape[-1]
        attn = blocks[-1].attn
        b_k = attn.in_proj_bias[width:2 * width] if attn.in_proj_bias is not None else None
        keys = F.normalize(F.linear(y[:, 1:], attn.in_proj_weight[width:2 * width], b_k).float(), dim=-1)
    b = x.shape[0]
    if z is None:  # the global embedding only
        return DenseOutput(features=torch.zeros(b, 0, *grid), keys=keys, state=state)
    feat = F.normalize((visual.ln_post(z) @ visual.proj).float(), dim=-1)
    return DenseOutput(features=feat.transpose(1, 2).reshape(b, -1, grid[0], grid[1]), keys=keys,
                       state=state)


def _resnet_dense(visual: nn.Module, pixels: torch.Tensor, mode: str, with_keys: bool) -> DenseOutput:
    if mode != "maskclip":
        raise UnsupportedModelError(
            f"Attention mode {mode!r} needs a ViT; ResNet CLIP models support only 'maskclip'."
        )
    x = visual.stem(pixels)
    x = visual.layer1(x)
    x = visual.layer2(x)
    x = visual.layer3(x)
    x = visual.layer4(x)
    b, _, h, w = x.shape
    tokens = x.flatten(2).transpose(1, 2)  # B N C
    pool = visual.attnpool
    feat = F.normalize(attnpool_value_features(pool, tokens).float(), dim=-1)
    feat = feat.transpose(1, 2).reshape(b, -1, h, w)
    keys = None
    if with_keys:
        keys = F.normalize(F.linear(tokens, pool.k_proj.weight, pool.k_proj.bias).float(), dim=-1)
    return DenseOutput(features=feat, keys=keys)


@torch.no_grad()
def dense_features(
    visual: nn.Module, pixels: torch.Tensor, mode: str = "maskclip", *, with_keys: bool = False,
    pos_embed_resize: str = "grid", partial_patches: str = "pad",
    token_regions: Optional[torch.Tensor] = None, mode_options: Optional[dict] = None,
) -> DenseOutput:
    """Dense, L2-normalised embeddings of ``pixels`` (B x 3 x H x W, normalised, padded).

    ``mode`` is one of :data:`MODES`; ``with_keys`` also returns the last layer's patch keys
    (for key smoothing). ``pos_embed_resize`` and ``partial_patches`` (``drop``: the input need
    not be a multiple of the patch; the last partial patch is left out, as the reference code's
    patch convolution does) are the ViT conventions of :class:`~.settings.SegmentSettings`.
    ``token_regions`` (``B x gh x gw`` region ids of the patches) restricts the last block's
    attention to patches of the same region (CorrCLIP; modes sclip, clearclip, naclip).
    ``mode_options``: rfclip ``channels`` (distraction channels; default by width) and
    ``global_only`` (only ``state["global"]``); resclip ``base`` and ``rcs_weights``.
    """
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import VisionTransformer

    if mode not in MODES:
        raise InvalidInputError(f"Unknown attention mode {mode!r}: use one of {', '.join(MODES)}.")
    if isinstance(visual, VisionTransformer):
        return _vit_dense(visual, pixels, mode, with_keys, pos_embed_resize, partial_patches,
                          token_regions, mode_options)
    if isinstance(visual, ModifiedResNet):
        return _resnet_dense(visual, pixels, mode, with_keys)
    raise UnsupportedModelError(f"Vision tower {type(visual).__name__} is not supported.")


def grid_from_pixels(size: int, patch: int) -> int:
    """Number of cells covering ``size`` pixels (the input is padded up to a multiple)."""
    return int(math.ceil(size / patch))
