"""The embedded default dataset: scikit-learn's bundled 8x8 handwritten digits, upscaled."""

import numpy as np
from PIL import Image
from sklearn import datasets

CLASS_NAMES = [str(d) for d in range(10)]


def load_digits(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the 1,797 digits as uint8 images (N, resolution, resolution) and int64 labels (N,)."""
    if resolution < 1:
        raise ValueError(f"resolution must be positive, got {resolution}")
    bunch = datasets.load_digits()
    # The pixel values are ink counts 0..16; round to the nearest uint8 level so 16 -> 255 exactly.
    raw = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # (N, 8, 8)
    if resolution == 8:
        return raw, bunch.target.astype(np.int64)
    images = np.empty((len(raw), resolution, resolution), dtype=np.uint8)
    for i, digit in enumerate(raw):
        # Bicubic: going 8 -> 32 nearest-neighbour gives 4x4 blocks that D spots at once, and Lanczos
        # overshoots at the hard ink edges and clips. Pillow's bicubic also anti-aliases when shrinking.
        images[i] = np.asarray(Image.fromarray(digit).resize((resolution, resolution), Image.Resampling.BICUBIC))
    return images, bunch.target.astype(np.int64)
