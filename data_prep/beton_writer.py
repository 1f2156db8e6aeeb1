"""A .beton writer that lays records out in a fixed order, so a conversion is byte-for-byte
reproducible whatever the number of workers.

ffcv's DatasetWriter lets each worker process claim pages as it goes, so where a record lands (and
how many half-empty last pages there are) depends on scheduling and on the worker count. Here the
workers only encode; this one writer appends the records in the order it is given them and writes
the same file ffcv would read: header, field table, metadata table, zero padding to the first page,
page-aligned pages (a record never crosses a page), the allocation table, then the final header.

Records may be added in any order (a --subset adds a round-robin selection): each carries its
sample index, and the metadata and allocation tables are sorted by it when the file is finished.
"""
from __future__ import annotations

import numpy as np
from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, FieldDescType, HeaderType, TYPE_ID_HANDLER, \
    get_metadata_type

from dwnet.data.beton_format import IMAGE, LABEL, field_classes, written_column

from .encode import Encoded

FIELDS = field_classes()  # name -> ffcv field class, in file order: what the loaders and `verify` expect
_IMAGE_COLUMN, _LABEL_COLUMN = written_column(IMAGE), written_column(LABEL)


class BetonWriter:
    """Writes up to `capacity` samples to `path` (truncated first). Use as a context manager, call
    `add()` per sample and `finish()` once; raises OSError as it meets them."""

    def __init__(self, path: str, capacity: int, page_size: int) -> None:
        self.path = path
        self.page_size = page_size
        self.metadata_type = get_metadata_type([field() for field in FIELDS.values()])
        self.metadata = np.zeros(capacity, dtype=self.metadata_type)
        self.order = np.zeros(capacity, dtype=np.int64)   # sample index of each added record
        self.allocations = np.zeros(capacity, dtype=ALLOC_TABLE_TYPE)
        self.count = 0
        self.metadata_start = HeaderType.itemsize + len(FIELDS) * FieldDescType.itemsize
        metadata_end = self.metadata_start + capacity * self.metadata_type.itemsize
        self.data_start = -(-metadata_end // page_size) * page_size  # ffcv: pages are page-aligned
        self.page = np.zeros(page_size, dtype=np.uint8)
        self.page_index = 0
        self.page_used = 0
        self.fh = None

    def __enter__(self) -> BetonWriter:
        self.fh = open(self.path, "wb")
        self.fh.truncate(self.data_start)  # header and tables are written by finish(); zeros until then
        self.fh.seek(self.data_start)
        return self

    def __exit__(self, *exc) -> None:
        self.fh.close()

    def add(self, sample_index: int, label: int, record: Encoded) -> None:
        size = len(record.data)
        if size > self.page_size:
            raise ValueError(f"a {size}-byte record does not fit a {self.page_size}-byte page")
        if self.page_used + size > self.page_size:
            self._flush_page()
        ptr = self.data_start + self.page_index * self.page_size + self.page_used
        self.page[self.page_used:self.page_used + size] = np.frombuffer(record.data, dtype=np.uint8)
        self.page_used += size
        image, i = self.metadata[_IMAGE_COLUMN], self.count
        image["mode"][i], image["width"][i], image["height"][i] = record.mode, record.stored_width, record.stored_height
        image["data_ptr"][i] = ptr
        self.metadata[_LABEL_COLUMN][i] = label
        self.allocations[self.count] = (0, ptr, size)
        self.order[self.count] = sample_index
        self.count += 1

    def _flush_page(self) -> None:
        if self.page_used:
            self.page[self.page_used:] = 0   # the unused tail (earlier pages' bytes must not leak into it)
            self.fh.write(self.page.data)     # whole pages, as ffcv's reader loads them
            self.page_index += 1
            self.page_used = 0

    def finish(self) -> int:
        """Writes the last page, the tables and the header; returns the sample count. (Not synced:
        the caller installs the file with `dwnet.atomic_io.install`, which does that.)"""
        self._flush_page()
        sort = np.argsort(self.order[:self.count], kind="stable")
        # reorder whole rows as bytes: a structured copy would leave the alignment padding uninitialised
        rows = self.metadata[:self.count].view(np.uint8).reshape(self.count, self.metadata_type.itemsize)
        metadata = rows[sort]
        allocations = self.allocations[:self.count][sort]
        allocations["sample_id"] = np.arange(self.count)
        alloc_ptr = self.fh.tell()
        self.fh.write(allocations.tobytes())
        header = np.zeros(1, dtype=HeaderType)[0]
        header["version"], header["num_fields"], header["page_size"] = CURRENT_VERSION, len(FIELDS), self.page_size
        header["num_samples"], header["alloc_table_ptr"] = self.count, alloc_ptr
        descriptors = np.zeros(len(FIELDS), dtype=FieldDescType)
        type_ids = {handler: type_id for type_id, handler in TYPE_ID_HANDLER.items()}
        for i, (name, handler) in enumerate(FIELDS.items()):
            descriptors[i]["type_id"] = type_ids[handler]
            descriptors[i]["name"][:len(name)] = np.frombuffer(name.encode("ascii"), dtype=np.uint8)
            descriptors[i]["arguments"][:] = handler().to_binary()[0]
        self.fh.seek(0)
        self.fh.write(header.tobytes() + descriptors.tobytes() + metadata.tobytes())
        self.fh.flush()
        return self.count
