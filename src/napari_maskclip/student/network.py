"""The MaskCLIP+ student: a DeepLab-style network whose classifier is frozen text embeddings.

As in the paper (section 3.4), the last layer is a 1x1 convolution whose weights are the CLIP text
embeddings of the class names, frozen: the network learns to map pixels into CLIP's joint space,
and the classes keep their meaning. The rest is torchvision's DeepLabv3 (ASPP head) with its final
layer replaced by a learned projection to the text-embedding width:

    image (0..1) -> ImageNet normalisation -> backbone -> ASPP head -> 1x1 conv to D channels
        -> [optional L2 norm x scale] -> 1x1 conv with the frozen (K+1) x D text embeddings
        -> bilinear upsampling to the input size.

Channel 0 is the background class (embedded from the background names), channel k is class k,
matching the label values of exported masks. Following the official MaskCLIP+ head, features are
not normalised by default (raw dot products, ``norm_feat=False``); a cosine classifier with a
fixed scale is an option.

Backbones: ``mobilenet_v3_large`` (default; output stride 16, fast enough for CPU training),
``resnet50`` / ``resnet101`` (output stride 8, closer to the paper's DeepLabv2-ResNet101), and
``tiny`` (for tests, quick trials and small images: four conv layers at output stride 2 and a
local head, no ASPP). ImageNet weights come from torchvision's files in the torch hub cache; see
:func:`backbone_weights_iter`.

Why ``tiny`` has no ASPP: DeepLabv3's ASPP adds an image-pooling branch, so every pixel sees the
whole image. A student that sees everything also learns its teacher's context leaks (MaskCLIP
tends to label background with the names of objects elsewhere in the image); one whose receptive
field is local (27 px) must decide from what is around each pixel, and on the synthetic
benchmark (``benchmarks/quality.py``) it fixes most of the teacher's background errors. The paper's
own student, DeepLabv2, has no image pooling either.
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Generator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..atomic import atomic_write
from ..errors import ModelLoadError, WeightsUnavailableError
from ..online import network_status
from ..progress import Progress
from .settings import BACKBONES

__all__ = [
    "BACKBONES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "StudentNet",
    "build_student",
    "backbone_weights_iter",
    "imagenet_weights_file",
    "load_backbone_state",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_DOWNLOAD_TIMEOUT_S = 20.0


class _FeatureDict(nn.Module):
    """Wraps a plain module so it returns ``{"out": features}`` like torchvision's backbones."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.body(x)}


