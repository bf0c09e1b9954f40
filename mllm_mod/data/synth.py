"""Synthetic visual-instruction data: small pictures, short answers, deterministic by seed.

Every sample is written in the LLaVA conversation format (one JSON record per sample, the picture as a
PNG file, the clip as an mp4 file) so the same loader reads it and real instruction data. Each family
needs the picture to be answered and states its chance level (the accuracy of guessing uniformly
among its possible answers), so a learning curve can be read against it.

Sample ``i`` of a given seed depends only on ``(seed, i)``: asking for more samples never changes the
first ones. Families are assigned round-robin so every family is equally represented.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 60, 235),
    "yellow": (240, 220, 20),
    "purple": (150, 40, 200),
    "orange": (250, 140, 0),
}
SHAPES = ("circle", "square", "triangle")
OCR_WORDS = ("cat", "dog", "sun", "box", "car", "hat", "pen", "cup")
CHART_VALUES = (1, 2, 3, 4, 5)
CHART_BARS = ("A", "B", "C")
MAX_COUNT = 4
OPTION_LETTERS = ("A", "B", "C", "D")
BACKGROUND = (255, 255, 255)


@dataclass(frozen=True)
class Sample:
    """One question about one picture (or clip): what a family generator returns."""

    question: str
    answer: str
    media: list[np.ndarray]  # one [H, W, 3] uint8 picture, or the [H, W, 3] frames of a clip


@dataclass(frozen=True)
class Family:
    """A kind of question. `answers` is the closed answer set; the chance level is the accuracy of a
    uniform guess among the answers the question allows: ``1 / len(answers)`` unless the family asks
    questions with different answer sets (then `question_chance`, the mean over its questions)."""

    name: str
    answers: tuple[str, ...]
    make: Callable[[np.random.Generator, int], Sample]
    questions: tuple[str, ...]  # every question text the family can ask (for the vocabulary)
    video: bool = False
    question_chance: float | None = None

    @property
    def chance(self) -> float:
        return self.question_chance if self.question_chance is not None else 1.0 / len(self.answers)


# -- drawing ---------------------------------------------------------------------------------------
def canvas(size: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (size, size), BACKGROUND)
    return image, ImageDraw.Draw(image)


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, color: str, cx: float, cy: float, r: float) -> None:
    fill = COLORS[color]
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")


def place(rng: np.random.Generator, size: int, r: float) -> tuple[float, float]:
    lo, hi = r + 1, size - r - 1
    return float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))


def choose(rng: np.random.Generator, options: Sequence[str], k: int = 1) -> list[str]:
    return [options[i] for i in rng.choice(len(options), size=k, replace=False)]


# -- image families --------------------------------------------------------------------------------
def one_object(rng: np.random.Generator, size: int, radius: tuple[float, float]) -> tuple[str, str, np.ndarray]:
    """One object of a random colour and shape, of radius `radius` (a fraction range of the size),
    placed at random: ``(color, shape, picture [H, W, 3])``."""
    (color,), (shape,) = choose(rng, list(COLORS)), choose(rng, SHAPES)
    image, draw = canvas(size)
    r = size * rng.uniform(*radius)
    draw_shape(draw, shape, color, *place(rng, size, r), r)
    return color, shape, np.asarray(image)


def make_color(rng: np.random.Generator, size: int) -> Sample:
    color, _, image = one_object(rng, size, (0.2, 0.3))
    return Sample("what color is the object ?", color, [image])


def make_shape(rng: np.random.Generator, size: int) -> Sample:
    _, shape, image = one_object(rng, size, (0.25, 0.35))
    return Sample("what shape is the object ?", shape, [image])


def make_count(rng: np.random.Generator, size: int) -> Sample:
    n = int(rng.integers(1, MAX_COUNT + 1))
    image, draw = canvas(size)
    cell = size / 2  # one object per quadrant so they never overlap
    quadrants = rng.choice(4, size=n, replace=False)
    for q in quadrants:
        r = cell * rng.uniform(0.25, 0.35)
        cx = (q % 2) * cell + rng.uniform(r + 1, cell - r - 1)
        cy = (q // 2) * cell + rng.uniform(r + 1, cell - r - 1)
        draw_shape(draw, choose(rng, SHAPES)[0], choose(rng, list(COLORS))[0], cx, cy, r)
    return Sample("how many objects are there ?", str(n), [np.asarray(image)])


def make_spatial(rng: np.random.Generator, size: int) -> Sample:
    first, second = choose(rng, list(COLORS), 2)
    image, draw = canvas(size)
    r = size * 0.15
    half = size / 2
    left_x, right_x = rng.uniform(r + 1, half - r), rng.uniform(half + r, size - r - 1)
    first_left = bool(rng.integers(2))
    xs = (left_x, right_x) if first_left else (right_x, left_x)
    for color, x in zip((first, second), xs):
        draw_shape(draw, choose(rng, SHAPES)[0], color, x, rng.uniform(r + 1, size - r - 1), r)
    question = f"is the {first} object left or right of the {second} object ?"
    return Sample(question, "left" if first_left else "right", [np.asarray(image)])


def make_presence(rng: np.random.Generator, size: int) -> Sample:
    """POPE-like: one or two objects; the question names an object that is there half of the time."""
    n = int(rng.integers(1, 3))
    objects = list(zip(choose(rng, list(COLORS), n), choose(rng, SHAPES, n)))
    image, draw = canvas(size)
    r = size * 0.17
    for j, (color, shape) in enumerate(objects):
        x = rng.uniform(r + 1, size / 2 - 1) if j == 0 else rng.uniform(size / 2 + 1, size - r - 1)
        draw_shape(draw, shape, color, x, rng.uniform(r + 1, size - r - 1), r)
    present = bool(rng.integers(2))
    if present:
        color, shape = objects[int(rng.integers(n))]
    else:
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in objects]
        color, shape = absent[int(rng.integers(len(absent)))]
    return Sample(f"is there a {color} {shape} ?", "yes" if present else "no", [np.asarray(image)])


def make_ocr(rng: np.random.Generator, size: int) -> Sample:
    (word,) = choose(rng, OCR_WORDS)
    image, draw = canvas(size)
    # PIL's built-in bitmap font: about 6 px per letter and 11 px high
    left, top, right, bottom = draw.textbbox((0, 0), word)
    x = rng.uniform(1, max(size - (right - left) - 1, 2))
    y = rng.uniform(1, max(size - (bottom - top) - 1, 2))
    draw.text((x - left, y - top), word, fill=(0, 0, 0))
    return Sample("what word is written ?", word, [np.asarray(image)])


class ChartPainter:
    """Bar charts drawn with matplotlib (Agg) into arrays; one figure reused per generation run."""

    def __init__(self, size: int):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        self.size = size
        self.figure = Figure(figsize=(1, 1), dpi=size)
        FigureCanvasAgg(self.figure)  # the Agg canvas, whatever pyplot's backend is
        self.axes = self.figure.add_axes((0.05, 0.05, 0.9, 0.9))

    def __call__(self, values: Sequence[int], colors: Sequence[str]) -> np.ndarray:
        ax = self.axes
        ax.clear()
        ax.bar(range(len(values)), values, color=[np.array(COLORS[c]) / 255 for c in colors], width=0.7)
        ax.set_ylim(0, max(CHART_VALUES))
        ax.set_xlim(-0.5, len(values) - 0.5)
        ax.set_yticks(CHART_VALUES)
        ax.tick_params(length=0, labelleft=False, labelbottom=False)
        ax.grid(axis="y", color=(0.8, 0.8, 0.8), linewidth=0.5)
        self.figure.canvas.draw()
        rgba = np.asarray(self.figure.canvas.buffer_rgba())  # [H, W, 4]
        return np.ascontiguousarray(rgba[..., :3])


def make_chart_family(painter: ChartPainter) -> Callable[[np.random.Generator, int], Sample]:
    def make_chart(rng: np.random.Generator, size: int) -> Sample:
        values = [int(v) for v in rng.choice(CHART_VALUES, size=len(CHART_BARS))]
        colors = choose(rng, list(COLORS), len(CHART_BARS))
        bar = int(rng.integers(len(CHART_BARS)))
        question = f"what is the value of bar {CHART_BARS[bar]} ?"
        return Sample(question, str(values[bar]), [painter(values, colors)])

    return make_chart


def make_choice(rng: np.random.Generator, size: int) -> Sample:
    options = choose(rng, list(COLORS), len(OPTION_LETTERS))
    correct = int(rng.integers(len(options)))
    image, draw = canvas(size)
    r = size * rng.uniform(0.2, 0.3)
    draw_shape(draw, choose(rng, SHAPES)[0], options[correct], *place(rng, size, r), r)
    listed = " ".join(f"{letter} {color}" for letter, color in zip(OPTION_LETTERS, options))
    question = f"which color is the object ? {listed} . answer with the option letter ."
    return Sample(question, OPTION_LETTERS[correct], [np.asarray(image)])


# -- video family ----------------------------------------------------------------------------------
VIDEO_FRAMES = 8
VIDEO_QUESTIONS = ("which object moved ?", "when did the object move ? first or last half")


def make_motion(rng: np.random.Generator, size: int) -> Sample:
    """Two squares; one of them slides across during the first or the last half of the clip. Half of
    the questions ask which colour moved (6 answers), half when it moved ("first" / "last")."""
    colors = choose(rng, list(COLORS), 2)
    mover = int(rng.integers(2))
    first_half = bool(rng.integers(2))
    r = size * 0.12
    ys = (size * 0.3, size * 0.7)
    start, end = r + 1, size - r - 1
    half = VIDEO_FRAMES // 2
    frames = []
    for t in range(VIDEO_FRAMES):
        progress = min(max((t - (0 if first_half else half)) / (half - 1), 0.0), 1.0)
        image, draw = canvas(size)
        for j, color in enumerate(colors):
            x = start + (end - start) * progress if j == mover else size / 2
            draw_shape(draw, "square", color, x, ys[j], r)
        frames.append(np.asarray(image))
    if rng.integers(2):
        return Sample(VIDEO_QUESTIONS[0], colors[mover], frames)
    return Sample(VIDEO_QUESTIONS[1], "first" if first_half else "last", frames)


# -- registry of families for one run --------------------------------------------------------------
def families(size: int = 30, video: bool = False) -> dict[str, Family]:
    """The families, in round-robin order. Charts need a painter sized for `size`."""
    colors = tuple(COLORS)
    listed = " ".join(f"{letter} {c}" for letter, c in zip(OPTION_LETTERS, colors))
    out = [
        Family("color", colors, make_color, ("what color is the object ?",)),
        Family("shape", SHAPES, make_shape, ("what shape is the object ?",)),
        Family("count", tuple(str(i) for i in range(1, MAX_COUNT + 1)), make_count, ("how many objects are there ?",)),
        Family(
            "spatial",
            ("left", "right"),
            make_spatial,
            (f"is the {colors[0]} object left or right of the {colors[1]} object ?", *colors),
        ),
        Family("presence", ("yes", "no"), make_presence, (f"is there a {colors[0]} {SHAPES[0]} ?", *colors, *SHAPES)),
        Family("ocr", OCR_WORDS, make_ocr, ("what word is written ?",)),
        Family(
            "chart",
            tuple(str(v) for v in CHART_VALUES),
            make_chart_family(ChartPainter(size)),
            (f"what is the value of bar {CHART_BARS[0]} ?", *CHART_BARS),
        ),
        Family(
            "choice",
            OPTION_LETTERS,
            make_choice,
            (f"which color is the object ? {listed} . answer with the option letter .",),
        ),
    ]
    if video:
        answers = (*colors, "first", "last")
        chance = 0.5 * (1 / len(colors)) + 0.5 * (1 / 2)  # which colour (1 of 6) or when (1 of 2), equally often
        out.append(Family("motion", answers, make_motion, VIDEO_QUESTIONS, video=True, question_chance=chance))
    return {f.name: f for f in out}


def vocabulary(video: bool = True) -> list[str]:
    """Every word the synthetic questions and answers use (pass to ``tiny_model(words=...)``)."""
    from ..tiny import BASE_WORDS

    words: dict[str, None] = {}
    for family in families(size=8, video=video).values():
        for text in (*family.questions, *family.answers):
            words.update(dict.fromkeys(text.split()))
    return [w for w in words if w not in BASE_WORDS]


# -- writing ---------------------------------------------------------------------------------------
def sample_record(family: Family, index: int, sample: Sample, media_path: str) -> dict[str, Any]:
    placeholder = "<video>" if family.video else "<image>"
    return {
        "id": f"{family.name}-{index:06d}",
        ("video" if family.video else "image"): media_path,
        "conversations": [
            {"from": "human", "value": f"{placeholder}\n{sample.question}"},
            {"from": "gpt", "value": sample.answer},
        ],
        "family": family.name,
        "answer": sample.answer,
        "chance": family.chance,
    }


def write_video(
    path: str | os.PathLike,
    frames: Sequence[np.ndarray],
    fps: int = 4,
    codec: str = "libx264",
    size: tuple[int, int] | None = None,
) -> None:
    """Write [H, W, 3] uint8 frames as an mp4 with PyAV (H and W must be even for yuv420p).

    With no frames (and `size` = (H, W) given) the file is a valid mp4 whose video track holds no
    samples: what a recorder that stopped at once leaves behind, and the zero-frame case of the tests.
    """
    import av

    if len(frames) == 0 and size is None:
        raise ValueError("a video with no frames needs its size (H, W)")
    height, width = size if size is not None else frames[0].shape[:2]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "10"}  # nearly lossless: colours survive
        container.start_encoding()  # writes the header even when no frame follows
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def generate(
    out: str | os.PathLike,
    n: int,
    seed: int = 0,
    size: int = 30,
    test_fraction: float = 0.1,
    video: bool = False,
    only: Sequence[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write ``n`` samples under `out`: ``train.json``, ``test.json``, ``meta.json``, ``images/``, ``videos/``.

    The split is by index (every ``round(1 / test_fraction)``-th sample of each family is held out), so
    it is the same for every ``n`` and every family is in both splits. Returns the meta dict (families with chance levels, counts, files).
    """
    from tqdm.auto import tqdm

    if size % 2:
        raise ValueError(f"size must be even (mp4 frames are yuv420p), got {size}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    registry = families(size, video)
    if only is not None:
        unknown = sorted(set(only) - set(registry))
        if unknown:
            raise ValueError(f"unknown families {unknown}; available: {sorted(registry)}")
        registry = {k: v for k, v in registry.items() if k in only}
    chosen = list(registry.values())
    root = Path(out)
    (root / "images").mkdir(parents=True, exist_ok=True)
    if any(f.video for f in chosen):
        (root / "videos").mkdir(parents=True, exist_ok=True)
    every = round(1 / test_fraction) if test_fraction > 0 else 0
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
    for i in tqdm(range(n), desc="synth data", disable=not progress, unit="sample"):
        family = chosen[i % len(chosen)]
        sample = family.make(np.random.default_rng([seed, i]), size)
        if family.video:
            rel = f"videos/{family.name}-{i:06d}.mp4"
            write_video(root / rel, sample.media)
        else:
            rel = f"images/{family.name}-{i:06d}.png"
            Image.fromarray(sample.media[0]).save(root / rel)
        nth = i // len(chosen)  # this sample is the nth of its family: hold out every k-th per family
        split = "test" if every and nth % every == every - 1 else "train"
        splits[split].append(sample_record(family, i, sample, rel))
    meta = {
        "seed": seed,
        "n": n,
        "size": size,
        "families": {f.name: {"chance": f.chance, "answers": list(f.answers), "video": f.video} for f in chosen},
        "counts": {k: len(v) for k, v in splits.items()},
        "vocabulary": vocabulary(video),
    }
    return write_splits(root, splits, meta)


def write_splits(root: Path, splits: dict[str, list[dict[str, Any]]], meta: dict[str, Any]) -> dict[str, Any]:
    """``{split}.json`` (LLaVA conversation records) and ``meta.json`` under `root`; returns `meta`."""
    for name, records in splits.items():
        with open(root / f"{name}.json", "w") as f:
            json.dump(records, f, indent=1)
    with open(root / "meta.json", "w") as f:
        json.dump(meta, f, indent=2)
    return meta
