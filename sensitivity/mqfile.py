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
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import numpy as np

from .errors import CorruptFileError, SensitivityError

FORMAT = "sensitivity.multiquantizer/1"
#: pipeline components, in generation order; a pipeline multiquantizer's layer names start with one
#: (``text_encoder.…``, ``denoiser.…``, ``vae_decoder.…``; :mod:`sensitivity.pipeline_quant`)
TEXT_ENCODER_ATTRS = ("text_encoder", "text_encoder_2", "text_encoder_3")
COMPONENT_NAMES = TEXT_ENCODER_ATTRS + ("denoiser", "vae_decoder")


def layer_component(name: str) -> str:
    """The pipeline component of a layer name (``denoiser`` for a denoiser-only multiquantizer's names)."""
    head, _, rest = name.partition(".")
    return head if rest and head in COMPONENT_NAMES else "denoiser"
MANIFEST_KEY = "sensitivity.manifest"
_DTYPES = {"U8": np.uint8, "F16": np.float16, "F32": np.float32, "I32": np.int32}
_NP_TO_ST = {np.dtype(np.uint8): "U8", np.dtype(np.float16): "F16", np.dtype(np.float32): "F32"}


# --------------------------------------------------------------------------------------------------
# safetensors I/O (streaming writer, so the final file never needs all tensors in memory)
# --------------------------------------------------------------------------------------------------
class _Lazy:
    """A tensor of a part file, read only when written out (keeps assembly memory small)."""

    def __init__(self, reader: "_SafetensorsReader", name: str):
        dtype, shape = reader.info(name)
        self.reader, self.name = reader, name
        self.dtype = np.dtype(_DTYPES[dtype])
        self.shape = tuple(shape)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

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
    """Lazy reader on ``safetensors.safe_open`` (memory-mapped): header on open, one tensor per ``get``.

    Writing stays hand-written (:func:`_write_safetensors`): safetensors' writers need every tensor
    in memory at once, and the final file is streamed from the per-layer parts.
    """

    def __init__(self, path: Path):
        from safetensors import SafetensorError, safe_open

        self.path = Path(path)
        if not self.path.exists():
            raise SensitivityError(f"multiquantizer file {str(self.path)!r} does not exist")
        if not self.path.is_file():
            raise SensitivityError(f"{self.path} is not a file (expected a multiquantizer .safetensors file)")
        try:
            self._file = safe_open(str(self.path), framework="numpy")
            self.metadata: Dict[str, str] = self._file.metadata() or {}
            self._keys = list(self._file.keys())
        except (SafetensorError, OSError, ValueError) as exc:
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CorruptFileError(f"{self.path}: not a readable safetensors file ({msg})") from None

    def keys(self) -> List[str]:
        return list(self._keys)

    def __contains__(self, name: str) -> bool:
        return name in self._keys

    def info(self, name: str) -> Tuple[str, List[int]]:
        """``(dtype name, shape)`` of a tensor, without reading it."""
        sl = self._tensor(name, slice_=True)
        return sl.get_dtype(), list(sl.get_shape())

    def _tensor(self, name: str, slice_: bool = False):
        if name not in self._keys:
            raise CorruptFileError(f"{self.path}: tensor {name!r} is missing")
        try:
            return self._file.get_slice(name) if slice_ else self._file.get_tensor(name)
        except Exception as exc:  # noqa: BLE001 - a damaged tensor is a damaged file
            raise CorruptFileError(f"{self.path}: tensor {name!r} cannot be read ({exc})") from None

    def get(self, name: str) -> np.ndarray:
        return self._tensor(name)

    def close(self) -> None:
        self._file = None


def _manifest_hash(manifest: Mapping[str, Any]) -> str:
    """Identity of a multiquantizer: model hashes, options, layers and each stored tensor's digest and size.

    The float statistics (error, sse) are left out: they follow from the stored tensors, and their last
    bits would make the hash depend on how a machine sums (the shipped cache's records name this hash).
    """
    layers = []
    for d in manifest["layers"]:
        entry = {k: v for k, v in d.items() if k != "options"}
        entry["options"] = {o: {k: st[k] for k in ("nbytes", "params", "digest")} for o, st in d["options"].items()}
        layers.append(entry)
    core = {k: manifest[k] for k in ("format", "architecture_hash", "weights_hash", "options")}
    core["layers"] = layers
    return hashlib.blake2b(json.dumps(core, sort_keys=True).encode(), digest_size=16).hexdigest()


def _manifest_checksum(manifest: Mapping[str, Any]) -> str:
    """Integrity of the whole manifest core, statistics included (a hand-edited error is refused).

    Files written before the identity hash left the statistics out have no ``checksum``; their
    ``hash`` is this value, and stays their identity (caches made with them name it).
    """
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
    try:
        if "checksum" in manifest:
            intact = manifest["checksum"] == _manifest_checksum(manifest) and manifest.get("hash") == _manifest_hash(manifest)
        else:  # written before the identity hash (see _manifest_checksum)
            intact = manifest.get("hash") == _manifest_checksum(manifest)
    except (KeyError, TypeError, AttributeError):
        intact = False
    if not intact:
        raise CorruptFileError(f"{path}: its manifest was modified (hash mismatch)")
    for d in manifest["layers"]:
        for opt, s in d["options"].items():
            for p in ["codes"] + list(s["params"]):
                if f"{d['name']}/{opt}/{p}" not in reader:
                    raise CorruptFileError(f"{path}: tensor {d['name']}/{opt}/{p} is missing")
    return reader, manifest
