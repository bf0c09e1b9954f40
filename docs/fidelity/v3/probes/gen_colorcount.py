import sys
sys.path.insert(0, "/work/main")
import numpy as np
from mllm_mod.data import localized as L
from mllm_mod.data.synth import COLORS, Family, Sample
TARGETS = ("red", "blue")
def make(rng, size):
    """0-5 objects of the named colour (red or blue) and 0-5 of the other, among 4 grey."""
    x = TARGETS[int(rng.integers(2))]; y = TARGETS[1 - TARGETS.index(x)]
    n, m = int(rng.integers(0, 6)), int(rng.integers(0, 6)); cells = L.random_cells(rng, n + m + 4)
    objects = [(c, COLORS[x]) for c in cells[:n]] + [(c, COLORS[y]) for c in cells[n:n + m]] + [(c, L.GREY) for c in cells[n + m:]]
    return Sample(f"how many {x} objects are there ?", str(n), [L.draw_objects(objects, rng)])
fams = {"countc2": Family("countc2", tuple(map(str, range(6))), make, tuple(f"how many {x} objects are there ?" for x in TARGETS))}
L.families = lambda: fams
L.vocabulary = lambda: []
L.generate(sys.argv[1], n_train=int(sys.argv[2]), n_test=500, seed=0, progress=False)
