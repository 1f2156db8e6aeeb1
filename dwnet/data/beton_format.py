"""The .beton contract between `python -m data_prep` (writer, verify) and the loaders: which ffcv
fields a file holds, in which order, and how labels are read back; plus the label the val loader
gives its padding samples.

ffcv is imported only inside the functions that need it, so the metrics and the structural check
can use the names here without loading ffcv (and numba).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ffcv.reader import Reader

IMAGE, LABEL = "image", "label"
# field name -> ffcv field class name, in the order `data_prep convert` writes them (the metadata
# columns are f0, f1, ... in this order); the loaders and the structural check accept any order
FIELD_TYPES = {IMAGE: "RGBImageField", LABEL: "IntField"}

# Real labels are class indices (>= 0); ranks with fewer val samples than others pad with
# samples carrying this label, and the metrics drop them.
IGNORE_LABEL = -1


def field_classes() -> dict[str, type]:
    """FIELD_TYPES as ffcv field classes (for writing a file)."""
    import ffcv.fields

    return {name: getattr(ffcv.fields, type_name) for name, type_name in FIELD_TYPES.items()}


def written_column(name: str) -> str:
    """Metadata column of field `name` in a file this project writes (fixed field order)."""
    return f"f{list(FIELD_TYPES).index(name)}"


def metadata_column(reader: Reader, name: str) -> np.ndarray:
    """Per-sample metadata of field `name` in the file `reader` opened, whatever its field order."""
    return reader.metadata[f"f{reader.field_names.index(name)}"]


def read_labels(reader: Reader) -> np.ndarray:
    """Every sample's label, int64, in sample order (metadata only: no image data is read)."""
    return metadata_column(reader, LABEL).astype(np.int64)


def beton_labels(path: str) -> np.ndarray:
    """`read_labels` of the .beton at `path`."""
    from ffcv.reader import Reader

    return read_labels(Reader(path))
