"""The engine's messages in the widget's words: its boxes and buttons, not the CLI's options.

The engine's errors tell the user what to do with the command line (``--model demo``,
``--pretrained FILE``). In the dock the same advice names the controls the user has there.
Qt-free.
"""

from __future__ import annotations

from ..errors import WeightsUnavailableError

__all__ = ["in_widget_terms"]


def in_widget_terms(exc: BaseException, *, model_box: str = "model box",
                    weights_box: str = "weights box") -> BaseException:
    """``exc``, or an error of the same type whose message names the panel's controls
    (``model_box`` and ``weights_box``, e.g. "teacher model box") instead of CLI options."""
    if isinstance(exc, WeightsUnavailableError) and exc.model and exc.tag and exc.reason:
        cache = f" ({exc.cache})" if exc.cache else ""
        message = (
            f"The '{exc.tag}' weights of {exc.model} are not cached and {exc.reason}. Choose "
            f"'demo' in the {model_box} (the tiny offline model), or a local checkpoint of "
            f"{exc.model} with the '...' button beside the {weights_box} (an open_clip state dict, "
            f".safetensors or OpenAI's .pt, downloaded elsewhere); or copy the weights "
            f"cache{cache} from a machine with internet."
        )
        reworded = WeightsUnavailableError(message, model=exc.model, tag=exc.tag,
                                           reason=exc.reason, cache=exc.cache)
        reworded.__cause__ = exc
        return reworded
    return exc
