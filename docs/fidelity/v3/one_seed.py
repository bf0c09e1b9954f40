"""Runs one seed of the study in runs/study_v3 through the package's own Study.base / Study.run_arm
(the same code `mllm-mod study` runs), in a second process beside the main command, and writes each arm
result where the main command looks for it (it skips arms already done)."""
import json, sys, time
import torch
sys.path.insert(0, "/work/main")
from transformers import AutoProcessor
from mllm_mod.study import ZOO_ARMS, Study, StudySettings, build_eval_set
# the arms the three targets need first (dense, pmod, random_routing, fastv, fastv_ft), then the rest
ORDER = ["dense", "pmod", "random_routing", "fastv", "fastv_ft", "random_drop", *ZOO_ARMS, "pmod_c50", "pmod_c30", "gmod"]

seed = int(sys.argv[1]); out = sys.argv[2]
s = StudySettings()
torch.set_num_threads(s.threads)
study = Study(out, s)
study.check_settings()
meta = study.data()
base = study.base(seed, meta)
processor = AutoProcessor.from_pretrained(base)
test = json.loads((study.data_dir / "test.json").read_text())
eval_set = build_eval_set(processor, test, str(study.data_dir), s)
assert sorted(ORDER) == sorted(s.arms)
for arm in ORDER:
    if study.done(seed, arm):
        continue
    t0 = time.time()
    result = study.run_arm(seed, arm, processor, eval_set)
    path = study.arm_path(seed, arm)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(path)
    print(f"[helper] seed {seed} {arm} done in {time.time() - t0:.0f}s", flush=True)
