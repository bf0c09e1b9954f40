"""Fast probe: pre-encoded prompts, loss on the answer token only (or on all assistant tokens via study path)."""
import argparse, json, math, os, sys, time, random
from collections import defaultdict
import torch
from PIL import Image
sys.path.insert(0, "/work/main")
from mllm_mod.study import prompt_batch, interleave
from mllm_mod.tiny import tiny_model
from mllm_mod.data.localized import blank_image
if os.environ.get("QFIRST"):
    def prompt_batch(processor, records, images):
        processor.tokenizer.padding_side = "left"
        texts = []
        for record in records:
            question = record["conversations"][0]["value"].replace("<image>", "").strip()
            messages = [{"role": "user", "content": [{"type": "text", "text": question}, {"type": "image"}]}]
            texts.append(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        return processor(images=list(images), text=texts, return_tensors="pt", padding=True)

p = argparse.ArgumentParser()
p.add_argument("--families", default="count,presence,oddquad,where,relpos")
p.add_argument("--n_train", type=int, default=600)
p.add_argument("--n_test", type=int, default=100)
p.add_argument("--steps", type=int, default=300)
p.add_argument("--bs", type=int, default=32)
p.add_argument("--lr", type=float, default=2e-3)
p.add_argument("--warmup", type=float, default=0.03)
p.add_argument("--hidden", type=int, default=64)
p.add_argument("--layers", type=int, default=4)
p.add_argument("--vlayers", type=int, default=2)
p.add_argument("--vhidden", type=int, default=32)
p.add_argument("--vfl", type=int, default=-1)
p.add_argument("--clip", type=float, default=0.0)
p.add_argument("--init", type=float, default=0.02)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--eval_every", type=int, default=100)
p.add_argument("--threads", type=int, default=1)
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(a.seed); random.seed(a.seed)
p2 = None
root = os.environ.get("PROBE_ROOT", "/work/main/runs/study_full/data")
meta = json.load(open(f"{root}/meta.json"))
fams = a.families.split(",")
train = [r for r in json.load(open(f"{root}/train.json")) if r["family"] in fams]
test = [r for r in json.load(open(f"{root}/test.json")) if r["family"] in fams]
def take(recs, n):
    c = defaultdict(int); out = []
    for r in recs:
        if c[r["family"]] < n: c[r["family"]] += 1; out.append(r)
    return out
train, test = take(train, a.n_train), take(test, a.n_test)
import transformers as tf
from mllm_mod import tiny as T
orig = T.tiny_text_config
if os.environ.get("PROBE_INIT"):  # a curriculum: start from a trained model (its processor too)
    from transformers import AutoModelForImageTextToText, AutoProcessor
    model = AutoModelForImageTextToText.from_pretrained(os.environ["PROBE_INIT"]); proc = AutoProcessor.from_pretrained(os.environ["PROBE_INIT"])
else:
  model, proc = tiny_model("llava", num_layers=a.layers, words=meta["vocabulary"], seed=a.seed, image_size=96, patch_size=8,
                         hidden_size=a.hidden, intermediate_size=2 * a.hidden, initializer_range=a.init)
if a.vlayers != 2 or a.vhidden != 32:
    cfg = model.config
    cfg.vision_config.num_hidden_layers = a.vlayers
    cfg.vision_config.hidden_size = a.vhidden
    cfg.vision_config.intermediate_size = 2 * a.vhidden
    torch.manual_seed(a.seed)
    model = type(model)(cfg)
model.config.vision_feature_layer = a.vfl
tok = proc.tokenizer
def enc(recs, blank=False):
    imgs = [blank_image() if blank else Image.open(os.path.join(root, r["image"])).convert("RGB") for r in recs]
    b = prompt_batch(proc, recs, imgs)
    b["y"] = torch.tensor([tok.convert_tokens_to_ids(r["answer"]) for r in recs])
    return b
t0 = time.time()
TR = enc(train); TE = enc(interleave(test)); BL = enc(take(test, 40), blank=True)
BLrecs = take(test, 40); TErecs = interleave(test)
print(f"encoded {len(train)} train {len(test)} test in {time.time()-t0:.0f}s, T={TR['input_ids'].shape}", flush=True)
opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
W = max(1, int(a.warmup * a.steps))
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / W) * 0.5 * (1 + math.cos(math.pi * min(1, s / a.steps))))
@torch.no_grad()
def evaluate(B, recs):
    model.eval(); hits = defaultdict(list)
    for s in range(0, len(recs), 100):
        sl = {k: v[s:s+100] for k, v in B.items() if k != "y"}
        pred = model(**sl, logits_to_keep=1).logits[:, -1].argmax(-1)
        for r, pt, yt in zip(recs[s:s+100], pred.tolist(), B["y"][s:s+100].tolist()):
            hits[r["family"]].append(int(pt == yt))
    model.train()
    acc = {f: round(sum(v)/len(v), 3) for f, v in sorted(hits.items())}
    return acc, round(sum(acc.values())/len(acc), 3)
N = len(train); perm = []
model.train(); t0 = time.time(); run = 0
for step in range(1, a.steps + 1):
    if len(perm) < a.bs: perm += random.sample(range(N), N)
    idx = torch.tensor(perm[:a.bs]); perm = perm[a.bs:]
    b = {k: v[idx] for k, v in TR.items() if k != "y"}
    logits = model(**b, logits_to_keep=1).logits[:, -1]
    loss = torch.nn.functional.cross_entropy(logits, TR["y"][idx])
    opt.zero_grad(); loss.backward()
    if a.clip: torch.nn.utils.clip_grad_norm_(model.parameters(), a.clip)
    opt.step(); sched.step()
    run = 0.9 * run + 0.1 * loss.item() if step > 1 else loss.item()
    if step % a.eval_every == 0 or step == a.steps:
        acc, m = evaluate(TE, TErecs); _, bm = evaluate(BL, BLrecs)
        print(f"step {step} loss {run:.3f} acc {m} {acc} blank {bm} t {time.time()-t0:.0f}s", flush=True)
if os.environ.get("PROBE_SAVE"):
    model.save_pretrained(os.environ["PROBE_SAVE"]); proc.save_pretrained(os.environ["PROBE_SAVE"])
