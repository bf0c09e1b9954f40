"""Where is the answer computed? Accuracy of a trained model with vision tokens withdrawn / dropped from layer K."""
import json, os, sys, copy
import torch
sys.path.insert(0, "/work/main")
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
from mllm_mod.study import prompt_batch
if os.environ.get("QFIRST"):
    def prompt_batch(processor, records, images):
        processor.tokenizer.padding_side = "left"
        texts = []
        for record in records:
            question = record["conversations"][0]["value"].replace("<image>", "").strip()
            messages = [{"role": "user", "content": [{"type": "text", "text": question}, {"type": "image"}]}]
            texts.append(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        return processor(images=list(images), text=texts, return_tensors="pt", padding=True)
from mllm_mod.eval.zoo import apply_zoo
from mllm_mod.eval.baselines import apply_baseline
from mllm_mod import unload
torch.set_num_threads(1)
src, root, fam = sys.argv[1], sys.argv[2], sys.argv[3]
n = int(sys.argv[4]) if len(sys.argv) > 4 else 300
model = AutoModelForImageTextToText.from_pretrained(src).eval(); proc = AutoProcessor.from_pretrained(src)
test = [r for r in json.load(open(f"{root}/test.json")) if r["family"] == fam][:n]
imgs = [Image.open(os.path.join(root, r["image"])).convert("RGB") for r in test]
B = prompt_batch(proc, test, imgs)
y = torch.tensor([proc.tokenizer.convert_tokens_to_ids(r["answer"]) for r in test])
@torch.no_grad()
def acc(m):
    hits = 0
    for s in range(0, len(test), 100):
        sl = {k: v[s:s+100] for k, v in B.items()}
        hits += (m(**sl, logits_to_keep=1).logits[:, -1].argmax(-1) == y[s:s+100]).sum().item()
    return round(hits / len(test), 3)
print(src, fam, "dense", acc(model), flush=True)
for k in (1, 2, 3):
    apply_zoo(model, "vtw", withdraw_layer=k); print(f"vtw K={k}", acc(model), flush=True); unload(model)
for r in (0.5, 0.8):
    for meth in ("random", "fastv"):
        apply_baseline(model, meth, prune_layer=1, prune_ratio=r, seed=0); print(f"{meth} K=1 R={r}", acc(model), flush=True); unload(model)
