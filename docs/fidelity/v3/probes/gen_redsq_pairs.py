import sys
sys.path.insert(0, "/work/main")
import numpy as np
from mllm_mod.data import localized as L
from mllm_mod.data.synth import COLORS, Family, Sample

def make_redsq(rng, size):
    """0-5 red squares among 4 red non-squares and 4 non-red squares."""
    n = int(rng.integers(0, 6)); cells = L.random_cells(rng, n + 8)
    img, draw = L.canvas(L.SIZE)
    others = [c for c in COLORS if c != "red"]
    for i, (r, c) in enumerate(cells):
        if i < n: shape, col = "square", "red"
        elif i < n + 4: shape, col = ("circle", "triangle")[int(rng.integers(2))], "red"
        else: shape, col = "square", others[int(rng.integers(len(others)))]
        L.draw_small(draw, shape, COLORS[col], *L.cell_centre(r, c))
    return Sample("how many red square objects are there ?", str(n), [np.asarray(img)])

def make_pairs(rng, size):
    """0-4 red objects with a blue object right of them, among reversed pairs and lone red/blue ones."""
    n = int(rng.integers(0, 5))
    while True:
        grid = {}
        ok = True
        starts = rng.choice([r * L.GRID + c for r in range(L.GRID) for c in range(L.GRID - 1)], size=8, replace=False)
        for i, s in enumerate(starts):
            r, c = divmod(int(s), L.GRID)
            a, b = ("red", "blue") if i < n else ("blue", "red")
            if (r, c) in grid or (r, c + 1) in grid: ok = False; break
            grid[(r, c)], grid[(r, c + 1)] = a, b
        if not ok: continue
        true = sum(1 for (r, c), col in grid.items() if col == "red" and grid.get((r, c + 1)) == "blue")
        if true == n: break
    img, draw = L.canvas(L.SIZE)
    for (r, c), col in grid.items():
        L.draw_small(draw, "square", COLORS[col], *L.cell_centre(r, c))
    return Sample("how many red objects have a blue object right of them ?", str(n), [np.asarray(img)])

fams = {"redsq": Family("redsq", tuple(map(str, range(6))), make_redsq, ("how many red square objects are there ?",)),
        "pairs": Family("pairs", tuple(map(str, range(5))), make_pairs, ("how many red objects have a blue object right of them ?",))}
L.families = lambda: fams
words = {}
for f in fams.values():
    for t in (*f.questions, *f.answers): words.update(dict.fromkeys(t.split()))
from mllm_mod.tiny import BASE_WORDS
L.vocabulary = lambda: [w for w in words if w not in BASE_WORDS]
L.generate(sys.argv[1], n_train=1200, n_test=500, seed=0, progress=False)
