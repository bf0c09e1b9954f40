"""A synthetic streaming dataset: videos of one moving shape with timed narration of its events.

Each clip shows a coloured shape that appears, moves in one direction, and disappears; the assistant
narrates each event at the first frame that shows it ("a red circle appears .", "the red circle moves
left .", "the red circle disappears ."). Some clips also carry a user question while the shape is
visible ("what color is it ?"), answered at the same frame. Event times fall on frame times of the
model's fps, so the ground-truth reply frame is exact. Videos are written as mp4 (H.264) with PyAV and
read back with decord like any other video, so the whole journey (data, training, streaming
inference, metrics) runs offline.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from ..data.synth import write_video
from .data import StreamRecord, Turn, save_records

COLORS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 240), "yellow": (240, 220, 40)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
PROMPT = "narrate the shapes ."
QUESTION = "what color is it ?"


@dataclass
class SynthSpec:
    """Size of the synthetic set and of its clips."""

    num_videos: int = 32
    duration: float = 8.0  # seconds
    fps: float = 2.0  # the model's frame rate: events fall on multiples of 1 / fps
    video_fps: int = 8  # the mp4's own frame rate
    size: int = 64  # pixels (square)
    question_rate: float = 0.5  # fraction of clips with a user question
    seed: int = 0


def draw(size: int, shape: str, color: tuple[int, int, int], center: tuple[float, float], radius: float) -> np.ndarray:
    """One frame [size, size, 3] uint8: the shape on a dark background."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)  # [S, S]
    cx, cy = center
    if shape == "circle":
        inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2
    elif shape == "square":
        inside = (np.abs(xx - cx) <= radius * 0.85) & (np.abs(yy - cy) <= radius * 0.85)
    else:  # triangle, apex up
        inside = (yy <= cy + radius * 0.8) & (yy >= cy - radius) & (np.abs(xx - cx) <= (yy - (cy - radius)) * 0.6)
    frame = np.full((size, size, 3), 16, dtype=np.uint8)
    frame[inside] = color
    return frame


def script(rng: np.random.Generator, spec: SynthSpec) -> dict:
    """Random events of one clip, in frame units of the model's fps."""
    n = round(spec.duration * spec.fps)
    appear = int(rng.integers(1, n // 4 + 1))
    move = appear + int(rng.integers(2, n // 4 + 2))
    vanish = min(move + int(rng.integers(3, n // 4 + 3)), n - 1)
    return {
        "color": str(rng.choice(list(COLORS))),
        "shape": str(rng.choice(SHAPES)),
        "direction": str(rng.choice(list(DIRECTIONS))),
        "frames": (appear, move, vanish),
        "question": bool(rng.random() < spec.question_rate),
        "ask": int(rng.integers(appear + 1, vanish)) if vanish - appear > 1 else appear,
    }


def render(events: dict, spec: SynthSpec) -> np.ndarray:
    """Frames [N, S, S, 3] at the video's own fps for the scripted events."""
    appear, move, vanish = (f / spec.fps for f in events["frames"])  # seconds
    size = spec.size
    radius = size * 0.22
    dx, dy = DIRECTIONS[events["direction"]]
    travel = size * 0.3
    start = (size / 2 - dx * travel / 2, size / 2 - dy * travel / 2)
    out = []
    for i in range(round(spec.duration * spec.video_fps)):
        t = i / spec.video_fps
        if appear <= t < vanish:
            progress = min(max((t - move) * spec.fps + 1, 0.0), 3.0) / 3.0 if t >= move else 0.0  # visible at `move`
            center = (start[0] + dx * travel * progress, start[1] + dy * travel * progress)
            out.append(draw(size, events["shape"], COLORS[events["color"]], center, radius))
        else:
            out.append(np.full((size, size, 3), 16, dtype=np.uint8))
    return np.stack(out)  # [N, S, S, 3]


def turns_for(events: dict, spec: SynthSpec) -> list[Turn]:
    appear, move, vanish = (f / spec.fps for f in events["frames"])
    name = f"{events['color']} {events['shape']}"
    turns = [
        Turn("user", 0.0, PROMPT),
        Turn("assistant", appear, f"a {name} appears ."),
        Turn("assistant", move, f"the {name} moves {events['direction']} ."),
        Turn("assistant", vanish, f"the {name} disappears ."),
    ]
    ask = events["ask"] / spec.fps
    if events["question"] and ask not in (appear, move, vanish):
        turns += [Turn("user", ask, QUESTION), Turn("assistant", ask, f"{events['color']} .")]
    return turns


def make_synthetic_stream(
    directory: str | os.PathLike, spec: SynthSpec | None = None, name: str = "stream.json"
) -> str:
    """Write ``spec.num_videos`` clips and a streaming JSON into `directory`; returns the JSON path."""
    spec = spec or SynthSpec()
    os.makedirs(os.path.join(directory, "clips"), exist_ok=True)
    rng = np.random.default_rng(spec.seed)
    records = []
    for i in tqdm(range(spec.num_videos), desc="synthetic clips", leave=False):
        events = script(rng, spec)
        path = os.path.join(directory, "clips", f"clip-{spec.seed}-{i}.mp4")
        write_video(path, render(events, spec), spec.video_fps)
        records.append(StreamRecord(video=path, turns=turns_for(events, spec), id=f"clip-{spec.seed}-{i}"))
    json_path = os.path.join(directory, name)
    save_records(records, json_path)
    return json_path
