"""napari-maskclip: open-vocabulary dense labels from a frozen CLIP model (MaskCLIP), in napari.

The package root stays light on purpose: importing it loads neither torch nor Qt. The UI-free core
lives in :mod:`napari_maskclip.engine`, :mod:`napari_maskclip.export` and
:mod:`napari_maskclip.student`; everything napari-specific lives in :mod:`napari_maskclip.plugin`.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
