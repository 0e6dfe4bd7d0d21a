"""Is the network there? A quick probe before any download, so offline machines fail in seconds.

Behind a firewall a download does not fail, it hangs: the Hugging Face client retries for about a
minute before giving up. Every download in the project (CLIP weights, the student's ImageNet
backbones) first asks :func:`network_status` for the host: a TCP connect with a short timeout,
bounded as a whole (name resolution included) by running it in a daemon thread.

``NAPARI_MASKCLIP_OFFLINE=1`` (or Hugging Face's own ``HF_HUB_OFFLINE=1``) skips the probe: no
download is attempted at all. Torch-free, napari-free.
"""

from __future__ import annotations

import os
import socket
import threading
import urllib.parse
from typing import Literal, Optional

__all__ = [
    "OFFLINE_ENV",
    "PROBE_TIMEOUT_S",
    "NetworkStatus",
    "offline_requested",
    "network_status",
    "probe_host",
]

#: Environment variable that forbids any download attempt (tests, air-gapped machines).
OFFLINE_ENV = "NAPARI_MASKCLIP_OFFLINE"
#: Hugging Face's own switch; honoured too (it also makes huggingface_hub skip the network).
HF_OFFLINE_ENV = "HF_HUB_OFFLINE"
PROBE_TIMEOUT_S = 3.0

NetworkStatus = Literal["online", "offline", "disabled"]

_FALSE = {"", "0", "false", "no", "off"}


def offline_requested() -> Optional[str]:
    """The variable that forbids downloads (``"NAPARI_MASKCLIP_OFFLINE=1"``...), or None."""
    for name in (OFFLINE_ENV, HF_OFFLINE_ENV):
        value = os.environ.get(name, "").strip()
        if value.lower() not in _FALSE:
            return f"{name}={value}"
    return None


def probe_host(host: str, port: int = 443, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``host:port`` opens within ``timeout`` seconds (in total)."""
    result: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    worker = threading.Thread(target=attempt, name=f"probe-{host}", daemon=True)
    worker.start()
    worker.join(timeout)  # name resolution can hang longer than the socket timeout
    return bool(result and result[0])


def network_status(url: str, timeout: float = PROBE_TIMEOUT_S) -> NetworkStatus:
    """``disabled`` (offline mode asked for), ``online`` (``url``'s host answers) or ``offline``."""
    if offline_requested():
        return "disabled"
    parts = urllib.parse.urlparse(url if "//" in url else f"https://{url}")
    if not parts.hostname:
        return "offline"
    port = parts.port or (80 if parts.scheme == "http" else 443)
    return "online" if probe_host(parts.hostname, port, timeout) else "offline"
