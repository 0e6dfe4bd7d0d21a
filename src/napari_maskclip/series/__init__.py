"""The image-series annotator's core: a folder of images annotated into a dataset, one image at a
time, with the model's labels prepared in the background.

UI-free (no napari, no Qt). :mod:`.listing` lists and names the images, :mod:`.session` knows what
is saved and saves through the exporter, :mod:`.predictor` labels an image (MaskCLIP or a
student) and :mod:`.prefetch` does that for the next image on one background thread. Importing
this package loads neither torch nor open_clip (the predictor and prefetcher load on use).

Example (what the series page does, without napari)::

    from napari_maskclip.series import SeriesSession, list_images
    from napari_maskclip.series.predictor import SeriesPredictor
    from napari_maskclip.series.prefetch import Prefetcher

    session = SeriesSession.open(list_images("photos/", recursive=True), "my_dataset", "cat, dog")
    predictor = SeriesPredictor.teacher("demo", "cat, dog")  # or SeriesPredictor.student("s.safetensors", "cat, dog")
    with Prefetcher(session, predictor) as prefetch:
        i = session.first_unsaved()                 # resume
        while i is not None and i < len(session):
            shown = prefetch.result(i)              # saved labels if saved, else the model's
            nxt = session.next_index(i)
            if nxt is not None:
                prefetch.request(nxt)               # labelled while the person edits image i
            labels, edited = shown.labels, None     # ... a person edits here ...
            session.save(i, shown.image, labels, probabilities=shown.probabilities,
                         edited=edited, provenance=shown.provenance)   # or reviewed=True
            print(session.status().line(predictor.label))
            i = nxt
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
