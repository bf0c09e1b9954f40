"""A vision-localised synthetic suite: the answer lives in a few small patches among many.

Pictures are ``SIZE`` px square on a ``GRID x GRID`` lattice of ``CELL``-px cells; with the study's
8-px vision patches every cell is exactly one patch (96 px / 8 px: 144 vision tokens per picture). Every
object is small (it fits inside one cell), so which vision tokens a model keeps decides whether the
answer is still visible. The families, each with a uniform answer distribution (so a constant answer,
like a model that does not read the picture, scores the chance level):

| family | question | answers | chance |
|---|---|---|---:|
| count | how many red objects are there ? (red among grey/coloured distractors) | 0-5 | 1/6 |
| count9 | how many red objects are in the picture ? (red among grey/coloured distractors) | 0-9 | 1/10 |
| colorcount | how many X objects are there ? (X red or blue, named in the question; 0-5 of each among grey) | 0-5 | 1/6 |
| presence | is there a X object ? (one tiny coloured object among grey ones) | yes / no | 1/2 |
| oddquad | which quadrant is different ? (one odd-coloured object) | 4 quadrants | 1/4 |
| where | what color is the object in row R column C ? (3 x 3 regions) | 6 colours | 1/6 |
| relpos | is the X object left or right of the Y object ? (among grey ones) | left / right | 1/2 |

Sample ``i`` of a seed depends only on ``(seed, i)``; families are assigned round-robin, and every
``round(1 / test_fraction)``-th sample of each family is held out (as in `mllm_mod.data.synth`). The
records are LLaVA conversation JSON; `blank_image` is the control picture (background only).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .synth import COLORS, SHAPES, Family, Sample, canvas, sample_record, write_splits

SIZE = 96  # picture side, px
CELL = 8  # one lattice cell = one vision patch at patch_size 8
GRID = SIZE // CELL  # 12 x 12 = 144 cells
RADIUS = 3.0  # an object is at most 7 px wide: it never leaves its cell
GREY = (128, 128, 128)
MAX_COUNT = 5  # `count`: 0-5 red objects among 6 distractors
MAX_COUNT9 = 9  # `count9`: 0-9 red objects among 8 distractors (the "counting 0-9")
COLORCOUNT_COLORS = ("red", "blue")  # `colorcount`: the question names one; 0-5 of each are drawn
QUADRANTS = ("topleft", "topright", "bottomleft", "bottomright")
REGIONS = 3  # the `where` family names a region of a 3 x 3 split of the picture


def cell_centre(row: int, col: int) -> tuple[float, float]:
    return col * CELL + CELL / 2, row * CELL + CELL / 2  # (x, y)


def random_cells(rng: np.random.Generator, k: int, cells: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """`k` distinct cells (row, col), drawn from `cells` (flat indices) or the whole lattice."""
    pool = np.arange(GRID * GRID) if cells is None else np.asarray(cells)
    chosen = rng.choice(pool, size=k, replace=False)
    return [(int(c) // GRID, int(c) % GRID) for c in chosen]


def draw_objects(objects: Sequence[tuple[tuple[int, int], tuple[int, int, int]]], rng: np.random.Generator) -> np.ndarray:
    """Small objects of random shape, one per cell: ``[((row, col), rgb), ...]`` -> picture [H, W, 3]."""
    image, draw = canvas(SIZE)
    for (row, col), rgb in objects:
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        draw_small(draw, shape, rgb, *cell_centre(row, col))
    return np.asarray(image)


def draw_small(draw: ImageDraw.ImageDraw, shape: str, rgb: tuple[int, int, int], x: float, y: float) -> None:
    """A circle, square or triangle of radius `RADIUS` centred at (x, y)."""
    r = RADIUS
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=rgb)
    elif shape == "square":
        draw.rectangle((x - r, y - r, x + r, y + r), fill=rgb)
    else:
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=rgb)


def other_colors(exclude: Sequence[str]) -> list[str]:
    return [c for c in COLORS if c not in exclude]


# -- families ----------------------------------------------------------------------------------------
def scatter(rng: np.random.Generator, groups: Sequence[tuple[int, Sequence[tuple[int, int, int]]]]) -> np.ndarray:
    """Small objects on distinct random cells: for each ``(n, palette)`` group, n objects whose colour is the
    palette's one colour or, for a longer palette, drawn from it per object -> picture [H, W, 3]."""
    cells = random_cells(rng, sum(n for n, _ in groups))
    objects, first = [], 0
    for n, palette in groups:
        for cell in cells[first : first + n]:
            objects.append((cell, palette[0] if len(palette) == 1 else palette[int(rng.integers(len(palette)))]))
        first += n
    return draw_objects(objects, rng)


