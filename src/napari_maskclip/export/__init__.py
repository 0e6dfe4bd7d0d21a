"""Training data: export refined labels as a dataset folder, and read it back.

UI-free (no napari, no Qt, no torch). The widget's Export button, napari's Save for Labels layers
(``napari_maskclip.plugin.writer``), the ``napari-maskclip export`` command and the MaskCLIP+ student
all go through this package: :func:`read_dataset` is the single reader of the format described in
:mod:`napari_maskclip.export.layout`.
"""

from .class_table import DatasetClasses, read_class_table
from .layout import CLASSES_JSON, DATASET_JSON, ignore_index, mask_dtype, safe_sample_name
from .reader import Dataset, DatasetSample, is_dataset, read_dataset
from .remap import ClassMapping, plan_class_mapping
from .writer import (
    ExportReport,
    ExportSession,
    check_export_target,
    export_result,
    export_sample,
    export_sample_iter,
)

__all__ = [
    "Dataset",
    "DatasetSample",
    "DatasetClasses",
    "read_dataset",
    "export_sample",
    "export_sample_iter",
    "export_result",
    "check_export_target",
    "ExportReport",
    "ExportSession",
    "ClassMapping",
    "plan_class_mapping",
    "is_dataset",
    "read_class_table",
    "safe_sample_name",
    "ignore_index",
    "mask_dtype",
    "DATASET_JSON",
    "CLASSES_JSON",
]
