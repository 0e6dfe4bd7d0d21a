"""open_clip pretrained tags as local files: the cache first, then a download after a quick probe.

open_clip downloads a tag's weights on every load attempt, through the Hugging Face client, which
re-checks even cached files online and, behind a firewall, retries for about a minute while
printing raw warnings. Here a tag is resolved without the network whenever its file is already in
Hugging Face's or open_clip's cache; otherwise the host is probed first (a few seconds,
:mod:`napari_maskclip.online`) and offline machines get one clear error at once, as do machines
where ``NAPARI_MASKCLIP_OFFLINE=1`` or ``HF_HUB_OFFLINE=1`` forbids downloads.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

from ..errors import WeightsUnavailableError
from ..online import network_status, offline_requested
from .cache_dir import weights_cache_hint

__all__ = ["cached_pretrained_file", "pretrained_file", "quiet_hub"]

_REASON_CHARS = 160


@contextlib.contextmanager
def quiet_hub() -> Iterator[None]:
    """Silence Hugging Face's and open_clip's warnings (retries, mismatches) while loading."""
    loggers = [logging.getLogger(), logging.getLogger("huggingface_hub"), logging.getLogger("open_clip")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.level, logging.ERROR))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _hf_candidates(hf_hub: str) -> tuple[str, list[str]]:
    """(repo id, file names in open_clip's order of preference) of a tag's ``hf_hub`` entry."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    repo_id, filename = os.path.split(hf_hub)
    filename = filename or HF_WEIGHTS_NAME
    names = []
    if filename == HF_WEIGHTS_NAME:
        names.append(HF_SAFE_WEIGHTS_NAME)
    elif filename.endswith((".bin", ".pth")):
        names.append(filename[:-4] + ".safetensors")
    return repo_id, names + [filename]


def cached_pretrained_file(tag_cfg: dict[str, Any], cache_dir: Optional[str] = None) -> Optional[Path]:
    """The tag's weights file if a cache already holds it (never touches the network)."""
    if tag_cfg.get("file"):
        path = Path(tag_cfg["file"]).expanduser()
        return path if path.is_file() else None
    if tag_cfg.get("hf_hub"):
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover - open_clip depends on it
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            repo_id, names = _hf_candidates(tag_cfg["hf_hub"])
            for name in names:
                found = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
                if isinstance(found, str) and os.path.isfile(found):
                    return Path(found)
    url = tag_cfg.get("url")
    if url:
        path = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if path.is_file() and _url_file_intact(url, path):
            return path
    return None


def _url_file_intact(url: str, path: Path) -> bool:
    """open_clip's check of a URL download: the SHA-256 prefix the URL carries, if any (open_clip
    writes in place, so an interrupted download leaves a truncated file)."""
    name = os.path.basename(url)
    if "openaipublic" in url:
        expected = url.split("/")[-2]
    elif "mlfoundations" in url:
        expected = os.path.splitext(name)[0].split("-")[-1]
    else:
        return True
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest().startswith(expected)


def _download_host(tag_cfg: dict[str, Any]) -> str:
    if tag_cfg.get("hf_hub"):
        from huggingface_hub import constants

        return constants.ENDPOINT
    return str(tag_cfg.get("url", ""))


def _short(exc: BaseException) -> str:
    """An exception's first line, cut at a word boundary (never mid-word)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) > _REASON_CHARS:
        text = text[:_REASON_CHARS].rsplit(" ", 1)[0] + " ..."
    return text


def _unavailable(name: str, tag: str, reason: str, cache_dir: Optional[str]) -> WeightsUnavailableError:
    cache = cache_dir or weights_cache_hint()
    return WeightsUnavailableError(
        f"The '{tag}' weights of {name} are not cached and {reason}. Use --model demo (the tiny "
        f"offline model), or pass a local checkpoint: --pretrained /path/to/{name}.safetensors "
        f"(open_clip state dict, .safetensors or OpenAI's .pt, downloaded elsewhere); or copy the "
        f"weights cache ({cache}) from a machine with internet.",
        model=name, tag=tag, reason=reason, cache=str(cache),
    )


def pretrained_file(name: str, tag: str, tag_cfg: dict[str, Any], cache_dir: Optional[str] = None) -> Path:
    """The local weights file of open_clip tag ``tag`` of model ``name``: cached, or downloaded
    once the host answers a quick probe. Raises :class:`WeightsUnavailableError` in one line."""
    cached = cached_pretrained_file(tag_cfg, cache_dir)
    if cached is not None:
        return cached
    switch = offline_requested()
    if switch:
        raise _unavailable(name, tag, f"downloads are off ({switch})", cache_dir)
    host = _download_host(tag_cfg)
    status = network_status(host)
    if status != "online":
        shown = host.split("//", 1)[-1].split("/", 1)[0] or "the download server"
        raise _unavailable(name, tag, f"{shown} is not reachable (offline or behind a firewall?)",
                           cache_dir)
    from open_clip.pretrained import download_pretrained

    try:
        with quiet_hub():
            path = download_pretrained(tag_cfg, cache_dir=cache_dir)
    except Exception as exc:  # network errors come in many types; all mean "not available"
        raise _unavailable(name, tag, f"the download failed ({type(exc).__name__}: {_short(exc)})",
                           cache_dir) from exc
    if not path or not os.path.isfile(path):
        raise _unavailable(name, tag, "the download gave no file", cache_dir)
    return Path(path)
