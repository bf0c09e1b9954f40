"""Reading pictures and clips for one sample, with errors that name the sample and the file."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Self

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


class Clip(np.ndarray):
    """The [F, H, W, 3] uint8 frames `load_video` read, an ``np.ndarray`` that also carries where they came
    from: ``metadata``, in transformers' ``VideoMetadata`` fields (the file's frame count and frame rate, the
    indices of the frames read, duration, size). Processors need it for what they write or compute from time:
    Qwen3-VL's and SmolVLM's frame timestamps, Qwen2.5-VL's seconds per temporal patch (its temporal M-RoPE
    positions). A slice or a copy of a clip is a clip without metadata (its frames are no longer those)."""

    metadata: dict[str, Any] | None

    def __new__(cls, frames: np.ndarray, metadata: dict[str, Any] | None = None) -> Self:
        clip = np.asarray(frames).view(cls)
        clip.metadata = metadata
        return clip

    def __array_finalize__(self, obj: Any) -> None:
        self.metadata = None


def clip_metadata(total: int, native_fps: float, indices: np.ndarray, height: int, width: int) -> dict[str, Any]:
    """``VideoMetadata`` fields of frames `indices` read from a file of `total` frames at `native_fps`."""
    return {
        "total_num_frames": int(total),
        "fps": float(native_fps),
        "frames_indices": [int(i) for i in indices],
        "duration": float(total / native_fps),
        "height": int(height),
        "width": int(width),
    }


def video_processor_kwargs(videos: Sequence[Sequence[np.ndarray]]) -> dict[str, Any]:
    """What a transformers processor gets for the clips of a batch, `videos` holding each prompt's clips (already
    sampled, by `load_video` or given as frames): the frames, one list per prompt (a flat list is one prompt's
    frames to SmolVLM in transformers 5.17; every processor takes the nested form), ``do_sample_frames=False``
    (a processor must not sample again: Qwen3-VL's would keep 4 of 8 frames by its own rate) and, when every
    clip is a `Clip` with metadata, each one's ``video_metadata`` in order (without it processors assume 24 fps:
    wrong timestamps for Qwen3-VL and SmolVLM, wrong temporal positions for Qwen2.5-VL). Empty without clips."""
    flat = [v for clips in videos for v in clips]
    if not flat:
        return {}
    kwargs: dict[str, Any] = {"videos": [[np.asarray(v) for v in clips] for clips in videos], "do_sample_frames": False}
    metadata = [getattr(v, "metadata", None) for v in flat]
    if all(m is not None for m in metadata):
        kwargs["video_metadata"] = [dict(m) for m in metadata]
    elif any(m is not None for m in metadata):  # one batch, one timing rule: never the default 24 fps for some
        missing = [i for i, m in enumerate(metadata) if m is None]
        raise ValueError(
            f"clips {missing} of this batch carry no timing (frames given as arrays, or a slice of a Clip) while the "
            "others do: the processor would time them all at its default 24 fps; read every clip with load_video"
        )
    return kwargs


def load_video(
    path: str | os.PathLike,
    sample_id: str,
    num_frames: int = 8,
    fps: float | None = None,
    backend: str = "decord",
) -> Clip:
    """Frames [F, H, W, 3] uint8 sampled by `frame_indices`, as a `Clip` that knows their timing; read with
    decord (default) or PyAV."""
    if backend not in VIDEO_BACKENDS:
        raise ValueError(f"video backend must be one of {VIDEO_BACKENDS}, got {backend!r}")
    if not os.path.isfile(path):
        raise DataError(sample_id, path, "video file not found")
    try:
        read = _read_decord if backend == "decord" else _read_pyav
        frames, total, native_fps, indices = read(str(path), num_frames, fps)
    except DataError:
        raise
    except Exception as err:  # decord and PyAV raise their own error types for undecodable files
        raise DataError(sample_id, path, video_error_reason(err)) from err
    if len(frames) == 0:
        raise DataError(sample_id, path, "corrupt video (no frames decoded)")
    return Clip(frames, clip_metadata(total, native_fps, indices, *frames.shape[1:3]))


def video_error_reason(err: Exception) -> str:
    """Why a decoder refused a file, in words: a container whose video track holds no frames is
    reported by decord and PyAV as a missing stream; anything else is a corrupt file."""
    text = str(err)
    if "cannot find video stream" in text or isinstance(err, IndexError):
        return "no frames (the file has no decodable video stream)"
    return f"corrupt video ({type(err).__name__}: {text.strip()[-200:]})"


def _read_decord(path: str, num_frames: int, fps: float | None) -> tuple[np.ndarray, int, float, np.ndarray]:
    """(frames [F, H, W, 3], frames in the file, its frame rate, the indices read)."""
    import decord

    reader = decord.VideoReader(path, num_threads=1)
    native_fps = float(reader.get_avg_fps())
    indices = frame_indices(len(reader), native_fps, num_frames, fps)
    return reader.get_batch(indices.tolist()).asnumpy(), len(reader), native_fps, indices


def _read_pyav(path: str, num_frames: int, fps: float | None) -> tuple[np.ndarray, int, float, np.ndarray]:
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        native_fps = float(stream.average_rate or 1)
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]  # decode all: short clips
    indices = frame_indices(len(frames), native_fps, num_frames, fps)
    return np.stack([frames[i] for i in indices]), len(frames), native_fps, indices


def as_list(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)
