"""Loading a frozen CLIP model from open_clip, by name, config file or checkpoint file.

``model`` is an open_clip model name (``ViT-B-16``, ``RN50``...), the path of an open_clip
model-config JSON (custom and small models), or ``"demo"`` (the tiny model shipped with the
package, which runs offline). ``pretrained`` is an open_clip pretrained tag (downloaded once into
open_clip's usual cache), a local checkpoint file, or ``"random"`` (explicitly random weights, for
tests and benchmarks).

One small loader per source (the demo model, a config file, a pretrained tag, a built-in model
with a local checkpoint) builds the model on the CPU; :func:`load_clip` only dispatches, and
every source ends in the same checks, freezing and placement. Tags resolve to a local file first
(:mod:`.pretrained`: the cache, else a download after a quick probe of the host).

What the reference code gets wrong and this module does not: OpenAI weights get QuickGELU (without
it the model silently degrades); weights that do not match the architecture are an error, never a
silently random backbone; checkpoints load without running pickled code; and missing weights
offline fail within seconds, in one line that says how to work offline.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..errors import ModelLoadError, UnsupportedModelError
from .checkpoints import CHECKPOINT_SUFFIXES, file_digest, read_state_dict
from .device import resolve_device
from .precision import resolve_precision, weights_dtype
from .pretrained import pretrained_file
from .names import DEMO_MODEL, RANDOM_WEIGHTS

__all__ = ["LoadedModel", "load_clip", "wrap_model", "DEMO_MODEL", "RANDOM_WEIGHTS"]

_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class LoadedModel:
    """A frozen open_clip model with what MaskCLIP needs to know about it."""

    model: nn.Module
    tokenizer: Callable[..., torch.Tensor]
    name: str
    pretrained: Optional[str]
    identity: str
    device: torch.device
    dtype: torch.dtype
    mean: tuple[float, float, float] = _OPENAI_MEAN
    std: tuple[float, float, float] = _OPENAI_STD
    quick_gelu: bool = False
    #: The precision of runs that ask for ``auto`` (resolved at load: bf16 on a CPU with native
    #: bf16, fp32 on other CPUs, fp16 on GPUs); see :mod:`.precision`.
    precision: str = "fp32"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def visual(self) -> nn.Module:
        return self.model.visual

    @property
    def kind(self) -> str:
        """``"vit"`` or ``"resnet"``."""
        return _vision_kind(self.visual)

    @property
    def patch_size(self) -> int:
        """Pixels per output cell: the ViT patch, or the ResNet's total stride (32)."""
        if self.kind == "vit":
            return int(_pair(self.visual.patch_size)[0])
        return 32

    @property
    def native_grid(self) -> tuple[int, int]:
        """The feature grid at the resolution the model was trained at."""
        if self.kind == "vit":
            return tuple(int(g) for g in self.visual.grid_size)  # type: ignore[return-value]
        size = _pair(self.visual.image_size)
        return (size[0] // 32, size[1] // 32)

    @property
    def native_size(self) -> tuple[int, int]:
        return tuple(int(s) for s in _pair(self.visual.image_size))  # type: ignore[return-value]

    @property
    def embed_dim(self) -> int:
        return int(self.visual.output_dim)

    def describe(self) -> str:
        weights = self.pretrained or "no weights"
        return f"{self.name} ({weights}) on {self.device.type}"


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


def _vision_kind(visual: nn.Module) -> str:
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import VisionTransformer

    if isinstance(visual, VisionTransformer):
        return "vit"
    if isinstance(visual, ModifiedResNet):
        return "resnet"
    return type(visual).__name__


def _check_supported(visual: nn.Module, name: str) -> None:
    """MaskCLIP reads the last attention block or the attention pool: check both exist as expected."""
    kind = _vision_kind(visual)
    if kind == "vit":
        if getattr(visual, "attn_pool", None) is not None:
            raise UnsupportedModelError(
                f"{name}: ViTs with an attentional pooler (CoCa-style) have no single last "
                "attention block to read dense features from; use a plain CLIP ViT (e.g. ViT-B-16)."
            )
        last = visual.transformer.resblocks[-1]
        if not isinstance(getattr(last, "attn", None), nn.MultiheadAttention):
            raise UnsupportedModelError(
                f"{name}: its transformer blocks use a custom attention (qk-norm, scaled cosine...) "
                "that MaskCLIP's read-out does not support; use a standard CLIP ViT or ResNet."
            )
        if getattr(visual, "pool_type", "tok") != "tok" or getattr(visual, "final_ln_after_pool", False):
            raise UnsupportedModelError(
                f"{name}: this ViT pools by averaging, not by a class token; MaskCLIP's read-out "
                "expects CLIP's class-token ViTs."
            )
        return
    if kind == "resnet":
        return
    raise UnsupportedModelError(
        f"{name}: vision tower {kind} (e.g. a timm backbone) is not supported; MaskCLIP needs "
        "open_clip's own ViT or modified ResNet (ViT-B-16, ViT-L-14, RN50, ...)."
    )


def _quiet_open_clip():
    """open_clip logs a warning for every random init we do on purpose; keep it out of the way."""
    logger = logging.getLogger()
    previous = logger.level

    @contextlib.contextmanager
    def ctx():
        logger.setLevel(max(previous, logging.ERROR))
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*QuickGELU mismatch.*")
                yield
        finally:
            logger.setLevel(previous)

    return ctx()


def _demo_files() -> tuple[Path, Path]:
    base = resources.files("napari_maskclip") / "demo"
    config = Path(str(base / "toy_clip.json"))
    weights = Path(str(base / "toy_clip.safetensors"))
    if not config.is_file() or not weights.is_file():
        raise ModelLoadError(
            "The demo model files are missing from this installation "
            f"(expected {config} and {weights}); reinstall napari-maskclip."
        )
    return config, weights


def _read_config(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read an open_clip model config JSON (plain, or HF-style with model_cfg/preprocess_cfg)."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise ModelLoadError(f"Cannot read model config {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ModelLoadError(f"Model config {path} must be a JSON object.")
    cfg = raw.get("model_cfg", raw)
    preprocess = raw.get("preprocess_cfg", {})
    if "vision_cfg" not in cfg or "text_cfg" not in cfg or "embed_dim" not in cfg:
        raise ModelLoadError(
            f"{path} is not an open_clip model config: it needs embed_dim, vision_cfg and text_cfg."
        )
    return cfg, preprocess


def _build_from_config(cfg: dict[str, Any], quick_gelu: Optional[bool]) -> nn.Module:
    import open_clip

    cfg = json.loads(json.dumps(cfg))  # deep copy
    if quick_gelu is not None:
        cfg["quick_gelu"] = bool(quick_gelu)
    custom_text = cfg.pop("custom_text", False) or "hf_model_name" in cfg.get("text_cfg", {})
    for key in ("multimodal_cfg",):
        if key in cfg:
            raise UnsupportedModelError("CoCa-style multimodal configs are not supported.")
    model_class = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    try:
        return model_class(**cfg)
    except TypeError as exc:
        raise ModelLoadError(f"Invalid model config: {exc}") from exc


def _load_weights(model: nn.Module, path: Path, name: str) -> str:
    """Load a checkpoint into ``model`` strictly; returns the checkpoint's format."""
    import open_clip.model as oc_model

    state, fmt = read_state_dict(path)
    _warn_openai_without_quickgelu(model, state, path, name)
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = oc_model.convert_to_custom_text_state_dict(state)
    if "logit_scale" in state and hasattr(model, "logit_scale"):
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    if getattr(model, "logit_bias", None) is None:
        state.pop("logit_bias", None)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches: another architecture's weights
        first = str(exc).strip().splitlines()
        detail = next((line.strip() for line in first if "size mismatch" in line), first[0] if first else "")
        raise ModelLoadError(
            f"Checkpoint {path} does not fit model {name}: {detail[:300]}. Pass the model name "
            "or config the checkpoint was trained with (e.g. --model ViT-B-16)."
        ) from exc
    missing = [k for k in result.missing_keys if not k.endswith("attn_mask")]
    # attn_mask is derived from the context length, not a weight (traced open_clip models list it)
    unexpected = [k for k in result.unexpected_keys if not k.endswith("attn_mask")]
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"missing {len(missing)} (e.g. {', '.join(missing[:3])})")
        if unexpected:
            detail.append(f"unexpected {len(unexpected)} (e.g. {', '.join(unexpected[:3])})")
        raise ModelLoadError(
            f"Checkpoint {path} does not fit model {name}: {'; '.join(detail)}. Pass the model "
            "name or config the checkpoint was trained with (e.g. --model ViT-B-16)."
        )
    return fmt


#: Entries only OpenAI's own CLIP state dicts carry (open_clip drops them when it converts one).
_OPENAI_ONLY_KEYS = ("input_resolution", "context_length", "vocab_size")


def _warn_openai_without_quickgelu(model: nn.Module, state: dict, path: Path, name: str) -> None:
    """OpenAI's weights were trained with QuickGELU; under a GELU model name they load without
    error and silently degrade. Drop OpenAI's metadata entries and warn in that case."""
    from open_clip.transformer import QuickGELU

    found = [key for key in _OPENAI_ONLY_KEYS if key in state]
    for key in found:
        state.pop(key)
    if found and not any(isinstance(m, QuickGELU) for m in model.modules()):
        warnings.warn(
            f"{path.name} is an OpenAI CLIP state dict (it has {', '.join(found)}) but {name} "
            f"builds with GELU; OpenAI's weights need QuickGELU: use {name}-quickgelu "
            "(e.g. ViT-B-16-quickgelu) or quick_gelu=True.",
            stacklevel=3,
        )


def _params_digest(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        data = tensor.detach().to("cpu").contiguous()
        if data.dtype == torch.bfloat16:
            data = data.float()
        digest.update(memoryview(data.numpy()).cast("B"))  # no copy of the bytes
    return digest.hexdigest()


def _identity(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()


@dataclass
class _Built:
    """A source loader's result: the model on the CPU, before device, precision and freezing."""

    net: nn.Module
    name: str
    pretrained: Optional[str]
    identity: str
    tokenizer: Callable[..., torch.Tensor]
    mean: Any = None
    std: Any = None
    quick_gelu: bool = False


def _finish(built: _Built, device: str | torch.device, precision: str) -> LoadedModel:
    """Check, freeze and place a built model (every source ends here)."""
    model = built.net
    _check_supported(model.visual, built.name)
    dev = resolve_device(device)
    precision = resolve_precision(dev, precision)
    dtype = weights_dtype(dev, precision)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    model.to(device=dev, dtype=dtype)
    mean, std = built.mean, built.std
    if mean is None or std is None:
        import open_clip

        pp = open_clip.get_model_preprocess_cfg(model)
        mean = mean or pp.get("mean") or _OPENAI_MEAN
        std = std or pp.get("std") or _OPENAI_STD
    return LoadedModel(
        model=model,
        tokenizer=built.tokenizer,
        name=built.name,
        pretrained=built.pretrained,
        identity=built.identity,
        device=dev,
        dtype=dtype,
        mean=tuple(float(m) for m in mean),  # type: ignore[arg-type]
        std=tuple(float(s) for s in std),  # type: ignore[arg-type]
        quick_gelu=built.quick_gelu,
        precision=precision,
    )


def wrap_model(
    model: nn.Module,
    *,
    name: str = "custom",
    tokenizer: Optional[Callable[..., torch.Tensor]] = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
) -> LoadedModel:
    """Use an open_clip model already in memory (tests, notebooks, a model you trained).

    Its identity (for the text-embedding cache) is a hash of its weights, so two models never
    share cached embeddings by accident.
    """
    import open_clip

    if tokenizer is None:
        context = int(getattr(model, "context_length", 77) or 77)
        tokenizer = open_clip.SimpleTokenizer(context_length=context)
    identity = _identity("in-memory", _params_digest(model))
    return _finish(_Built(model, name, None, identity, tokenizer), device, precision)


def load_clip(
    model: str = "ViT-B-16",
    pretrained: Optional[str] = "openai",
    *,
    device: str | torch.device = "auto",
    precision: str = "auto",
    quick_gelu: Optional[bool] = None,
    cache_dir: Optional[str] = None,
) -> LoadedModel:
    """Load a frozen CLIP model for MaskCLIP.

    Args:
        model: open_clip model name, path of a model-config JSON, or ``"demo"``.
        pretrained: open_clip pretrained tag, local checkpoint path, ``"random"``, or ``None``
            (only for ``"demo"``, which carries its own weights).
        device: ``auto`` (cuda > mps > cpu), ``cpu``, ``cuda``, ``cuda:N``, ``mps``.
        precision: the default precision of its runs: ``auto`` (fp16 on GPU; on the CPU bf16
            where the CPU has native bf16, else fp32), ``fp32``, ``fp16``, ``bf16``.
        quick_gelu: force QuickGELU on or off; by default it is on for OpenAI weights.
        cache_dir: where open_clip downloads pretrained weights (its default if None).
    """
    if not model or not str(model).strip():
        raise ModelLoadError("No model given: use an open_clip name such as ViT-B-16, or 'demo'.")
    model = str(model).strip()
    pretrained = str(pretrained).strip() if pretrained not in (None, "") else None
    if model == DEMO_MODEL:
        built = _load_demo(pretrained, quick_gelu)
    elif model.lower().endswith(".json") or Path(model).expanduser().is_file():
        built = _load_config_file(model, pretrained, quick_gelu)
    else:
        import open_clip

        name = _builtin_name(model)
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained is not None and pretrained in tags:
            built = _load_pretrained_tag(name, pretrained, quick_gelu, cache_dir)
        else:
            built = _load_builtin_file(name, pretrained, tags, quick_gelu)
    return _finish(built, device, precision)


# ---- one loader per source -------------------------------------------------------------------
def _load_demo(pretrained: Optional[str], quick_gelu: Optional[bool]) -> _Built:
    """The shipped demo model: config and weights inside the package (or another weights file)."""
    import open_clip

    config_path, weights_path = _demo_files()
    if pretrained not in (None, RANDOM_WEIGHTS) and Path(pretrained).is_file():
        weights_path = Path(pretrained)
    cfg, preprocess = _read_config(config_path)
    with _quiet_open_clip():
        net = _build_from_config(cfg, quick_gelu)
    _load_weights(net, weights_path, "demo")
    tokenizer = open_clip.SimpleTokenizer(context_length=int(cfg["text_cfg"].get("context_length", 77)))
    identity = _identity("demo", json.dumps(cfg, sort_keys=True), file_digest(weights_path))
    return _Built(net, DEMO_MODEL, str(weights_path.name), identity, tokenizer,
                  preprocess.get("mean"), preprocess.get("std"), bool(cfg.get("quick_gelu", False)))


def _load_config_file(model: str, pretrained: Optional[str], quick_gelu: Optional[bool]) -> _Built:
    """An open_clip model-config JSON, with a local checkpoint or random weights."""
    import open_clip

    config_path = Path(model).expanduser()
    if not config_path.is_file():
        raise ModelLoadError(
            f"Model config file not found: {config_path}. Give an open_clip model name "
            f"(e.g. ViT-B-16, RN50) or the path of an existing config JSON."
        )
    cfg, preprocess = _read_config(config_path)
    weights_path = _resolve_local_weights(pretrained, model)
    qg = _file_quick_gelu(quick_gelu, weights_path)
    with _quiet_open_clip():
        net = _build_from_config(cfg, qg)
    if weights_path is None:
        identity = _identity("config", json.dumps(cfg, sort_keys=True), _params_digest(net))
    else:
        _load_weights(net, weights_path, config_path.name)
        identity = _identity("config", json.dumps(cfg, sort_keys=True), file_digest(weights_path))
    text_cfg = cfg["text_cfg"]
    if text_cfg.get("hf_tokenizer_name"):
        tokenizer = open_clip.get_tokenizer(f"hf-hub:{text_cfg['hf_tokenizer_name']}")
    else:
        tokenizer = open_clip.SimpleTokenizer(context_length=int(text_cfg.get("context_length", 77)))
    # The name is the path as given, so a recorded name can be loaded again.
    return _Built(net, model, str(weights_path) if weights_path else RANDOM_WEIGHTS, identity,
                  tokenizer, preprocess.get("mean"), preprocess.get("std"),
                  bool(qg if qg is not None else cfg.get("quick_gelu", False)))


def _load_pretrained_tag(
    name: str, tag: str, quick_gelu: Optional[bool], cache_dir: Optional[str]
) -> _Built:
    """A built-in model with an open_clip pretrained tag: cached weights, else a probed download."""
    import open_clip

    tag_cfg = open_clip.get_pretrained_cfg(name, tag) or {}
    qg = quick_gelu if quick_gelu is not None else bool(tag_cfg.get("quick_gelu", False))
    if tag.startswith("openai"):
        qg = True if quick_gelu is None else quick_gelu
    path = pretrained_file(name, tag, tag_cfg, cache_dir)
    net = _create_builtin(name, bool(qg))
    _load_weights(net, path, name)
    return _Built(net, name, tag, _identity("tag", name, tag, f"qg={qg}"),
                  open_clip.get_tokenizer(name), tag_cfg.get("mean"), tag_cfg.get("std"), bool(qg))


def _load_builtin_file(
    name: str, pretrained: Optional[str], tags: list[str], quick_gelu: Optional[bool]
) -> _Built:
    """A built-in model with a local checkpoint file, or explicitly random weights."""
    import open_clip

    if pretrained is None:
        hint = f"available tags: {', '.join(tags)}" if tags else "this model has no published tags"
        raise ModelLoadError(
            f"No weights given for {name} ({hint}). Pass --pretrained TAG or a checkpoint file; "
            "'random' runs it with random weights (for testing only)."
        )
    weights_path = _resolve_local_weights(pretrained, name, tags)
    qg = _file_quick_gelu(quick_gelu, weights_path)
    net = _create_builtin(name, bool(qg))
    if weights_path is None:
        identity = _identity("random", name, _params_digest(net))
    else:
        _load_weights(net, weights_path, name)
        identity = _identity("file", name, f"qg={qg}", file_digest(weights_path))
    return _Built(net, name, str(weights_path) if weights_path else RANDOM_WEIGHTS, identity,
                  open_clip.get_tokenizer(name), quick_gelu=bool(qg) or name.endswith("quickgelu"))


# ---- helpers of the loaders ------------------------------------------------------------------
def _builtin_name(model: str) -> str:
    import open_clip

    name = model.replace("/", "-")
    if open_clip.get_model_config(name) is None:
        raise ModelLoadError(
            f"Unknown model {model!r}. Use an open_clip model name (e.g. ViT-B-16, ViT-B-32, "
            "ViT-L-14, RN50, RN101; see open_clip.list_models()), 'demo', or the path of a "
            "model-config JSON."
        )
    return name


def _create_builtin(name: str, quick_gelu: bool) -> nn.Module:
    """A built-in architecture with random weights (weights are loaded by the caller)."""
    import open_clip

    with _quiet_open_clip():
        return open_clip.create_model(name, pretrained=None, force_quick_gelu=quick_gelu, device="cpu")


def _file_quick_gelu(quick_gelu: Optional[bool], weights_path: Optional[Path]) -> Optional[bool]:
    """QuickGELU as asked, else on for OpenAI's original (TorchScript) checkpoints."""
    if quick_gelu is None and weights_path is not None and _is_openai_format(weights_path):
        return True
    return quick_gelu


def _is_openai_format(path: Path) -> bool:
    from .checkpoints import is_torchscript_archive

    return is_torchscript_archive(path)


def _resolve_local_weights(
    pretrained: Optional[str], model: str, tags: Optional[list[str]] = None
) -> Optional[Path]:
    """``None`` for random weights, else the checkpoint path (which must exist)."""
    if pretrained is None or pretrained == RANDOM_WEIGHTS:
        if pretrained is None and tags is not None:
            raise ModelLoadError(f"No weights given for {model}.")
        return None
    path = Path(pretrained).expanduser()
    if path.is_file():
        return path
    looks_like_file = path.suffix.lower() in CHECKPOINT_SUFFIXES or os.path.sep in pretrained
    if looks_like_file:
        raise ModelLoadError(
            f"Checkpoint file not found: {path}. Check the path, or use a pretrained tag."
        )
    known = f" Known tags for {model}: {', '.join(tags)}." if tags else ""
    raise ModelLoadError(
        f"{pretrained!r} is neither a pretrained tag of {model} nor an existing checkpoint file."
        + known
    )