def red_among_distractors(rng: np.random.Generator, max_count: int, distractors: int) -> tuple[int, np.ndarray]:
    """0..`max_count` red objects (uniform) among `distractors` others (grey, or another colour):
    (the number of red objects, the picture [H, W, 3])."""
    n = int(rng.integers(0, max_count + 1))
    palette = [GREY] + [COLORS[c] for c in other_colors(["red"])]
    return n, scatter(rng, [(n, [COLORS["red"]]), (distractors, palette)])


def make_count(rng: np.random.Generator, size: int) -> Sample:
    """0-5 red objects among 6 distractors (grey, or another colour)."""
    n, picture = red_among_distractors(rng, MAX_COUNT, 6)
    return Sample("how many red objects are there ?", str(n), [picture])


def make_count9(rng: np.random.Generator, size: int) -> Sample:
    """0-9 red objects among 8 distractors (grey, or another colour)."""
    n, picture = red_among_distractors(rng, MAX_COUNT9, 8)
    return Sample("how many red objects are in the picture ?", str(n), [picture])


def make_colorcount(rng: np.random.Generator, size: int) -> Sample:
    """0-5 objects of the named colour (red or blue) and, independently, 0-5 of the other, among 4 grey ones:
    the count to read depends on the question."""
    named = COLORCOUNT_COLORS[int(rng.integers(2))]
    other = COLORCOUNT_COLORS[1 - COLORCOUNT_COLORS.index(named)]
    n, m = int(rng.integers(0, MAX_COUNT + 1)), int(rng.integers(0, MAX_COUNT + 1))
    picture = scatter(rng, [(n, [COLORS[named]]), (m, [COLORS[other]]), (4, [GREY])])
    return Sample(f"how many {named} objects are there ?", str(n), [picture])


def make_presence(rng: np.random.Generator, size: int) -> Sample:
    """Eight grey objects and one coloured one; the question names its colour half of the time."""
    colors = list(COLORS)
    shown = colors[int(rng.integers(len(colors)))]
    present = bool(rng.integers(2))
    asked = shown if present else other_colors([shown])[int(rng.integers(len(colors) - 1))]
    cells = random_cells(rng, 9)
    objects = [(cells[0], COLORS[shown])] + [(cell, GREY) for cell in cells[1:]]
    return Sample(f"is there a {asked} object ?", "yes" if present else "no", [draw_objects(objects, rng)])