def _conv_bn_relu(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def _parts(backbone: str, width: int) -> tuple[nn.Module, nn.Module]:
    """(backbone returning {"out": ...}, head ending in ``width`` channels), randomly initialised."""
    from torchvision.models import segmentation

    if backbone == "tiny":  # receptive field 27 px, no image pooling: see above
        body = nn.Sequential(
            _conv_bn_relu(3, 16, stride=2),
            _conv_bn_relu(16, 32),
            _conv_bn_relu(32, 48, dilation=2),
            _conv_bn_relu(48, 64, dilation=2),
        )
        return _FeatureDict(body), nn.Sequential(_conv_bn_relu(64, 64), nn.Conv2d(64, width, 1))
    builders = {
        "mobilenet_v3_large": segmentation.deeplabv3_mobilenet_v3_large,
        "resnet50": segmentation.deeplabv3_resnet50,
        "resnet101": segmentation.deeplabv3_resnet101,
    }
    if backbone not in builders:
        raise ModelLoadError(f"Unknown backbone {backbone!r}: use one of {', '.join(BACKBONES)}.")
    model = builders[backbone](weights=None, weights_backbone=None, num_classes=width, aux_loss=False)
    return model.backbone, model.classifier


class StudentNet(nn.Module):
    """DeepLab backbone + head, classified by frozen text embeddings (see the module doc)."""

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        class_embeddings: torch.Tensor,
        *,
        normalize_features: bool = False,
        feature_scale: float = 20.0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.normalize_features = bool(normalize_features)
        self.feature_scale = float(feature_scale)
        # Buffers, not parameters: saved with the weights, never trained.
        self.register_buffer("class_embeddings", class_embeddings.detach().float().clone())
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    @property
    def num_classes(self) -> int:
        """Output channels, background included."""
        return int(self.class_embeddings.shape[0])

    @property
    def embed_dim(self) -> int:
        return int(self.class_embeddings.shape[1])

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``B x 3 x H x W`` images in 0..1 -> ``B x D`` feature maps at the output stride."""
        x = (images - self.pixel_mean) / self.pixel_std
        feat = self.head(self.backbone(x)["out"])
        if self.normalize_features:
            feat = F.normalize(feat, dim=1) * self.feature_scale
        return feat

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``B x 3 x H x W`` images in 0..1 -> ``B x (K+1) x H x W`` logits."""
        feat = self.features(images)
        logits = F.conv2d(feat, self.class_embeddings[:, :, None, None].to(feat.dtype))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def build_student(
    backbone: str,
    class_embeddings: torch.Tensor,
    *,
    normalize_features: bool = False,
    feature_scale: float = 20.0,
    seed: int = 0,
) -> StudentNet:
    """A randomly initialised student (initialisation seeded, the global RNG left untouched)."""
    if class_embeddings.ndim != 2 or class_embeddings.shape[0] < 2:
        raise ModelLoadError("The student needs a (classes+1) x D matrix of text embeddings.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        body, head = _parts(backbone, int(class_embeddings.shape[1]))
    return StudentNet(body, head, class_embeddings, normalize_features=normalize_features,
                      feature_scale=feature_scale)


# ---- pretrained backbone weights ----------------------------------------------------------------
def _imagenet_url(backbone: str) -> Optional[str]:
    from torchvision import models

    enums = {
        "mobilenet_v3_large": models.MobileNet_V3_Large_Weights,
        "resnet50": models.ResNet50_Weights,
        "resnet101": models.ResNet101_Weights,
    }
    enum = enums.get(backbone)
    return None if enum is None else enum.IMAGENET1K_V1.url


def imagenet_weights_file(backbone: str) -> Optional[Path]:
    """Where torchvision keeps the ImageNet weights of ``backbone`` (torch hub cache), or None."""
    url = _imagenet_url(backbone)
    if url is None:
        return None
    name = os.path.basename(urllib.parse.urlparse(url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def _reachable(url: str) -> bool:
    """A quick probe, so an offline machine falls back in seconds instead of hanging."""
    return network_status(url) == "online"


def _download_iter(url: str, target: Path) -> Generator[Progress, None, None]:
    """Download ``url`` to ``target`` atomically, checking torchvision's hash prefix."""
    match = re.search(r"-([a-f0-9]{6,})\.", target.name)
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
        total = int(response.headers.get("Content-Length") or 0)
        done = 0
        with atomic_write(target) as tmp, open(tmp, "wb") as handle:
            while True:
                chunk = response.read(1 << 20)
                if not chunk:
                    break
                handle.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                yield Progress("download", done >> 20, max(1, total >> 20),
                               f"downloading ImageNet weights ({done >> 20} MiB)")
            if match and not digest.hexdigest().startswith(match.group(1)):
                raise ModelLoadError(f"The download of {url} is corrupt (hash mismatch); retry.")


def read_state_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a tensors-only PyTorch file (never a full pickle)."""
    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"Backbone weights file not found: {p}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(
            f"Cannot read backbone weights {p} as a tensors-only state dict ({exc}); "
            "use .safetensors or a plain torch state dict."
        ) from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelLoadError(f"{p} does not hold a state dict.")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def load_backbone_state(net: StudentNet, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ImageNet classification weights into the student's backbone.

    torchvision's segmentation backbones hold the classification network's layers under the
    same names, except MobileNet's ``features.`` prefix; the classifier (``fc``) is unused.
    """
    target = net.backbone.state_dict()
    mapped = {}
    for key, value in state.items():
        name = key[len("features."):] if key.startswith("features.") else key
        name = name[len("backbone."):] if name.startswith("backbone.") else name
        if name in target:
            mapped[name] = value
    missing = [k for k in target if k not in mapped and not k.endswith("num_batches_tracked")]
    if missing:
        raise ModelLoadError(
            f"{source} does not fit this backbone ({len(missing)} of {len(target)} tensors "
            f"missing, e.g. {missing[0]!r}); pass weights of the same architecture."
        )
    for name, value in mapped.items():
        if value.shape != target[name].shape:
            raise ModelLoadError(
                f"{source}: tensor {name!r} has shape {tuple(value.shape)}, the backbone expects "
                f"{tuple(target[name].shape)}."
            )
    net.backbone.load_state_dict(mapped, strict=False)


def backbone_weights_iter(
    backbone: str, request: str = "auto"
) -> Generator[Progress, None, tuple[Optional[dict[str, torch.Tensor]], str]]:
    """Find the backbone's initial weights; returns ``(state dict or None, description)``.

    ``request``: ``auto`` (ImageNet from the torch hub cache, else downloaded if the host answers
    within seconds, else random - and the description says so), ``imagenet`` (the same, but an
    error instead of random weights), ``random``, or the path of a state-dict file.
    """
    if request == "random":
        return None, "random initialisation (asked for)"
    if request not in ("auto", "imagenet"):
        state = read_state_file(request)
        return state, f"from {request}"
    url = _imagenet_url(backbone)
    if url is None:
        if request == "imagenet":
            raise WeightsUnavailableError(f"There are no ImageNet weights for the {backbone!r} backbone.")
        return None, f"random initialisation (no ImageNet weights exist for {backbone!r})"
    path = imagenet_weights_file(backbone)
    assert path is not None
    if not path.is_file():
        reason = None
        if not _reachable(url):
            reason = f"{urllib.parse.urlparse(url).hostname} is unreachable (offline?)"
        else:
            try:
                yield from _download_iter(url, path)
            except (OSError, urllib.error.URLError, ModelLoadError) as exc:
                reason = f"the download failed ({exc})"
        if reason is not None:
            hint = (f"ImageNet weights for {backbone} are not in {path.parent} and {reason}; "
                    f"copy {os.path.basename(path)} from {url} there, or pass a state-dict file")
            if request == "imagenet":
                raise WeightsUnavailableError(hint + ".")
            return None, f"random initialisation ({hint})"
    state = read_state_file(path)
    return state, f"ImageNet (torchvision, {path.name})"
