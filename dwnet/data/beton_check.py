"""The structural check of a .beton file (header, format version, field table, metadata and
allocation tables against the file size), shared by `python -m data_prep verify` and the training
preflight.

ffcv's Reader trusts the header: a file cut short by an interrupted copy fails much later with
`negative dimensions are not allowed` or reads fewer records without complaint, and a foreign file
fails with `file format mismatch`; neither names the file. This check reads only the header and the
tables (no image data), so every rank can afford it at start-up.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from dwnet.errors import DataError

from .beton_format import FIELD_TYPES


class BetonError(DataError):
    """The file is missing, foreign or damaged; the message is one line: file, problem, fix."""


@dataclass
class BetonLayout:
    path: str
    size: int
    num_samples: int
    alloc_table_ptr: int
    fields: dict[str, str]        # field name -> ffcv field class name


def check_structure(path: str, fix: str = "re-copy it or re-run the conversion") -> BetonLayout:
    """Validates the layout of `path` against its size; raises BetonError '<path>: <problem>; <fix>'."""
    from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, FieldDescType, HeaderType, get_handlers, \
        get_metadata_type

    def fail(problem: str) -> BetonError:
        return BetonError(f"{path}: {problem}; {fix}")

    if not os.path.exists(path):
        raise BetonError(f"{path}: no such file; fix the path or convert the data with `python -m data_prep convert`")
    if not os.path.isfile(path):
        raise BetonError(f"{path}: not a regular file; point it at the .beton written by `python -m data_prep convert`")
    try:
        size = os.path.getsize(path)
        if size < HeaderType.itemsize:
            raise fail(f"{size} bytes is too short for an ffcv header (truncated, or not a .beton)")
        header = np.fromfile(path, dtype=HeaderType, count=1)[0]
        if int(header["version"]) != CURRENT_VERSION:
            raise fail(f"not an ffcv .beton (format version {int(header['version'])}, expected {CURRENT_VERSION})")
        num_samples, num_fields = int(header["num_samples"]), int(header["num_fields"])
        if not 0 < num_fields <= 64:
            raise fail(f"header declares {num_fields} fields; the header is damaged")
        descriptors_end = HeaderType.itemsize + num_fields * FieldDescType.itemsize
        if size < descriptors_end:
            raise fail(f"truncated inside the field table ({size} bytes)")
        descriptors = np.fromfile(path, dtype=FieldDescType, count=num_fields, offset=HeaderType.itemsize)
        try:
            handlers = get_handlers(descriptors)
            metadata_type = get_metadata_type(handlers)
        except Exception as err:  # noqa: BLE001  unknown field type ids: the table is damaged
            raise fail(f"damaged field table ({type(err).__name__}: {err})") from None
        names = [bytes(d["name"]).rstrip(b"\0").decode("ascii", "replace") for d in descriptors]
        fields = {name: type(handler).__name__ for name, handler in zip(names, handlers)}
        metadata_end = descriptors_end + num_samples * metadata_type.itemsize
        if size < metadata_end:
            raise fail(f"truncated: the header promises {num_samples} samples but the metadata table is cut "
                       f"short ({size} bytes)")
        alloc_ptr = int(header["alloc_table_ptr"])
        if alloc_ptr < metadata_end or alloc_ptr > size or (size - alloc_ptr) % ALLOC_TABLE_TYPE.itemsize:
            raise fail(f"truncated or damaged: the allocation table at byte {alloc_ptr} does not fit "
                       f"a {size}-byte file")
        table = np.fromfile(path, dtype=ALLOC_TABLE_TYPE, offset=alloc_ptr)
        if len(table) and int((table["ptr"] + table["size"]).max()) > alloc_ptr:
            raise fail("damaged: records point past the data region")
    except OSError as err:
        raise BetonError(f"{path}: cannot read it ({err.strerror or err}); check the file's permissions and "
                         "storage") from None
    if {name: fields.get(name) for name in FIELD_TYPES} != FIELD_TYPES:
        expected = " and ".join(f"{name} ({type_name})" for name, type_name in FIELD_TYPES.items())
        raise BetonError(f"{path}: fields are {fields}; expected {expected} as written by "
                         "`python -m data_prep convert`")
    if num_samples == 0:
        raise BetonError(f"{path}: holds 0 samples; convert a non-empty tree with `python -m data_prep convert`")
    return BetonLayout(path, size, num_samples, alloc_ptr, fields)
