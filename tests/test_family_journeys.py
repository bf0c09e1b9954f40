"""The user journeys of issue #15 on every supported family, with tiny random-weight models of the real
classes and their stock processors: `mllm-mod train` on the synthetic LLaVA-JSON data through the family's
processor and chat template, and the lmms-eval plugin's `generate_until` / `loglikelihood` on the synthetic
tasks.

Training: the labels are exactly the assistant turn (decoded: the answer and its end of turn), the vision
placeholders are the family's, every logged loss is finite, the LM loss on the training data goes down, the
LLM and the routers change and the vision tower does not, and the saved MoD checkpoint reloads with the
trained model's logits bit for bit.

Evaluation: the tasks' documents are given different picture sizes and question lengths, so the plugin's
batches hold rows of different lengths (left padding; dynamic-resolution and tiled families: different
vision-token counts too). Every loglikelihood row the plugin scores in a batch has, at every real position,
the logits of that prompt + choice run alone through our own processor call (<= 1e-4), and its NLL; every
generation is the model's greedy continuation of the prompt alone.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import randomize_routers
from logits import assert_logits_close
from PIL import Image

import mllm_mod
from mllm_mod.data import IGNORE_INDEX, Collator, ConversationDataset, DataOptions
from mllm_mod.tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ["llava", "internvl", "idefics3", "smolvlm", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
# what the family's processor puts around / in place of a picture (the chat template writes the first)
MARKERS = {
    "llava": "<image>",
    "internvl": "<img>",
    "idefics3": "<fake_token_around_image>",
    "smolvlm": "<fake_token_around_image>",
    "qwen2_vl": "<|vision_start|>",
    "qwen2_5_vl": "<|vision_start|>",
    "qwen3_vl": "<|vision_start|>",
}
# the evaluation documents get their own picture size (w, h) and question, so a batch is left padded
DOC_SIZES = [(30, 30), (46, 30), (38, 62)]
DOC_QUESTIONS = [
    "what color is the object ?",
    "what color is the object in the picture ?",
    "what is the color of the object in the picture ? answer with a word",
]
STOPS = ("</s>", ".")
MAX_NEW_TOKENS = 4


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Synthetic LLaVA-JSON training data, the synthetic colour tasks (documents varied), and a lazily
    saved stock tiny model + processor per family (``world["base"](family)``)."""
    from mllm_mod.data.synth import generate, vocabulary
    from mllm_mod.eval.synthetic import vocabulary as eval_vocabulary
    from mllm_mod.eval.synthetic import write_tasks

    root = tmp_path_factory.mktemp("journeys")
    generate(root / "synth", 8, seed=0, only=["color", "count"], progress=False)
    tasks = write_tasks(root / "eval", n=len(DOC_SIZES))
    vary_documents(root / "eval")
    words = [*vocabulary(), *eval_vocabulary(), "word"]
    bases: dict[str, object] = {}

    def base(family: str):
        if family not in bases:
            model, processor = tiny_model(family, num_layers=4, words=words)
            bases[family] = root / "bases" / family
            model.save_pretrained(bases[family])
            processor.save_pretrained(bases[family])
        return bases[family]

    return {"root": root, "tasks": tasks, "base": base}


def vary_documents(root) -> None:
    """Document i of the colour dataset gets picture size DOC_SIZES[i] and question DOC_QUESTIONS[i]."""
    import datasets

    path = root / "data" / "color"
    data = datasets.load_from_disk(str(path))["test"]
    rows = [dict(doc) for doc in data]
    for doc, size, question in zip(rows, DOC_SIZES, DOC_QUESTIONS):
        doc["image"], doc["question"] = doc["image"].convert("RGB").resize(size), question
    varied = datasets.Dataset.from_list(rows).cast_column("image", datasets.Image())
    datasets.DatasetDict({"test": varied}).save_to_disk(str(root / "data" / "color_varied"))
    for name in ("mllm_mod_color", "mllm_mod_color_mc"):
        yaml = root / "tasks" / f"{name}.yaml"
        yaml.write_text(yaml.read_text().replace(str(path), str(root / "data" / "color_varied")))


# -- mllm-mod train -----------------------------------------------------------------------------------
def lm_loss(model, batches: list[dict]) -> float:
    """Mean LM loss over `batches` (eval mode, no gradients)."""
    model.eval()
    with torch.no_grad():
        return sum(float(model(**b).loss) for b in batches) / len(batches)