def make_oddquad(rng: np.random.Generator, size: int) -> Sample:
    """Three objects per quadrant, all of one colour but one object of another colour in one quadrant."""
    base, odd = (list(COLORS)[i] for i in rng.choice(len(COLORS), size=2, replace=False))
    target = int(rng.integers(4))
    half = GRID // 2
    objects = []
    for q in range(4):
        r0, c0 = (q // 2) * half, (q % 2) * half
        cells = [(r0 + r) * GRID + c0 + c for r in range(half) for c in range(half)]
        chosen = random_cells(rng, 3, cells)
        for j, cell in enumerate(chosen):
            objects.append((cell, COLORS[odd] if (q == target and j == 0) else COLORS[base]))
    return Sample("which quadrant is different ?", QUADRANTS[target], [draw_objects(objects, rng)])


def make_where(rng: np.random.Generator, size: int) -> Sample:
    """One small object in each region of a 3 x 3 split (4 x 4 cells each); asks one region's colour."""
    span = GRID // REGIONS
    names = list(COLORS)
    objects, colors = [], []
    for region in range(REGIONS * REGIONS):
        r0, c0 = (region // REGIONS) * span, (region % REGIONS) * span
        cells = [(r0 + r) * GRID + c0 + c for r in range(span) for c in range(span)]
        (cell,) = random_cells(rng, 1, cells)
        color = names[int(rng.integers(len(names)))]
        objects.append((cell, COLORS[color]))
        colors.append(color)
    region = int(rng.integers(REGIONS * REGIONS))
    question = f"what color is the object in row {region // REGIONS + 1} column {region % REGIONS + 1} ?"
    return Sample(question, colors[region], [draw_objects(objects, rng)])


def make_relpos(rng: np.random.Generator, size: int) -> Sample:
    """Two named coloured objects at least 3 columns apart, among six grey ones."""
    first, second = (list(COLORS)[i] for i in rng.choice(len(COLORS), size=2, replace=False))
    first_left = bool(rng.integers(2))
    left_col = int(rng.integers(0, GRID - 3))
    right_col = int(rng.integers(left_col + 3, GRID))
    rows = rng.integers(0, GRID, size=2)
    cols = (left_col, right_col) if first_left else (right_col, left_col)
    named = [(int(rows[0]), cols[0]), (int(rows[1]), cols[1])]
    taken = {r * GRID + c for r, c in named}
    grey = random_cells(rng, 6, [c for c in range(GRID * GRID) if c not in taken])
    objects = [(named[0], COLORS[first]), (named[1], COLORS[second])] + [(cell, GREY) for cell in grey]
    question = f"is the {first} object left or right of the {second} object ?"
    return Sample(question, "left" if first_left else "right", [draw_objects(objects, rng)])


def families() -> dict[str, Family]:
    """The localised families, in round-robin order."""
    colors = tuple(COLORS)
    where_questions = tuple(
        f"what color is the object in row {r + 1} column {c + 1} ?" for r in range(REGIONS) for c in range(REGIONS)
    )
    out = [
        Family("count", tuple(str(i) for i in range(MAX_COUNT + 1)), make_count, ("how many red objects are there ?",)),
        Family("presence", ("yes", "no"), make_presence, tuple(f"is there a {c} object ?" for c in colors)),
        Family("oddquad", QUADRANTS, make_oddquad, ("which quadrant is different ?",)),
        Family("where", colors, make_where, where_questions),
        Family("relpos", ("left", "right"), make_relpos, ("is the red object left or right of the blue object ?", *colors)),
        Family("count9", tuple(str(i) for i in range(MAX_COUNT9 + 1)), make_count9,
               ("how many red objects are in the picture ?",)),
        Family("colorcount", tuple(str(i) for i in range(MAX_COUNT + 1)), make_colorcount,
               tuple(f"how many {c} objects are there ?" for c in COLORCOUNT_COLORS)),
    ]
    return {f.name: f for f in out}


def vocabulary() -> list[str]:
    """Words of the questions and answers that `mllm_mod.tiny.BASE_WORDS` lacks."""
    from ..tiny import BASE_WORDS

    words: dict[str, None] = {}
    for family in families().values():
        for text in (*family.questions, *family.answers):
            words.update(dict.fromkeys(text.split()))
    return [w for w in words if w not in BASE_WORDS]


def blank_image() -> Image.Image:
    """The control picture: the background alone (no object), the suite's size."""
    return Image.new("RGB", (SIZE, SIZE), (255, 255, 255))


def generate(
    out: str | Path,
    n_train: int,
    n_test: int,
    seed: int = 0,
    only: Sequence[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write ``train.json``, ``test.json``, ``meta.json`` and ``images/`` under `out`: exactly `n_train`
    training and `n_test` held-out samples *per family* (see `held_out`). Returns the meta dict."""
    from tqdm.auto import tqdm

    registry = families()
    if only is not None:
        unknown = sorted(set(only) - set(registry))
        if unknown:
            raise ValueError(f"unknown localised families {unknown}; available: {sorted(registry)}")
        registry = {k: v for k, v in registry.items() if k in only}
    if n_test <= 0 or n_train <= 0:
        raise ValueError(f"n_train and n_test must be positive, got {n_train}, {n_test}")
    chosen = list(registry.values())
    root = Path(out)
    (root / "images").mkdir(parents=True, exist_ok=True)
    per_family = n_train + n_test
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
    for i in tqdm(range(per_family * len(chosen)), desc="localised data", disable=not progress, unit="sample"):
        family = chosen[i % len(chosen)]
        nth = i // len(chosen)
        sample = family.make(np.random.default_rng([seed, i]), SIZE)
        rel = f"images/{family.name}-{i:06d}.png"
        Image.fromarray(sample.media[0]).save(root / rel)
        split = "test" if held_out(nth, n_train, n_test) else "train"
        splits[split].append(sample_record(family, i, sample, rel))
    meta = {
        "suite": "localized",
        "seed": seed,
        "size": SIZE,
        "cell": CELL,
        "families": {f.name: {"chance": f.chance, "answers": list(f.answers)} for f in chosen},
        "counts": {k: len(v) for k, v in splits.items()},
        "vocabulary": vocabulary(),
    }
    return write_splits(root, splits, meta)


def held_out(nth: int, n_train: int, n_test: int) -> bool:
    """Whether the `nth` sample of a family is held out: exactly `n_test` of the first
    ``n_train + n_test``, spread evenly (Bresenham) over them."""
    total = n_train + n_test
    return (nth + 1) * n_test // total != nth * n_test // total


def family_answers(make: Callable[[np.random.Generator, int], Sample], n: int, seed: int = 0) -> list[str]:
    """The answers of `n` samples of one family (for checking that they are uniform)."""
    return [make(np.random.default_rng([seed, i]), SIZE).answer for i in range(n)]
