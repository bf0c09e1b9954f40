"""The streaming data format and video reading.

A streaming data file is a JSON list of videos, each with timed conversation turns::

    [
      {
        "id": "clip-0",
        "video": "clips/clip-0.mp4",              # relative to the JSON file (or a --video-folder)
        "turns": [
          {"role": "user", "time": 0.0, "text": "narrate the shapes ."},
          {"role": "assistant", "time": 1.5, "text": "a red circle appears ."},
          {"role": "user", "time": 3.0, "text": "what color is it ?"},
          {"role": "assistant", "time": 3.0, "text": "red ."}
        ]
      }
    ]

Times are seconds from the start of the video. Frames are sampled at the model's fps, frame i at
``i / fps`` s. As VideoLLM-online's data code places turns (``data/ego4d/livechat.py``): a user turn at
time t is read after the last frame at or before t (``floor(t * fps)``); an assistant turn is said
after the first frame at or after t (``ceil(t * fps)``: that frame decides to reply), unless it has the
time of the user turn just before it, which it then answers at once.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from mllm_mod.data.media import video_error_reason

ROLES = ("user", "assistant")


@dataclass
class Turn:
    role: str
    time: float
    text: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"turn role must be one of {ROLES}, got {self.role!r}")
        if not self.time >= 0:
            raise ValueError(f"turn time must be >= 0 s, got {self.time!r}")


@dataclass
class StreamRecord:
    """One video with its timed turns (sorted by time; a user turn before an assistant turn at equal time)."""

    video: str
    turns: list[Turn]
    id: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.turns = sorted(self.turns, key=lambda t: (t.time, ROLES.index(t.role)))

    def to_dict(self) -> dict:
        out = {"id": self.id, "video": self.video, "turns": [asdict(t) for t in self.turns]}
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, data: dict, root: str | os.PathLike | None = None) -> StreamRecord:
        missing = [k for k in ("video", "turns") if k not in data]
        if missing:
            raise ValueError(f"streaming record {data.get('id', '?')!r} lacks {missing}")
        video = data["video"]
        if root is not None and not os.path.isabs(video):
            video = os.path.join(root, video)
        turns = [Turn(t["role"], float(t["time"]), t.get("text", t.get("content", ""))) for t in data["turns"]]
        extra = {k: v for k, v in data.items() if k not in ("id", "video", "turns")}
        return cls(video=video, turns=turns, id=str(data.get("id", "")), extra=extra)


def load_records(path: str | os.PathLike, video_folder: str | os.PathLike | None = None) -> list[StreamRecord]:
    """Read a streaming JSON; relative video paths resolve against `video_folder` or the JSON's folder."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"streaming data file {path!s} does not exist")
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise TypeError(f"{path!s}: a streaming data file is a JSON list of videos, got {type(data).__name__}")
    root = video_folder if video_folder is not None else os.path.dirname(os.path.abspath(path))
    return [StreamRecord.from_dict(item, root) for item in data]


def save_records(records: list[StreamRecord], path: str | os.PathLike, root: str | os.PathLike | None = None) -> None:
    """Write records as JSON; video paths are written relative to `root` (default: the JSON's folder)."""
    root = os.path.abspath(root if root is not None else os.path.dirname(os.path.abspath(path)))
    out = []
    for record in records:
        item = record.to_dict()
        item["video"] = os.path.relpath(os.path.abspath(record.video), root)
        out.append(item)
    with open(path, "w") as f:
        json.dump(out, f, indent=1)


def frame_index(time: float, fps: float) -> int:
    """The frame an assistant turn at `time` s follows: the first frame at or after it."""
    return math.ceil(time * fps - 1e-6)


def user_frame_index(time: float, fps: float) -> int:
    """The frame a user turn at `time` s follows: the last frame at or before it."""
    return math.floor(time * fps + 1e-6)


def read_frames(path: str | os.PathLike, fps: float) -> tuple[np.ndarray, np.ndarray]:
    """Frames sampled at `fps` (frame i at ``i / fps`` s): ``(frames [F, H, W, 3] uint8, times [F] s)``.

    Raises with the file named: missing file, unreadable or corrupt video, no frames, or a video whose
    own frame rate is below `fps` (sampling would repeat frames: resample the video or lower --fps).
    """
    import decord

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video {path} does not exist")
    try:
        reader = decord.VideoReader(path, num_threads=1)
        n, native = len(reader), float(reader.get_avg_fps())
    except Exception as err:  # decord raises its own DECORDError (and RuntimeError) for bad files
        raise ValueError(f"video {path}: {video_error_reason(err)}") from err
    if n == 0:
        raise ValueError(f"video {path} has no frames")
    if not native > 0:
        raise ValueError(f"video {path} reports no frame rate")
    if native + 1e-3 < fps:
        raise ValueError(f"video {path} has {native:g} fps, below the requested {fps:g} fps")
    duration = n / native
    times = np.arange(0.0, duration - 1e-9, 1.0 / fps)  # [F]
    indices = np.minimum(np.round(times * native).astype(int), n - 1)
    try:
        frames = reader.get_batch(list(indices)).asnumpy()  # [F, H, W, 3]
    except Exception as err:
        raise ValueError(f"video {path}: {video_error_reason(err)}") from err
    return frames, times


def preprocess(frames: np.ndarray, image_size: int, mean: list[float], std: list[float]):
    """uint8 frames [F, H, W, 3] -> normalised float pixel values [F, 3, S, S] for the vision tower.

    As VideoLLM-online's ``data/utils.py`` (``ffmpeg_once``) prepares frames: the longer side is scaled
    to S (bicubic), the shorter one keeps the aspect ratio, and the frame is padded to a square with
    black, centred; then ``(x - mean) / std``."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255.0  # [F, 3, H, W]
    h, w = x.shape[-2:]
    scale = image_size / max(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    if size != (h, w):
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    top, left = (image_size - size[0]) // 2, (image_size - size[1]) // 2
    x = F.pad(x, (left, image_size - size[1] - left, top, image_size - size[0] - top), value=0.0)  # [F, 3, S, S]
    mean_t = torch.tensor(mean, dtype=x.dtype)[None, :, None, None]
    std_t = torch.tensor(std, dtype=x.dtype)[None, :, None, None]
    return (x - mean_t) / std_t  # [F, 3, S, S]
