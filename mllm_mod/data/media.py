"""Reading pictures and clips for one sample, with errors that name the sample and the file."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

VIDEO_BACKENDS = ("decord", "pyav")


class DataError(ValueError):
    """A sample that cannot be used; names the sample id and the file at fault."""

    def __init__(self, sample_id: str, file: str | os.PathLike | None, reason: str):
        self.sample_id, self.file, self.reason = sample_id, None if file is None else str(file), reason
        where = f" ({self.file})" if self.file else ""
        super().__init__(f"sample {sample_id!r}{where}: {reason}")


def resolve(path: str, folder: str | os.PathLike | None) -> str:
    return path if folder is None or os.path.isabs(path) else os.path.join(folder, path)


def load_image(path: str | os.PathLike, sample_id: str) -> Image.Image:
    """An RGB picture; a missing or undecodable file raises `DataError`."""
    if not os.path.isfile(path):
        raise DataError(sample_id, path, "image file not found")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # decodes the whole file
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(sample_id, path, f"corrupt image ({type(err).__name__}: {err})") from err


def frame_indices(total: int, native_fps: float, num_frames: int, fps: float | None = None) -> np.ndarray:
    """Which frames to read: every ``native_fps / fps``-th frame when `fps` is given, then at most
    `num_frames` of those taken uniformly (the centre of each of `num_frames` equal bins)."""
    if total <= 0:
        raise ValueError("the clip has no frames")
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    candidates = np.arange(total)
    if fps is not None:
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        step = max(native_fps / fps, 1.0)
        candidates = np.unique(np.floor(np.arange(0, total, step)).astype(np.int64))
    if len(candidates) <= num_frames:
        return candidates
    bins = (np.arange(num_frames) + 0.5) * len(candidates) / num_frames
    return candidates[bins.astype(np.int64)]


def load_video(
    path: str | os.PathLike,
    sample_id: str,
    num_frames: int = 8,
    fps: float | None = None,
    backend: str = "decord",
) -> np.ndarray:
    """Frames [F, H, W, 3] uint8 sampled by `frame_indices`; read with decord (default) or PyAV."""
    if backend not in VIDEO_BACKENDS:
        raise ValueError(f"video backend must be one of {VIDEO_BACKENDS}, got {backend!r}")
    if not os.path.isfile(path):
        raise DataError(sample_id, path, "video file not found")
    try:
        read = _read_decord if backend == "decord" else _read_pyav
        frames = read(str(path), num_frames, fps)
    except DataError:
        raise
    except Exception as err:  # decord and PyAV raise their own error types for undecodable files
        raise DataError(sample_id, path, video_error_reason(err)) from err
    if len(frames) == 0:
        raise DataError(sample_id, path, "corrupt video (no frames decoded)")
    return frames


def video_error_reason(err: Exception) -> str:
    """Why a decoder refused a file, in words: a container whose video track holds no frames is
    reported by decord and PyAV as a missing stream; anything else is a corrupt file."""
    text = str(err)
    if "cannot find video stream" in text or isinstance(err, IndexError):
        return "no frames (the file has no decodable video stream)"
    return f"corrupt video ({type(err).__name__}: {text.strip()[-200:]})"


def _read_decord(path: str, num_frames: int, fps: float | None) -> np.ndarray:
    import decord

    reader = decord.VideoReader(path, num_threads=1)
    indices = frame_indices(len(reader), reader.get_avg_fps(), num_frames, fps)
    return reader.get_batch(indices.tolist()).asnumpy()  # [F, H, W, 3]


def _read_pyav(path: str, num_frames: int, fps: float | None) -> np.ndarray:
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        native_fps = float(stream.average_rate or 1)
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]  # decode all: short clips
    indices = frame_indices(len(frames), native_fps, num_frames, fps)
    return np.stack([frames[i] for i in indices])  # [F, H, W, 3]


def as_list(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)
