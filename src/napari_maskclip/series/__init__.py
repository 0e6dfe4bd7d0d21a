"""The image-series annotator's core: a folder of images annotated into a dataset, one image at a
time, with the model's labels prepared in the background.

UI-free (no napari, no Qt). :mod:`.listing` lists and names the images, :mod:`.session` knows what
is saved and saves through the exporter, :mod:`.predictor` labels an image (MaskCLIP or a
student) and :mod:`.prefetch` does that for the next image on one background thread. Importing
this package loads neither torch nor open_clip (the predictor and prefetcher load on use).
"""

from .listing import IMAGE_SUFFIXES, ImageList, list_images, natural_key, sample_name
from .session import SeriesSession, SeriesStatus

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageList",
    "list_images",
    "natural_key",
    "sample_name",
    "SeriesSession",
    "SeriesStatus",
]
