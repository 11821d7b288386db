"""Full-precision images of a protocol, generated once and shared by every worker of a job (and by reruns).

PSNR / MSE / LPIPS compare each config's images with the full-precision images of the same seeds.
Without sharing, every worker of a job generated them once (N workers: N full-precision generations
of the protocol's images). :class:`SharedImages` keeps them in one ``.npy`` file per protocol in the
job's folder (``fp-images/`` beside the cache file: :func:`job_fp_images_dir`), named by a content key of what decides them
(:func:`fp_images_key`: model id, multiquantizer hash = the denoiser's weights, conditions, seeds, steps,
guidance, scheduler, dtype, size and pipeline settings). The first worker takes a file lock and
generates; the others load the file (memory-mapped: N workers share one copy in RAM), and a worker that
finds the lock taken goes on generating its own config and picks the file up when it scores.
A worker that dies while generating releases the lock (the OS drops it), and the next one generates.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np

from ..errors import SensitivityError
from ..io import atomic_path

#: protocol fields that decide the full-precision images (metrics and activation settings do not)
FP_IMAGE_FIELDS = ("model_id", "multiquantizer_hash", "conditions", "seeds", "steps", "guidance", "scheduler",
                   "dtype", "height", "width", "extra")


def fp_images_key(protocol: Dict[str, Any]) -> str:
    """Content key (hex, 24 chars) of a protocol's full-precision images (``protocol``: ``EvalProtocol.to_dict()``)."""
    d = {k: protocol.get(k) for k in FP_IMAGE_FIELDS}
    blob = json.dumps(d, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.blake2b(blob, digest_size=12, person=b"sens.fp-images").hexdigest()


class SharedImages:
    """One protocol's full-precision images in ``folder/<key>.npy`` (uint8 ``[N, H, W, C]``)."""

    def __init__(self, folder: Union[str, Path], protocol: Dict[str, Any]):
        from filelock import FileLock

        self.key = fp_images_key(protocol)
        self.folder = Path(folder)
        self.path = self.folder / f"{self.key}.npy"
        self.num_images = len(protocol.get("seeds") or ())
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(self.path) + ".lock")
        self._describe = {k: protocol.get(k) for k in FP_IMAGE_FIELDS if k not in ("conditions", "seeds")}

    def load(self) -> Optional[np.ndarray]:
        """The stored images (read-only, memory-mapped), or ``None`` if not generated yet."""
        if not self.path.is_file():
            return None
        try:
            arr = np.load(self.path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise SensitivityError(f"{self.path}: unreadable full-precision images ({exc}); delete the file") from None
        if arr.dtype != np.uint8 or arr.ndim != 4 or len(arr) != self.num_images:
            raise SensitivityError(f"{self.path}: holds {arr.dtype} {tuple(arr.shape)}, not {self.num_images} "
                                   "uint8 images; delete the file")
        return arr

    def try_lock(self) -> bool:
        """Take the generation lock if nobody holds it (never waits)."""
        from filelock import Timeout

        try:
            self._lock.acquire(timeout=0)
            return True
        except Timeout:
            return False

    def lock(self) -> None:
        """Wait for the generation lock (another worker generating: until it has written the file)."""
        self._lock.acquire()

    def unlock(self) -> None:
        if self._lock.is_locked:
            self._lock.release()

    def save(self, images: np.ndarray) -> None:
        """Write the images atomically (the lock should be held), with a small JSON description beside."""
        images = np.ascontiguousarray(images, dtype=np.uint8)
        with atomic_path(self.path) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, images, allow_pickle=False)
        info = dict(self._describe, num_images=int(len(images)), shape=list(images.shape))
        with atomic_path(self.path.with_suffix(".json")) as tmp:
            Path(tmp).write_text(json.dumps(info, indent=1, default=str))

    def get_or_make(self, make) -> Tuple[np.ndarray, bool]:
        """``(images, generated)``: the stored images, or ``make()``'s written under the lock (waits for it)."""
        arr = self.load()
        if arr is not None:
            return arr, False
        self.lock()
        try:
            arr = self.load()
            if arr is not None:
                return arr, False
            images = make()
            self.save(images)
            return self.load(), True
        finally:
            self.unlock()


def job_fp_images_dir(cache_path: Union[str, Path]) -> Path:
    """The folder where a job on ``cache_path`` shares its full-precision images: ``fp-images/`` beside it
    (jobs of one folder with the same generation settings share them too: the key says what they are)."""
    return Path(cache_path).expanduser().resolve().parent / "fp-images"
