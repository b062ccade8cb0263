"""``scan --decode gpu``: JPEGs decoded in batches on the GPU, for boxes whose CPUs cannot keep
the GPU fed.

The DataLoader workers still read and hash every file and check a JPEG's header: a plain 8-bit
grayscale or colour JPEG, upright (EXIF orientation 1, or none), within the decompression-bomb limit and
with its end present is handed over undecoded (``Sample.encoded``). The main process decodes
those in one batched call (torchvision's ``decode_jpeg``, nvJPEG on CUDA) and resizes them on
the device (antialiased bilinear) to the model's view and the display copy. Every other file,
and any JPEG the batched decoder rejects, goes through the CPU decoder as before, so a bad file
becomes the same error row either way. The pixels differ slightly from Pillow's (another IDCT,
another resampler), so the decoder is part of the settings a row depends on.
"""
from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from typing import overload

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from batchcam.decode.dataset import Sample, collate_samples, set_model_view
from batchcam.decode.imaging import ends_complete, exif_orientation
from batchcam.decode.pixels import refuse_too_many_pixels


def can_defer(data: bytes) -> bool:
    """Whether the batched decoder can take this file: its header alone decides, no pixel is decoded."""
    try:
        image = Image.open(io.BytesIO(data), formats=("JPEG",))
        refuse_too_many_pixels(*image.size)
        return image.mode in ("L", "RGB") and exif_orientation(image) == (1, "") and ends_complete(data, "JPEG")
    except Exception:  # anything unusual: the CPU decoder decides, and words the error row
        return False


class BatchedJpegDecoder:
    """Completes a batch's deferred JPEGs on ``device``; call it on each batch the loader yields."""

    def __init__(self, device: torch.device, image_size: int, display_max_side: int,
                 decode_on_cpu: Callable[[Sample], Sample]):
        self.device, self.image_size, self.display_max_side = device, image_size, display_max_side
        self.decode_on_cpu = decode_on_cpu

    def __call__(self, samples: list[Sample]) -> tuple[list[Sample], torch.Tensor | None]:
        deferred = {i: sample.encoded for i, sample in enumerate(samples) if sample.encoded is not None}
        if deferred:
            images = self._decode(list(deferred.values()))
            for i, image in zip(deferred, images):
                samples[i] = self.decode_on_cpu(samples[i]) if image is None else self._complete(samples[i], image)
        return collate_samples(samples)

    def _decode(self, encoded: list[bytes]) -> list[torch.Tensor | None]:
        """(1, H, W) uint8 images on the device; None for a file the decoder rejects."""
        tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in encoded]
        try:
            return list(self._decode_jpeg(tensors))
        except RuntimeError:  # one bad file fails the whole call: find it
            return [self._decode_one(tensor) for tensor in tensors]

    def _decode_one(self, tensor: torch.Tensor) -> torch.Tensor | None:
        try:
            return self._decode_jpeg(tensor)
        except RuntimeError:
            return None

    @overload
    def _decode_jpeg(self, data: torch.Tensor) -> torch.Tensor: ...
    @overload
    def _decode_jpeg(self, data: list[torch.Tensor]) -> list[torch.Tensor]: ...

    def _decode_jpeg(self, data: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        with warnings.catch_warnings():
            # torchvision 0.29 deprecates its image codecs in favour of TorchCodec; they still work
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_jpeg(data, mode=ImageReadMode.GRAY, device=self.device)

    def _complete(self, sample: Sample, image: torch.Tensor) -> Sample:
        height, width = image.shape[-2:]
        pixels = image[None].float()
        view = _resized(pixels, self.image_size, self.image_size)
        scale = min(1.0, self.display_max_side / max(height, width))
        display = pixels if scale >= 1 else _resized(pixels, max(1, round(height * scale)),
                                                       max(1, round(width * scale)))
        sample.width, sample.height = width, height
        set_model_view(sample, _to_uint8(view))
        sample.display = _to_uint8(display)
        sample.encoded = None
        return sample


def _resized(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return F.interpolate(pixels, size=(height, width), mode="bilinear", antialias=True, align_corners=False)


def _to_uint8(pixels: torch.Tensor) -> np.ndarray:
    return pixels[0, 0].round().clamp(0, 255).to(torch.uint8).cpu().numpy()
