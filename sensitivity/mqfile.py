"""The multiquantizer file format, readable without torch: safetensors I/O and the JSON manifest.

One safetensors file; tensors ``<layer>/<option>/codes`` (bit-packed uint8) and
``<layer>/<option>/<param>``; the manifest sits in the safetensors metadata under
``"sensitivity.manifest"``. :func:`read_manifest` validates it (format, hash, every tensor present);
:mod:`sensitivity.multiquantizer` builds, loads and applies these files (and imports torch), while
``sensitivity info`` needs only this module (numpy, no torch).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .errors import CorruptFileError, SensitivityError

FORMAT = "sensitivity.multiquantizer/1"
MANIFEST_KEY = "sensitivity.manifest"
_DTYPES = {"U8": np.uint8, "F16": np.float16, "F32": np.float32, "I32": np.int32}
_NP_TO_ST = {np.dtype(np.uint8): "U8", np.dtype(np.float16): "F16", np.dtype(np.float32): "F32"}


# --------------------------------------------------------------------------------------------------
# safetensors I/O (streaming writer, so the final file never needs all tensors in memory)
# --------------------------------------------------------------------------------------------------
class _Lazy:
    """A tensor of a part file, read only when written out (keeps assembly memory small)."""

    def __init__(self, reader: "_SafetensorsReader", name: str):
        info = reader.header[name]
        self.reader, self.name = reader, name
        self.dtype = np.dtype(_DTYPES[info["dtype"]])
        self.shape = tuple(info["shape"])
        self.nbytes = info["data_offsets"][1] - info["data_offsets"][0]

    def load(self) -> np.ndarray:
        return self.reader.get(self.name)


def _write_safetensors(path: Path, tensors: Sequence[Tuple[str, Any]], metadata: Dict[str, str]) -> None:
    """Write a safetensors file from ``(name, array or _Lazy)`` pairs, streaming lazy arrays."""
    header: Dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, arr in tensors:
        n = int(arr.nbytes)
        header[name] = {"dtype": _NP_TO_ST[np.dtype(arr.dtype)], "shape": list(arr.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * ((8 - len(blob) % 8) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for _, arr in tensors:
            data = arr.load() if isinstance(arr, _Lazy) else arr
            fh.write(np.ascontiguousarray(data).tobytes())
        fh.flush()
        os.fsync(fh.fileno())


class _SafetensorsReader:
    """Minimal lazy reader: header on open, one tensor per ``get`` (memory-mapped file)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as fh:
                raw = fh.read(8)
                if len(raw) < 8:
                    raise ValueError("file shorter than its header")
                (n,) = struct.unpack("<Q", raw)
                if n > size - 8 or n > 1 << 30:
                    raise ValueError("header length beyond the end of the file")
                header = json.loads(fh.read(n))
        except FileNotFoundError:
            raise SensitivityError(f"multiquantizer file {str(self.path)!r} does not exist") from None
        except (ValueError, UnicodeDecodeError, struct.error) as exc:
            raise CorruptFileError(f"{self.path}: not a readable safetensors file ({exc})") from None
        self.metadata: Dict[str, str] = header.pop("__metadata__", {}) or {}
        self.header = header
        self.data_start = 8 + n
        end = max((v["data_offsets"][1] for v in header.values()), default=0)
        if self.data_start + end > size:
            raise CorruptFileError(
                f"{self.path}: truncated ({size} bytes, the header describes {self.data_start + end})"
            )
        self._mmap: Optional[np.memmap] = None

    def keys(self) -> List[str]:
        return list(self.header)

    def get(self, name: str) -> np.ndarray:
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        try:
            info = self.header[name]
        except KeyError:
            raise CorruptFileError(f"{self.path}: tensor {name!r} is missing") from None
        a, b = info["data_offsets"]
        raw = self._mmap[self.data_start + a : self.data_start + b]
        return np.frombuffer(raw.tobytes(), dtype=_DTYPES[info["dtype"]]).reshape(info["shape"])

    def close(self) -> None:
        self._mmap = None


def _manifest_hash(manifest: Mapping[str, Any]) -> str:
    core = {k: manifest[k] for k in ("format", "architecture_hash", "weights_hash", "options", "layers")}
    return hashlib.blake2b(json.dumps(core, sort_keys=True).encode(), digest_size=16).hexdigest()


def read_manifest(path: str | os.PathLike) -> Dict[str, Any]:
    """The JSON manifest of a multiquantizer file (no tensor is read)."""
    return _open(Path(path))[1]


def _open(path: Path) -> Tuple[_SafetensorsReader, Dict[str, Any]]:
    reader = _SafetensorsReader(path)
    raw = reader.metadata.get(MANIFEST_KEY)
    if raw is None:
        raise CorruptFileError(f"{path}: not a sensitivity multiquantizer (no manifest in its metadata)")
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError:
        raise CorruptFileError(f"{path}: its manifest is not valid JSON") from None
    if manifest.get("format") != FORMAT:
        raise CorruptFileError(f"{path}: unsupported format {manifest.get('format')!r} (expected {FORMAT})")
    if manifest.get("hash") != _manifest_hash(manifest):
        raise CorruptFileError(f"{path}: its manifest was modified (hash mismatch)")
    for d in manifest["layers"]:
        for opt, s in d["options"].items():
            for p in ["codes"] + list(s["params"]):
                if f"{d['name']}/{opt}/{p}" not in reader.header:
                    raise CorruptFileError(f"{path}: tensor {d['name']}/{opt}/{p} is missing")
    return reader, manifest