@pytest.mark.parametrize("family", FAMILIES)
def test_train_cli_through_the_family_processor_and_chat_template(family, world, tmp_path, monkeypatch):
    from transformers import AutoConfig, AutoProcessor

    import mllm_mod.train.recipe as recipe
    from mllm_mod.cli import main

    base, synth = world["base"](family), world["root"] / "synth"
    processor = AutoProcessor.from_pretrained(base)
    tokenizer = processor.tokenizer
    records = json.loads((synth / "train.json").read_text())
    data = ConversationDataset(synth / "train.json", processor, DataOptions(image_folder=str(synth)))
    config = AutoConfig.from_pretrained(base)
    placeholder_ids = torch.tensor(mllm_mod.adapter_for(config).vision_token_ids(config))
    for record, item in zip(records, data):
        ids, labels = item["input_ids"], item["labels"]
        learned = labels != IGNORE_INDEX
        n = int(learned.sum())
        # exactly the assistant turn: the last n tokens, the answer and its end of turn, nothing else
        assert n > 0 and bool(learned[-n:].all()) and torch.equal(labels[learned], ids[-n:])
        assert tokenizer.decode(labels[learned]) == f"{record['conversations'][1]['value']} </s>"
        prompt = tokenizer.decode(ids[:-n])
        assert prompt.startswith("USER :") and prompt.rstrip().endswith("ASSISTANT :")
        assert record["conversations"][0]["value"].split("\n")[-1] in prompt and MARKERS[family] in prompt
        n_vision = int(torch.isin(ids, placeholder_ids).sum())
        assert n_vision > 0 and not bool(torch.isin(ids[learned], placeholder_ids).any())

    trainers = []

    class Recording(recipe.MoDTrainer):
        def train(self, *args, **kwargs):
            trainers.append(self)
            return super().train(*args, **kwargs)

    monkeypatch.setattr(recipe, "MoDTrainer", Recording)
    out = tmp_path / "out"
    argv = ["train", "--model", str(base), "--data", str(synth / "train.json"), "--image-folder", str(synth),
            "--output-dir", str(out), "--preset", "pmod", "--lr", "1e-3", "batch_size=4", "num_workers=0",
            "max_steps=4", "gradient_checkpointing=false", "progress=false", "bf16=false", "seed=0"]  # fmt: skip
    assert main(argv) == 0
    (trainer,) = trainers
    logged = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in logged if "loss" in e]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)

    # the LM loss on the training data went down, from the freshly retrofitted model to the trained one
    collate = Collator(tokenizer.pad_token_id)
    batches = [collate([data[i] for i in range(j, min(j + 4, len(data)))]) for j in range(0, len(data), 4)]
    fresh = mllm_mod.retrofit(type(trainer.model).from_pretrained(base), "pmod")
    trained = trainer.model.eval()
    assert lm_loss(trained, batches) < lm_loss(fresh, batches)

    # what trained: the LLM and the routers; the vision tower is frozen (p-MoD's recipe)
    adapter = mllm_mod.adapter_for(trained)
    before, after = fresh.state_dict(), trained.state_dict()
    tower = {n for n, _ in adapter.vision_tower(trained).named_parameters()}
    prefix = next(p for p, m in trained.named_modules() if m is adapter.vision_tower(trained))
    for name, value in after.items():
        if name.startswith(prefix + ".") and name[len(prefix) + 1 :] in tower:
            assert torch.equal(value, before[name]), f"{name}: the frozen vision tower changed"
    decoder = [n for n in after if ".layers." in n and not n.startswith(prefix + ".") and "router" not in n]
    assert any(not torch.equal(after[n], before[n]) for n in decoder)  # the LLM trained
    # routers from zero init; the last layer's gets no gradient (its vision outputs reach no scored position:
    # the answer tokens read the vision tokens' keys and values there, which come from the layer's input)
    last = f"layers.{len(mllm_mod.layer_ratios(trained)) - 1}."
    routers = {k: v for k, v in mllm_mod.mod_state_dict(trained).items() if not k.startswith(last)}
    assert len(routers) == 4 and all(float(v.abs().max()) > 0 for v in routers.values()), routers

    # the saved MoD checkpoint reloads: same config, same logits, bit for bit
    reloaded = mllm_mod.from_pretrained(out).eval()
    assert type(reloaded) is type(trained) and reloaded.config.model_type == trained.config.model_type
    assert mllm_mod.layer_ratios(reloaded) == mllm_mod.layer_ratios(trained) and mllm_mod.layer_ratios(trained)[1] < 1
    with torch.no_grad():
        for batch in batches:
            assert torch.equal(reloaded(**batch).logits, trained(**batch).logits)


