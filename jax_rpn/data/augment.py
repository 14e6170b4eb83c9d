"""Per-example numpy transforms of the input pipeline: flip, resize, normalize, pad.

Boxes are `[x1, y1, x2, y2]` in absolute pixels, float32; pixel `(row, col)` covers
`[col, col + 1] x [row, row + 1]`, so an image of width W spans `x` in `[0, W]`.
Images are uint8 `[h, w, 3]` until `normalize`.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from jax_rpn.settings import PixelSettings

IMAGENET = PixelSettings()  # torchvision's: RGB, ImageNet mean and std


def hflip(image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirrors image [h, w, 3] and boxes [n, 4] left-right: `x -> w - x`."""
    w = image.shape[1]
    flipped = np.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], axis=1)
    return image[:, ::-1], flipped.astype(np.float32)  # [n, 4]


def resized_hw(image_hw, *, short_side: int, max_size: int, pad_hw) -> tuple[int, int]:
    """Size (h, w) after resizing `image_hw` keeping its aspect ratio.

    The shorter side becomes `short_side` unless the longer side would then exceed `max_size`,
    in which case the longer side becomes `max_size` (detectron2's ResizeShortestEdge,
    sizes rounded to the nearest integer); the result is further shrunk to fit in `pad_hw`.
    """
    h, w = image_hw
    scale = short_side / min(h, w)
    scale = min(scale, max_size / max(h, w), pad_hw[0] / h, pad_hw[1] / w)
    return min(int(h * scale + 0.5), pad_hw[0]), min(int(w * scale + 0.5), pad_hw[1])


def resize(
    image: np.ndarray, boxes: np.ndarray, *, short_side: int, max_size: int, pad_hw
) -> tuple[np.ndarray, np.ndarray]:
    """Resizes image [h, w, 3] (bilinear, PIL) and boxes [n, 4] as `resized_hw` says.

    Each axis is scaled by `new / old` size, so the image edges map to the new image edges.
    """
    h, w = image.shape[:2]
    new_h, new_w = resized_hw((h, w), short_side=short_side, max_size=max_size, pad_hw=pad_hw)
    if (new_h, new_w) != (h, w):
        image = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
    scale = np.array([new_w / w, new_h / h, new_w / w, new_h / h], np.float32)
    return image, (boxes * scale).astype(np.float32)  # [n, 4]


def normalize(image: np.ndarray, pixels: PixelSettings = IMAGENET) -> np.ndarray:
    """uint8 [h, w, 3] RGB -> float32 [h, w, 3] model input: channels in
    `pixels.channel_order`, then `(image - pixels.mean) / pixels.std` (default: ImageNet's RGB
    statistics, as torchvision)."""
    image = image.astype(np.float32)
    if pixels.channel_order == "bgr":
        image = image[..., ::-1]
    return (image - np.asarray(pixels.mean, np.float32)) / np.asarray(pixels.std, np.float32)


def denormalize(image: np.ndarray, pixels: PixelSettings = IMAGENET) -> np.ndarray:
    """Inverse of `normalize` for display: float32 [..., 3] -> uint8 RGB [..., 3]."""
    image = np.asarray(image) * np.asarray(pixels.std, np.float32)
    image = image + np.asarray(pixels.mean, np.float32)
    if pixels.channel_order == "bgr":
        image = image[..., ::-1]
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


def pad_image(image: np.ndarray, pad_hw) -> np.ndarray:
    """Places image [h, w, C] at the top-left of a zero image [pad_h, pad_w, C]."""
    h, w = image.shape[:2]
    if h > pad_hw[0] or w > pad_hw[1]:
        raise ValueError(f"image of size {(h, w)} does not fit in pad_to={tuple(pad_hw)}")
    out = np.zeros((*pad_hw, image.shape[2]), image.dtype)
    out[:h, :w] = image
    return out


def pad_boxes(
    boxes: np.ndarray, labels: np.ndarray, ignore: np.ndarray, *, max_boxes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Pads boxes [n, 4] (`[x1, y1, x2, y2]` pixels), class labels [n] and ignore flags [n] to
    `max_boxes` slots.

    With more than `max_boxes` boxes, keeps the non-ignored ones first, then the largest by
    area (ties: the earlier box), in their original order; labels and ignore flags follow their
    boxes. Returns (boxes [G, 4] float32, zeros in empty slots; labels [G] int32, 0 in empty
    slots; valid [G] bool; ignore [G] bool; num_dropped int).
    """
    n = len(boxes)
    keep = np.arange(n)
    if n > max_boxes:
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])  # [n]
        keep = np.sort(np.lexsort((np.arange(n), -area, ignore))[:max_boxes])
    k = len(keep)
    out_boxes = np.zeros((max_boxes, 4), np.float32)  # [G, 4]
    out_boxes[:k] = boxes[keep]
    out_labels = np.zeros(max_boxes, np.int32)  # [G]
    out_labels[:k] = labels[keep]
    valid = np.arange(max_boxes) < k  # [G]
    out_ignore = np.zeros(max_boxes, bool)  # [G]
    out_ignore[:k] = ignore[keep]
    return out_boxes, out_labels, valid, out_ignore, n - k
