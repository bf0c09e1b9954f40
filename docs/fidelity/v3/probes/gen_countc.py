import sys
sys.path.insert(0, "/work/main")
import numpy as np
from mllm_mod.data import localized as L
from mllm_mod.data.synth import COLORS, Family, Sample
TARGETS = ("red", "green", "blue", "yellow")
def make_countc(rng, size):
    """0-5 objects of the named colour among 6 of the other named colours (random)."""
    x = TARGETS[int(rng.integers(len(TARGETS)))]
    n = int(rng.integers(0, 6)); cells = L.random_cells(rng, n + 6)
    others = [c for c in TARGETS if c != x]
    objects = [(cell, COLORS[x]) for cell in cells[:n]] + [(cell, COLORS[others[int(rng.integers(len(others)))]]) for cell in cells[n:]]
    return Sample(f"how many {x} objects are there ?", str(n), [L.draw_objects(objects, rng)])
fams = {"countc": Family("countc", tuple(map(str, range(6))), make_countc, tuple(f"how many {x} objects are there ?" for x in TARGETS))}
L.families = lambda: fams
L.vocabulary = lambda: []
L.generate(sys.argv[1], n_train=int(sys.argv[2]), n_test=500, seed=0, progress=False)
