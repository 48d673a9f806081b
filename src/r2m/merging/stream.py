"""Streaming access to tensors: the only place in `r2m.merging` that touches files.

A merge method never holds N full models: it asks a `TensorSource` for one key at a time
(across θ0 and all N specialists), and hands each merged tensor to a `Sink` as soon as it is
done. The same method runs on plain dicts (`DictSource` / `DictSink`, used by tests) and on
safetensors files (`SafetensorsSource` / `SafetensorsSink`, used by the CLI and the benchmark).

`SafetensorsSource` reads with `pread` into fresh buffers instead of memory-mapping: pages of a
mapped 1.2 GB file stay resident in the process once touched, so peak RSS would grow with N.
`SafetensorsSink` writes the header first (all shapes are known up front) and then each tensor
in order, so the merged model is never held in memory either.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Iterator, Mapping, Protocol, Sequence

import torch

from r2m.errors import CheckpointError, MergeError

# safetensors dtype codes <-> torch dtypes (the ones checkpoints use)
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_CODES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class TensorSource(Protocol):
    """Read-only, key-ordered access to one model's tensors, one key at a time."""

    name: str

    def keys(self) -> list[str]: ...

    def shape(self, key: str) -> tuple[int, ...]: ...

    def dtype(self, key: str) -> torch.dtype: ...

    def get(self, key: str) -> torch.Tensor: ...


