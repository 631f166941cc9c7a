"""A PNG of a frame, so a user can see what the server sends: panels of a
multi-panel frame are tiled, and the colour scale clips at the 1st and 99th
percentiles so a few hot pixels do not hide the rest."""
import math

import numpy as np


def tile(frame: np.ndarray) -> np.ndarray:
    """A 2-D mosaic of a (..., rows, cols) frame's panels."""
    if frame.ndim <= 2:
        return np.atleast_2d(frame)
    panels = frame.reshape((-1,) + frame.shape[-2:])
    n, rows, cols = panels.shape
    ncol = math.ceil(math.sqrt(n * rows / cols))
    nrow = math.ceil(n / ncol)
    mosaic = np.zeros((nrow * rows, ncol * cols), np.float32)
    for k, panel in enumerate(panels):
        r, c = divmod(k, ncol)
        mosaic[r * rows:(r + 1) * rows, c * cols:(c + 1) * cols] = panel
    return mosaic


def save_png(frame: np.ndarray, path: str, title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image = tile(frame).astype(np.float32)
    lo, hi = np.percentile(image, [1, 99]) if image.size else (0, 1)
    fig, ax = plt.subplots(figsize=(8, 8 * image.shape[0] / max(image.shape[1], 1) + 0.5))
    shown = ax.imshow(image, vmin=lo, vmax=hi if hi > lo else lo + 1, cmap="viridis",
                      interpolation="nearest")
    fig.colorbar(shown, ax=ax, shrink=0.8)
    ax.set_title(title)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
