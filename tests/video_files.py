"""Small video files written by the tests (PyAV only: no torch), and cut copies of them."""
from __future__ import annotations

import av
import numpy as np


def frame_rgb(k: int, height: int, width: int) -> np.ndarray:
    """Frame k: a moving bar, a colour ramp and a per-frame hue, so that frames differ."""
    y, x = np.mgrid[0:height, 0:width]
    img = np.empty((height, width, 3), np.uint8)
    img[..., 0] = (x * 255 // max(width - 1, 1) + 37 * k) % 256
    img[..., 1] = (y * 255 // max(height - 1, 1)) ^ (11 * k % 256)
    img[..., 2] = np.where((x - 3 * k) % width < width // 4, 230, 20)
    return img


def write_video(path, frames: int, fps, *, codec: str = "mpeg4", fmt: str | None = None,
                height: int = 48, width: int = 64, pix_fmt: str = "yuv420p", **options) -> str:
    """Encode `frames` frames of `frame_rgb` at `fps` (int or Fraction) into `path`."""
    with av.open(str(path), "w", format=fmt, options=options) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        for k in range(frames):
            frame = av.VideoFrame.from_ndarray(frame_rgb(k, height, width), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return str(path)


def cut_in_half(path) -> str:
    data = open(path, "rb").read()
    cut = f"{path}.half{path[path.rfind('.'):]}"
    open(cut, "wb").write(data[: len(data) // 2])
    return cut