# -- the lmms-eval plugin -----------------------------------------------------------------------------
def one_prompt(processor, question: str) -> str:
    """The family's chat prompt for a picture and a question, rendered here (not by the plugin)."""
    content = [{"type": "image"}, {"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)


def reference_generation(model, processor, image, question: str) -> str:
    """Greedy continuation of the prompt alone, cut at the task's stops (`</s>` on the ids, then '.')."""
    inputs = processor(images=[image], text=[one_prompt(processor, question)], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    eos = processor.tokenizer.convert_tokens_to_ids("</s>")
    new = new[: new.index(eos)] if eos in new else new
    return processor.tokenizer.decode(new, skip_special_tokens=True).split(".")[0].strip()


def reference_scoring(model, processor, image, question: str, choice: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(real input ids [T], logits [T, V], NLL of `choice`) of prompt + choice alone."""
    prompt = one_prompt(processor, question)
    inputs = processor(images=[image], text=[prompt + choice], return_tensors="pt")
    n = len(processor.tokenizer(prompt + choice).input_ids) - len(processor.tokenizer(prompt).input_ids)
    with torch.no_grad():
        logits = model(**inputs).logits[0].float()  # [T, V]
    ids = inputs["input_ids"][0]
    logp = torch.log_softmax(logits[:-1], dim=-1)
    return ids, logits, float(-logp[-n:].gather(1, ids[1:][-n:, None]).sum())


@pytest.mark.parametrize("family", FAMILIES)
def test_lmms_eval_plugin_batches_equal_the_model_alone(family, world, tmp_path, monkeypatch):
    """`generate_until` and `loglikelihood` of the plugin (batches of 8, left padded) on the synthetic colour
    tasks, a trained-like MoD adapter on the base model."""
    import datasets
    from lmms_eval import evaluator
    from lmms_eval.tasks import TaskManager
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mllm_mod.eval.lmms_plugin import MoDLMM

    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    base = world["base"](family)
    model = AutoModelForImageTextToText.from_pretrained(base).eval()
    mllm_mod.retrofit(model, "pmod")
    randomize_routers(model)
    mllm_mod.save_mod(model, tmp_path / "adapter")
    processor = AutoProcessor.from_pretrained(base)

    lm = MoDLMM(pretrained=str(base), mod=str(tmp_path / "adapter"), dtype="float32", batch_size="8", max_new_tokens=8)
    scored: list[tuple[torch.Tensor, torch.Tensor]] = []  # (real ids [T], logits [T, V]) of every scored row
    padded: list[bool] = []  # per scoring forward: whether its rows had different lengths
    score_batch = lm.score_batch

    def recording(prompts, continuations, images):
        def keep(module, args, kwargs, out):
            padded.append(bool((~kwargs["attention_mask"].bool()).any()))
            for row, mask, logits in zip(kwargs["input_ids"], kwargs["attention_mask"].bool(), out.logits):
                scored.append((row[mask], logits[mask].float()))

        hook = lm.model.register_forward_hook(keep, with_kwargs=True)
        try:
            return score_batch(prompts, continuations, images)
        finally:
            hook.remove()

    lm.score_batch = recording
    manager = TaskManager("WARNING", include_path=str(world["tasks"]), include_defaults=False)
    res = evaluator.simple_evaluate(model=lm, tasks=["mllm_mod_color", "mllm_mod_color_mc"], task_manager=manager, log_samples=True)
    assert mllm_mod.layer_ratios(lm.model)[1] < 1.0 and "acc,none" in res["results"]["mllm_mod_color_mc"]
    docs = datasets.load_from_disk(str(world["root"] / "eval" / "data" / "color_varied"))["test"]
    images = [doc["image"].convert("RGB") for doc in docs]

    # loglikelihood: rows of different lengths in one batch; each == the prompt + choice alone
    assert any(padded) and len({int(ids.numel()) for ids, _ in scored}) == 3  # three lengths, some batched together
    samples = res["samples"]["mllm_mod_color_mc"]
    assert sorted(s["doc_id"] for s in samples) == [0, 1, 2]
    for s in samples:
        doc = docs[s["doc_id"]]
        for choice, ((nll, greedy),) in zip(doc["choices"], s["resps"]):
            ids, logits, ref_nll = reference_scoring(model, processor, images[s["doc_id"]], doc["question"], " " + choice)
            (row,) = [lg for rid, lg in scored if torch.equal(rid, ids)][:1]  # the plugin's batched row
            assert_logits_close(row, logits, f"plugin loglikelihood batched == alone ({family})")
            assert isinstance(greedy, bool) and nll == pytest.approx(ref_nll, abs=1e-4)

    # generate_until: one batch of three prompts; each text is the greedy continuation of its prompt alone
    generated = {s["doc_id"]: s["resps"][0][0] for s in res["samples"]["mllm_mod_color"]}
    expected = [reference_generation(model, processor, image, doc["question"]) for image, doc in zip(images, docs)]
    assert [generated[i].strip() for i in range(len(docs))] == expected
    assert any(expected)  # not all cut to nothing