class DictSource:
    """A state dict in memory seen as a `TensorSource` (tests, the selection helper)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], name: str):
        self.tensors = tensors
        self.name = name

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].dtype

    def get(self, key: str) -> torch.Tensor:
        return self.tensors[key].detach().cpu()


class SafetensorsSource:
    """A safetensors file read key by key with `pread` (no mmap, no pickle, header validated)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.name = str(path)
        if not self.path.is_file():
            raise CheckpointError(self.path, "no such checkpoint file")
        self._fd = os.open(self.path, os.O_RDONLY)
        self._entries, self._data_start = self._read_header()

    def _read_header(self) -> tuple[dict[str, dict], int]:
        size = os.fstat(self._fd).st_size
        head = os.pread(self._fd, 8, 0)
        if len(head) < 8:
            raise CheckpointError(self.path, "not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(self.path, f"not a safetensors file (header length {n} for {size} bytes)")
        try:
            header = json.loads(os.pread(self._fd, n, 8))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(self.path, f"not a safetensors file (header: {err})") from None
        if not isinstance(header, dict):
            raise CheckpointError(self.path, "not a safetensors file (header is not an object)")
        header.pop("__metadata__", None)
        data_start, data_size = 8 + n, size - 8 - n
        entries = {}
        for key, e in header.items():
            try:
                dtype = _DTYPES[e["dtype"]]
                shape = tuple(int(s) for s in e["shape"])
                begin, end = (int(o) for o in e["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(self.path, f"key '{key}': unsupported or malformed tensor entry {e!r}") from None
            numel = 1
            for s in shape:
                numel *= s
            if not (0 <= begin <= end <= data_size) or end - begin != numel * _itemsize(dtype):
                raise CheckpointError(self.path, f"key '{key}': data offsets {begin}..{end} do not fit {shape} {e['dtype']}")
            entries[key] = {"dtype": dtype, "shape": shape, "begin": begin, "end": end}
        return entries, data_start

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key]["shape"]

    def dtype(self, key: str) -> torch.dtype:
        return self._entries[key]["dtype"]

    def get(self, key: str) -> torch.Tensor:
        e = self._entries[key]
        buf = torch.empty(e["end"] - e["begin"], dtype=torch.uint8)
        self._pread(key, memoryview(buf.numpy()))
        return buf.view(e["dtype"]).reshape(e["shape"])

    def read_into(self, key: str, out: torch.Tensor) -> None:
        """pread one tensor straight into a contiguous buffer of the same dtype and size (no copy)."""
        e = self._entries[key]
        view = memoryview(out.numpy()).cast("B")
        if e["dtype"] != out.dtype or view.nbytes != e["end"] - e["begin"]:
            raise CheckpointError(self.path, f"key '{key}': cannot read {e['dtype']} {e['shape']} into {out.dtype} {tuple(out.shape)}")
        self._pread(key, view)

    def _pread(self, key: str, view: memoryview) -> None:
        e = self._entries[key]
        done, nbytes = 0, e["end"] - e["begin"]
        while done < nbytes:  # pread may return short reads on large requests
            got = os.preadv(self._fd, [view[done:]], self._data_start + e["begin"] + done)
            if got <= 0:
                raise CheckpointError(self.path, f"key '{key}': file truncated")
            done += got

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def as_source(model: TensorSource | Mapping[str, torch.Tensor] | Path | str, name: str) -> TensorSource:
    """A `TensorSource` for a dict, a safetensors path, or an existing source."""
    if isinstance(model, (str, Path)):
        return SafetensorsSource(model)
    if isinstance(model, Mapping):
        return DictSource(model, name)
    return model


class Sink(Protocol):
    """Receives merged tensors in plan order, casting each to its declared dtype."""

    def put(self, key: str, tensor: torch.Tensor) -> None: ...

    def patch(self, key: str, flat_index: torch.Tensor, values: torch.Tensor) -> None: ...


class DictSink:
    """Collects the merged state dict in memory (key order = plan order)."""

    def __init__(self, layout: Sequence[tuple[str, tuple[int, ...], torch.dtype]]):
        self.layout = {k: (shape, dtype) for k, shape, dtype in layout}
        self.tensors: dict[str, torch.Tensor] = {}

    def put(self, key: str, tensor: torch.Tensor) -> None:
        shape, dtype = self.layout[key]
        self.tensors[key] = tensor.detach().to("cpu", dtype).reshape(shape).clone()

    def patch(self, key: str, flat_index: torch.Tensor, values: torch.Tensor) -> None:
        t = self.tensors[key]
        t.view(-1)[flat_index] = values.to(t.dtype)


class SafetensorsSink:
    """Streams a safetensors file: header first (from the layout), then tensors in order."""

    def __init__(self, path: Path | str, layout: Sequence[tuple[str, tuple[int, ...], torch.dtype]], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        header: dict[str, dict] = {"__metadata__": dict(metadata or {"format": "pt"})}
        self._offsets: dict[str, tuple[int, torch.dtype, tuple[int, ...]]] = {}
        offset = 0
        for key, shape, dtype in layout:
            numel = 1
            for s in shape:
                numel *= s
            nbytes = numel * _itemsize(dtype)
            header[key] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._offsets[key] = (offset, dtype, tuple(shape))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data start aligned to 8 bytes, like safetensors itself
        self._data_start = 8 + len(raw)
        self._order = [k for k, _, _ in layout]
        self._next = 0
        self._fh = open(self.path, "wb")
        self._fh.write(struct.pack("<Q", len(raw)) + raw)

    def put(self, key: str, tensor: torch.Tensor) -> None:
        expected = self._order[self._next] if self._next < len(self._order) else None
        if key != expected:
            raise MergeError(f"{self.path}: tensors must arrive in layout order (got '{key}', expected '{expected}')")
        _, dtype, shape = self._offsets[key]
        self._fh.write(_as_bytes(tensor.detach().to("cpu", dtype).reshape(shape)))
        self._next += 1

    def patch(self, key: str, flat_index: torch.Tensor, values: torch.Tensor) -> None:
        offset, dtype, _ = self._offsets[key]
        size = _itemsize(dtype)
        vals = values.to(dtype)
        self._fh.flush()
        for i, v in zip(flat_index.tolist(), vals.split(1)):
            self._fh.seek(self._data_start + offset + i * size)
            self._fh.write(_as_bytes(v))
        self._fh.seek(0, os.SEEK_END)

    def close(self) -> None:
        if self._next != len(self._order):
            raise MergeError(f"{self.path}: only {self._next} of {len(self._order)} tensors were written")
        self._fh.close()

    def abort(self) -> None:
        self._fh.close()


def _as_bytes(t: torch.Tensor) -> memoryview:
    if t.numel() == 0:
        return memoryview(b"")
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return memoryview(t.numpy()).cast("B")


class Scratch(Protocol):
    """Sequential scratch storage for tensors a later pass replays in the same order."""

    def append(self, tensors: list[torch.Tensor]) -> None: ...

    def replay(self) -> Iterator[list[torch.Tensor]]: ...


class MemoryScratch:
    """Scratch held in memory (small models, tests)."""

    def __init__(self):
        self._items: list[list[torch.Tensor]] = []

    def append(self, tensors: list[torch.Tensor]) -> None:
        self._items.append([t.detach().cpu() for t in tensors])

    def replay(self) -> Iterator[list[torch.Tensor]]:
        yield from self._items

    def close(self) -> None:
        self._items.clear()


class DiskScratch:
    """Scratch spilled to one temporary file (large models): RSS stays flat, reads come back in order."""

    def __init__(self, directory: Path | str | None = None):
        self.directory = directory
        fd, name = tempfile.mkstemp(prefix=".r2m-scratch-", suffix=".bin", dir=directory)
        self._fh = os.fdopen(fd, "w+b")
        self._path = Path(name)
        self._index: list[list[tuple[int, torch.dtype, tuple[int, ...]]]] = []
        self._offset = 0

    def append(self, tensors: list[torch.Tensor]) -> None:
        entry = []
        for t in tensors:
            t = t.detach().cpu().contiguous()
            data = _as_bytes(t)
            self._fh.write(data)
            entry.append((self._offset, t.dtype, tuple(t.shape)))
            self._offset += data.nbytes
        self._index.append(entry)

    def replay(self) -> Iterator[list[torch.Tensor]]:
        self._fh.flush()
        fd = self._fh.fileno()
        for entry in self._index:
            out = []
            for offset, dtype, shape in entry:
                numel = 1
                for s in shape:
                    numel *= s
                buf = torch.empty(numel * _itemsize(dtype), dtype=torch.uint8)
                if numel:
                    os.preadv(fd, [memoryview(buf.numpy())], offset)
                out.append(buf.view(dtype).reshape(shape))
            yield out

    def close(self) -> None:
        self._fh.close()
        self._path.unlink(missing_ok=True)
