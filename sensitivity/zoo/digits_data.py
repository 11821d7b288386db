"""The digits data of the embedded models (scikit-learn's bundled ``load_digits``), without heavy imports."""

from __future__ import annotations

import numpy as np

IMAGE_SIZE = 8
NUM_CLASSES = 10


def digits_dataset() -> tuple:
    """The bundled scikit-learn digits: ``(images uint8 [1797, 8, 8], labels int64 [1797])``.

    Pixel values 0..16 are scaled to 0..255 (rounded). Ships with scikit-learn; nothing is downloaded.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return images, d.target.astype(np.int64)
