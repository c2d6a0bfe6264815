"""A lean GGUF reader for loading models: metadata as plain Python values, tensor bytes read on demand.

gguf.GGUFReader (open_gguf, for everything else) keeps a memory map of the whole file and builds a numpy array
per metadata item: for a 49k-token vocabulary that is ~75 MiB of small objects, and every tensor read through
the map also counts its file pages in the process's resident memory while the model is copied out. Loading
needs neither. Here the header is parsed once from a temporary map, metadata values are plain str/int/float/
lists, and `tensor.data` reads that tensor's bytes from the file into a fresh array (never a map), shaped as
GGUFReader shapes it: elements for float/int types, bytes per row for quantized ones.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGMLQuantizationType

# GGUFValueType -> struct format of a scalar (8 = string, 9 = array are read by hand)
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
ITEM_DTYPES = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
               GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
               GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
               GGMLQuantizationType.I64: np.int64}


class Truncated(Exception):
    """The file ends before the bytes its header promises."""

    def __init__(self, end: int):
        self.end = end


class Field:
    """One metadata item; contents() gives its value, as GGUFReader's fields do."""

    __slots__ = ("name", "value")

    def __init__(self, name: str, value):
        self.name, self.value = name, value

    def contents(self):
        return self.value


class Tensor:
    """One tensor's index entry. shape is GGUF's (fastest dimension first); data reads the bytes from the file."""

    __slots__ = ("path", "name", "tensor_type", "shape", "n_elements", "n_bytes", "data_offset")

    def __init__(self, path, name, tensor_type, shape, data_offset):
        block, type_size = GGML_QUANT_SIZES[tensor_type]
        self.path, self.name, self.tensor_type, self.shape = path, name, tensor_type, shape
        self.n_elements = int(np.prod(shape))
        self.n_bytes = self.n_elements * type_size // block
        self.data_offset = data_offset

    @property
    def data(self) -> np.ndarray:
        """The tensor's bytes as a new writable array (no memory map): (rows..., columns) of its element type,
        or (rows..., bytes per row) uint8 for a quantized type."""
        rows = tuple(reversed(self.shape))
        dtype = ITEM_DTYPES.get(self.tensor_type)
        if dtype is None:
            block, type_size = GGML_QUANT_SIZES[self.tensor_type]
            dtype, rows = np.uint8, (*rows[:-1], rows[-1] // block * type_size)
        count = self.n_bytes // np.dtype(dtype).itemsize
        return np.fromfile(self.path, dtype=dtype, count=count, offset=self.data_offset).reshape(rows)


class GGUFFile:
    """`fields` (name -> Field) and `tensors` (list of Tensor) of a little-endian GGUF v2/v3 file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        if size < 24:
            raise Truncated(24)
        with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            self._mm, self._pos = mm, 0
            try:
                self._parse(size)
            finally:
                self._mm = None

    def _parse(self, size: int) -> None:
        magic, version = self._unpack("<I"), self._unpack("<I")
        if magic != GGUF_MAGIC:
            raise ValueError("no GGUF magic number at the start")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported (2 and 3 are; a big-endian file?)")
        n_tensors, n_fields = self._unpack("<Q"), self._unpack("<Q")
        self.fields = {}
        for _ in range(n_fields):
            name = self._string()
            self.fields[name] = Field(name, self._value(self._unpack("<I")))
        index = []
        for _ in range(n_tensors):
            name = self._string()
            dims = [self._unpack("<Q") for _ in range(self._unpack("<I"))]
            index.append((name, GGMLQuantizationType(self._unpack("<I")), tuple(dims), self._unpack("<Q")))
        alignment = int(self.fields["general.alignment"].value) if "general.alignment" in self.fields \
            else GGUF_DEFAULT_ALIGNMENT
        start = -(-self._pos // alignment) * alignment
        self.tensors = [Tensor(self.path, name, kind, dims, start + offset) for name, kind, dims, offset in index]
        if len({t.name for t in self.tensors}) != len(self.tensors):
            raise ValueError("duplicated tensor names")
        for t in self.tensors:
            if t.data_offset + t.n_bytes > size:
                raise Truncated(t.data_offset + t.n_bytes)

    def _need(self, n: int) -> int:
        start, self._pos = self._pos, self._pos + n
        if self._pos > len(self._mm):
            raise Truncated(self._pos)
        return start

    def _unpack(self, fmt: str):
        return struct.unpack_from(fmt, self._mm, self._need(struct.calcsize(fmt)))[0]

    def _string(self) -> str:
        n = self._unpack("<Q")
        start = self._need(n)
        return self._mm[start:start + n].decode("utf-8")

    def _value(self, kind: int):
        if kind == 8:
            return self._string()
        if kind != 9:
            return self._unpack(SCALARS[kind])
        item, n = self._unpack("<I"), self._unpack("<Q")
        if item == 8:  # strings, e.g. a vocabulary and its merges (100k): one loop here, not three calls per string
            mm, pos, out = self._mm, self._pos, []
            for _ in range(n):
                size = int.from_bytes(mm[pos:pos + 8], "little")
                out.append(mm[pos + 8:pos + 8 + size].decode("utf-8"))
                pos += 8 + size
            if pos > len(mm):
                raise Truncated(pos)
            self._pos = pos
            return out
        if item == 9:
            return [self._value(item) for _ in range(n)]
        dtype = np.dtype(SCALARS[item])
        start = self._need(n * dtype.itemsize)
        return np.frombuffer(self._mm, dtype=dtype, count=n, offset=start).tolist()
