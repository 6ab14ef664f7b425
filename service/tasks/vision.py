"""Images in, pixel_values out, as the export's preprocessor_config.json says (Hugging Face's
image processors: convert to RGB, resize, center crop, rescale, normalise, channels first).

    do_resize + size          {"height", "width"} (ViT, DeiT, BEiT), or {"shortest_edge"} (the
                              short side scaled to it, ConvNeXt / CLIP style), with `resample`
                              as PIL's filter number (2, bilinear, by default)
    do_center_crop + crop_size {"height", "width"}
    do_rescale + rescale_factor  1/255 by default
    do_normalize + image_mean, image_std

The input shape comes from config.json (num_channels, image_size) when the graph leaves it
symbolic, so warm-up and clients see the shape the model takes. Pillow decodes PNG, JPEG and
whatever else it knows; an image it cannot decode is the request's InvalidInput.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.errors import InvalidInput

PIXEL_VALUES = "pixel_values"
MAX_IMAGE_BYTES = 32 * 1024 * 1024
MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # a decompression bomb is refused before it is decoded
IMAGENET_MEAN, IMAGENET_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # ViTImageProcessor's defaults


def _size(value, default: int | None) -> tuple[int, int] | int | None:
    """(height, width), or an int for a shortest edge."""
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, dict):
        if "height" in value and "width" in value:
            return (int(value["height"]), int(value["width"]))
        if "shortest_edge" in value:
            return int(value["shortest_edge"])
    return (default, default) if default else None


@dataclass(frozen=True)
class ImageProcessor:
    channels: int = 3
    resize: tuple[int, int] | int | None = None  # (h, w) or the shortest edge
    resample: int = 2
    crop: tuple[int, int] | None = None
    rescale: float | None = 1 / 255
    mean: tuple[float, ...] | None = IMAGENET_MEAN
    std: tuple[float, ...] | None = IMAGENET_STD

    @property
    def shape(self) -> tuple[int, int, int] | None:
        """[C, H, W] of what this processor produces, when fixed."""
        hw = self.crop or (self.resize if isinstance(self.resize, tuple) else None)
        return (self.channels, *hw) if hw else None

    def __call__(self, data: bytes, where: str) -> np.ndarray:
        """One image's bytes -> float32 [C, H, W]."""
        from PIL import Image

        if len(data) > MAX_IMAGE_BYTES:
            raise InvalidInput(f"{where}: {len(data):,} bytes, above the {MAX_IMAGE_BYTES:,} an image may take")
        try:
            with Image.open(io.BytesIO(data)) as img:
                if img.width * img.height > MAX_IMAGE_PIXELS:
                    raise InvalidInput(f"{where}: {img.width}x{img.height} pixels is too large")
                img.load()
                img = img.convert("RGB" if self.channels == 3 else "L")
        except InvalidInput:
            raise
        except Exception as e:  # Pillow raises many kinds (SyntaxError on a bad chunk, struct.error, EOFError)
            raise InvalidInput(
                f"{where} is not an image tserve can decode ({type(e).__name__}: {str(e)[:200]})"
            ) from None
        if self.resize is not None:
            if isinstance(self.resize, int):
                short, (w, h) = self.resize, img.size
                size = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)  # (h, w)
            else:
                size = self.resize
            img = img.resize((size[1], size[0]), resample=self.resample)
        pixels = np.asarray(img, dtype=np.float32)
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        if self.crop is not None:
            h, w = pixels.shape[:2]
            ch, cw = self.crop
            top, left = max(0, (h - ch) // 2), max(0, (w - cw) // 2)
            pixels = pixels[top : top + ch, left : left + cw]
        if self.rescale is not None:
            pixels = pixels * np.float32(self.rescale)
        if self.mean is not None and self.std is not None:
            pixels = (pixels - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32)


def read_processor(version_dir: Path, config: dict) -> ImageProcessor:
    """The folder's preprocessor_config.json (defaults as ViTImageProcessor's), sized by
    config.json's image_size when it names none; ValueError naming the file when unreadable."""
    path = version_dir / "preprocessor_config.json"
    pre: dict = {}
    if path.is_file():
        try:
            pre = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"preprocessor_config.json is unreadable: {e}") from e
    image_size = config.get("image_size") if isinstance(config.get("image_size"), int) else None
    channels = config.get("num_channels") if isinstance(config.get("num_channels"), int) else 3
    crop = _size(pre.get("crop_size"), None) if pre.get("do_center_crop") else None
    return ImageProcessor(
        channels=channels,
        resize=_size(pre.get("size"), image_size) if pre.get("do_resize", True) else None,
        resample=int(pre.get("resample", 2)),
        crop=crop if isinstance(crop, tuple) else None,
        rescale=float(pre.get("rescale_factor", 1 / 255)) if pre.get("do_rescale", True) else None,
        mean=tuple(pre.get("image_mean", IMAGENET_MEAN)) if pre.get("do_normalize", True) else None,
        std=tuple(pre.get("image_std", IMAGENET_STD)) if pre.get("do_normalize", True) else None,
    )
