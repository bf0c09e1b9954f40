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

Video (InternVL, SmolVLM, Qwen2-VL, Qwen2.5-VL, Qwen3-VL; LLaVA-1.5 and Idefics3 take none): `mllm-mod train
--preset videomod` on LLaVA-JSON clips and the plugin on the synthetic video tasks, the same checks, plus: every
frame read reaches the processor with its timing (not resampled, not assumed 24 fps) and each frame (a temporal
patch for the Qwen VL families) keeps ceil(r * its tokens) in every MoD layer. Labels are also checked under
chat templates shaped like the released checkpoints' (ChatML with a system turn; end-of-utterance turns).

Gemma 3 (its stock Gemma3Processor, the released gemma-3 chat template with a system turn folded into the first
user turn): the processor's ``token_type_ids`` (1 on each image's placeholders: the stock model's bidirectional
blocks) reach the model in training (kept per token, truncated with the ids, right-padded with 0) and in the
plugin (left padded): a collated batch and a plugin batch give the logits of the stock model, and of a MoD
model, on the processor's own output for each sample alone (<= 1e-4); without them the logits differ.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import loss_grads, randomize_routers
from logits import assert_logits_close

import mllm_mod
from mllm_mod.data import IGNORE_INDEX, Collator, ConversationDataset, DataOptions
from mllm_mod.efficiency import efficiency
from mllm_mod.tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ["llava", "internvl", "idefics3", "smolvlm", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3"]
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
    "gemma3": "<start_of_image>",
}
# how the tiny chat templates lay out a turn: (prompt start, prompt end, end of an assistant turn); Gemma 3's
# is the released gemma-3 template (<start_of_turn>user / model ... <end_of_turn>, BOS written by the template)
TURNS = {family: ("USER :", "ASSISTANT :", "</s>") for family in FAMILIES}
TURNS["gemma3"] = ("<s> <start_of_turn> user", "<start_of_turn> model", "<end_of_turn>")
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
    words = [*vocabulary(), *eval_vocabulary(), "word", "seconds", "00", "01", "02"]  # + the clips' timestamps
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


def recording_trainers(monkeypatch) -> list:
    """The `MoDTrainer` objects `mllm-mod train` builds from now on (to read the trained model in memory)."""
    from mllm_mod.train import recipe

    trainers = []

    class Recording(recipe.MoDTrainer):
        def train(self, *args, **kwargs):
            trainers.append(self)
            return super().train(*args, **kwargs)

    monkeypatch.setattr(recipe, "MoDTrainer", Recording)
    return trainers


@pytest.mark.parametrize("family", FAMILIES)
def test_train_cli_through_the_family_processor_and_chat_template(family, world, tmp_path, monkeypatch):
    from transformers import AutoConfig, AutoProcessor

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
        start, end, eot = TURNS[family]
        assert tokenizer.decode(labels[learned]) == f"{record['conversations'][1]['value']} {eot}"
        prompt = tokenizer.decode(ids[:-n])
        assert prompt.startswith(start) and prompt.rstrip().endswith(end)
        assert record["conversations"][0]["value"].split("\n")[-1] in prompt and MARKERS[family] in prompt
        n_vision = int(torch.isin(ids, placeholder_ids).sum())
        assert n_vision > 0 and not bool(torch.isin(ids[learned], placeholder_ids).any())

    trainers = recording_trainers(monkeypatch)
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


# -- Gemma 3: the bidirectional image blocks come from token_type_ids, in training and in evaluation -------
def differs_without(model, batch: dict, key: str) -> float:
    """Largest logit change when `key` is left out of the batch (how much a test that keeps it can see)."""
    with torch.no_grad():
        return float((model(**batch).logits - model(**{k: v for k, v in batch.items() if k != key}).logits).abs().max())


def test_gemma3_training_batches_carry_the_processors_token_type_ids(world):
    """Gemma 3's processor marks each image's placeholders with ``token_type_ids`` 1; the stock model makes an
    image's tokens attend to each other both ways only when they are passed. The dataset keeps them per
    token (truncated with the ids), the collator right-pads them with 0, and a collated batch gives, at
    every real position, the logits of the stock model (and of a MoD model) on the processor's own output
    for that sample alone, token_type_ids included (<= 1e-4). Leaving them out changes the logits far more."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mllm_mod.data.conversation import assistant_spans, to_messages

    base, synth = world["base"]("gemma3"), world["root"] / "synth"
    processor = AutoProcessor.from_pretrained(base)
    records = json.loads((synth / "train.json").read_text())[:4]
    for i, record in enumerate(records):  # questions of different lengths: a padded batch
        record["conversations"][0]["value"] += " in the picture" * i
    data = ConversationDataset(records, processor, DataOptions(image_folder=str(synth)))
    items = [data[i] for i in range(len(records))]
    image_id = processor.tokenizer.image_token_id
    for item in items:  # [T]: 1 exactly on the image placeholders (not on <start_of_image> / <end_of_image>)
        assert item["token_type_ids"].shape == item["input_ids"].shape
        assert torch.equal(item["token_type_ids"], (item["input_ids"] == image_id).long())
    assert len({int(item["input_ids"].numel()) for item in items}) > 1  # the batch is padded
    batch = Collator(processor.tokenizer.pad_token_id)(items)
    for b, item in enumerate(items):  # right padding, with 0 (no image block in the padding)
        n = item["input_ids"].numel()
        assert torch.equal(batch["token_type_ids"][b, :n], item["token_type_ids"]) and not bool(batch["token_type_ids"][b, n:].any())

    stock = AutoModelForImageTextToText.from_pretrained(base).eval()
    mod = mllm_mod.retrofit(AutoModelForImageTextToText.from_pretrained(base).eval(), "pmod")
    randomize_routers(mod)
    forward = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():  # the pictures matter (the tiny projector is random, not the stock init's zeros)
        swapped = stock(**{**forward, "pixel_values": forward["pixel_values"].flip(0)}).logits
        assert float((swapped - stock(**forward).logits).abs().max()) > 1e-2
    for name, model in (("stock", stock), ("pmod", mod)):
        with torch.no_grad():
            logits = model(**forward).logits.float()
            for b, record in enumerate(records):
                text, _ = assistant_spans(processor, to_messages(record["conversations"]))
                image = Image.open(synth / record["image"]).convert("RGB")
                alone = processed_alone(processor, text, image)  # the processor's own output
                assert int((alone["input_ids"] == processor.tokenizer.bos_token_id).sum()) == 1  # one BOS: the template's
                assert torch.equal(alone["token_type_ids"][0], items[b]["token_type_ids"]) and torch.equal(alone["input_ids"][0], items[b]["input_ids"])
                n = alone["input_ids"].shape[1]
                assert_logits_close(logits[b, :n], model(**alone).logits[0].float(), f"collated batch == processor alone (gemma3, {name})")
        assert differs_without(model, forward, "token_type_ids") > 1e-2  # a batch without them would fail the check

    # truncation keeps them aligned with the ids (a cut in the answer)
    n = items[0]["input_ids"].numel()
    (cut,) = ConversationDataset(records[:1], processor, DataOptions(image_folder=str(synth), max_length=n - 1))
    assert torch.equal(cut["token_type_ids"], items[0]["token_type_ids"][: n - 1])


def test_gemma3_gradient_checkpointing_gives_the_same_gradients(world):
    """A collated Gemma 3 batch (token_type_ids, sliding windows, sandwich norms) through a pmod model in
    training mode: the MoD layers recomputed under gradient checkpointing give the plain gradients."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mllm_mod.compat import enable_checkpointing
    from mllm_mod.train.params import set_trainable

    base, synth = world["base"]("gemma3"), world["root"] / "synth"
    processor = AutoProcessor.from_pretrained(base)
    data = ConversationDataset(synth / "train.json", processor, DataOptions(image_folder=str(synth)))
    batch = Collator(processor.tokenizer.pad_token_id)([data[i] for i in range(4)])
    model = mllm_mod.retrofit(AutoModelForImageTextToText.from_pretrained(base), "pmod")
    randomize_routers(model)
    set_trainable(model)
    model.train()

    plain = loss_grads(model, batch)
    enable_checkpointing(model, {"use_reentrant": False})
    assert all(m.gradient_checkpointing for m in model.modules() if isinstance(m, mllm_mod.MoDLayer))
    checkpointed = loss_grads(model, batch)
    assert plain.keys() == checkpointed.keys() and any(".router." in k for k in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_gemma3_plugin_left_pads_the_token_type_ids(world, monkeypatch):
    """The plugin's batches (left padded by the processor) carry ``token_type_ids`` aligned with the ids, 0 on
    the padding; the batched prompts' logits == each prompt alone with its token_type_ids (<= 1e-4), and
    leaving them out would change the logits."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    from mllm_mod.eval.lmms_plugin import MoDLMM

    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    base = world["base"]("gemma3")
    lm = MoDLMM(pretrained=str(base), preset="pmod", dtype="float32", batch_size="3")
    randomize_routers(lm.model)
    images = [Image.new("RGB", size, colour) for size, colour in zip(DOC_SIZES, ("red", "green", "blue"))]
    prompts = [lm.prompt(question, [image]) for question, image in zip(DOC_QUESTIONS, images)]
    batch = lm.encode(prompts, [[image] for image in images])
    image_id = lm.tokenizer.image_token_id
    bos = lm.tokenizer.bos_token_id  # one per row (the template writes it; the tokenizer would add another)
    assert (batch["input_ids"] == bos).sum(1).tolist() == [1, 1, 1] and lm.tokenizer("what").input_ids[0] == bos
    assert torch.equal(batch["token_type_ids"], (batch["input_ids"] == image_id).long())
    assert bool((batch["attention_mask"] == 0).any()) and not bool(batch["token_type_ids"][batch["attention_mask"] == 0].any())
    stock = AutoModelForImageTextToText.from_pretrained(base).eval()
    for name, model in (("stock", stock), ("pmod", lm.model)):
        with torch.no_grad():
            logits = model(**batch).logits.float()
            for b, (prompt, image) in enumerate(zip(prompts, images)):
                alone = lm.encode([prompt], [[image]])
                n = alone["input_ids"].shape[1]
                assert torch.equal(batch["input_ids"][b, -n:], alone["input_ids"][0])
                assert torch.equal(batch["token_type_ids"][b, -n:], alone["token_type_ids"][0])
                assert_logits_close(logits[b, -n:], model(**alone).logits[0].float(), f"plugin batch == alone (gemma3, {name})")
        assert differs_without(model, batch, "token_type_ids") > 1e-2


# -- the lmms-eval plugin -----------------------------------------------------------------------------
def one_prompt(processor, question: str) -> str:
    """The family's chat prompt for a picture and a question, rendered here (not by the plugin)."""
    content = [{"type": "image"}, {"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)


def processed_alone(processor, text: str, image) -> dict:
    """The processor's output for one rendered prompt and its picture, without a second BOS where the chat
    template wrote one (Gemma 3), as transformers' ``apply_chat_template(tokenize=True)`` does."""
    bos = processor.tokenizer.bos_token
    return processor(images=[image], text=[text], return_tensors="pt", add_special_tokens=not text.startswith(bos))


def reference_generation(model, processor, image, question: str) -> str:
    """Greedy continuation of the prompt alone, cut at the task's stops (`</s>` on the ids, then '.')."""
    inputs = processed_alone(processor, one_prompt(processor, question), image)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    eos = processor.tokenizer.convert_tokens_to_ids("</s>")
    new = new[: new.index(eos)] if eos in new else new
    return processor.tokenizer.decode(new, skip_special_tokens=True).split(".")[0].strip()


def reference_scoring(model, processor, image, question: str, choice: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(real input ids [T], logits [T, V], NLL of `choice`) of prompt + choice alone."""
    prompt = one_prompt(processor, question)
    inputs = processed_alone(processor, prompt + choice, image)
    n = len(processor.tokenizer(prompt + choice).input_ids) - len(processor.tokenizer(prompt).input_ids)
    with torch.no_grad():
        logits = model(**inputs).logits[0].float()  # [T, V]
    ids = inputs["input_ids"][0]
    logp = torch.log_softmax(logits[:-1], dim=-1)
    return ids, logits, float(-logp[-n:].gather(1, ids[1:][-n:, None]).sum())


def record_scoring(lm) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[bool]]:
    """Record, while the plugin scores loglikelihood batches, every row's (real ids [T], logits [T, V]) and,
    per forward, whether its rows had different lengths (left padding)."""
    scored: list[tuple[torch.Tensor, torch.Tensor]] = []
    padded: list[bool] = []
    score_batch = lm.score_batch

    def keep(module, args, kwargs, out):
        padded.append(bool((~kwargs["attention_mask"].bool()).any()))
        for row, mask, logits in zip(kwargs["input_ids"], kwargs["attention_mask"].bool(), out.logits):
            scored.append((row[mask], logits[mask].float()))

    def recording(prompts, continuations, images):
        hook = lm.model.register_forward_hook(keep, with_kwargs=True)
        try:
            return score_batch(prompts, continuations, images)
        finally:
            hook.remove()

    lm.score_batch = recording
    return scored, padded


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
    scored, padded = record_scoring(lm)
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


# -- video: videomod training on clips, the plugin on the synthetic video tasks --------------------------------
VIDEO_FAMILIES = ["internvl", "smolvlm", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"]  # LLaVA-1.5 and Idefics3 take no video
CLIP_FRAMES, CLIP_FPS = 8, 4.0  # the synthetic motion clips: 8 frames at 4 fps, all read (num_frames=8)
# frames (groups) per clip as the family lays them out: InternVL and SmolVLM one run per frame, the Qwen VL
# families one group per temporal patch (2 frames)
CLIP_GROUPS = {"internvl": 8, "smolvlm": 8, "qwen2_vl": 4, "qwen2_5_vl": 4, "qwen3_vl": 4}
CLIP_TIMING = {"total_num_frames": CLIP_FRAMES, "fps": CLIP_FPS, "frames_indices": list(range(CLIP_FRAMES)), "duration": 2.0}


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Synthetic LLaVA-JSON video data (motion clips) and the synthetic video tasks (questions varied)."""
    import datasets

    from mllm_mod.data.synth import generate
    from mllm_mod.eval.synthetic import SYNTHETIC_VIDEO_TASKS, write_tasks

    root = tmp_path_factory.mktemp("clips")
    generate(root / "synth", 8, seed=0, video=True, only=["motion"], progress=False)
    tasks = write_tasks(root / "eval", n=len(DOC_QUESTIONS), tasks=SYNTHETIC_VIDEO_TASKS)
    path = root / "eval" / "data" / "motion"
    rows = [dict(doc) for doc in datasets.load_from_disk(str(path))["test"]]
    for doc, question in zip(rows, ("which object moved ?", "which object moved in the video ?", "what is the color of the object moved in the video ?")):
        doc["question"] = question
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(root / "eval" / "data" / "motion_varied"))
    for name in ("mllm_mod_motion", "mllm_mod_motion_mc"):
        yaml = tasks / f"{name}.yaml"
        yaml.write_text(yaml.read_text().replace(str(path), str(root / "eval" / "data" / "motion_varied")))
    return {"root": root, "tasks": tasks, "docs": rows}


def read_frames(path) -> np.ndarray:
    """All frames of a clip [F, H, W, 3], read here with decord (not through `mllm_mod.data`)."""
    import decord

    reader = decord.VideoReader(str(path))
    assert len(reader) == CLIP_FRAMES and reader.get_avg_fps() == CLIP_FPS
    return reader.get_batch(list(range(CLIP_FRAMES))).asnumpy()


def frame_counts(model, batch: dict) -> list[list[int]]:
    """Per sample, the number of placeholders of each routing group (a frame, or a temporal patch)."""
    ctx = mllm_mod.adapter_for(model).routing_context(model, batch["input_ids"], None, batch["attention_mask"], inputs=batch)
    return [torch.unique(g[g >= 0], return_counts=True)[1].tolist() for g in ctx.groups]


def test_a_read_clip_carries_its_timing_to_the_processor(clips):
    """`load_video` returns the frames read with where they came from; the processor kwargs carry it, a
    slice (other frames) drops it (a batch mixing timed and untimed clips is refused), and plain frames still
    go through, never resampled by the processor."""
    from mllm_mod.data.media import Clip, load_video, video_processor_kwargs

    path = clips["root"] / "synth" / json.loads((clips["root"] / "synth" / "train.json").read_text())[0]["video"]
    clip = load_video(path, "x", num_frames=4)
    assert isinstance(clip, Clip) and clip.shape == (4, 30, 30, 3)
    assert clip.metadata == {**CLIP_TIMING, "frames_indices": [1, 3, 5, 7], "height": 30, "width": 30}
    assert np.array_equal(clip, read_frames(path)[1::2])
    kwargs = video_processor_kwargs([[clip], []])  # one list per prompt
    assert kwargs["video_metadata"] == [clip.metadata] and kwargs["do_sample_frames"] is False
    assert len(kwargs["videos"]) == 2 and type(kwargs["videos"][0][0]) is np.ndarray and kwargs["videos"][1] == []
    assert clip[:2].metadata is None
    with pytest.raises(ValueError, match=r"clips \[1\] of this batch carry no timing"):  # never 24 fps for some only
        video_processor_kwargs([[clip], [clip[:2]]])
    plain = video_processor_kwargs([[np.asarray(clip)]])
    assert sorted(plain) == ["do_sample_frames", "videos"] and plain["do_sample_frames"] is False
    assert video_processor_kwargs([]) == video_processor_kwargs([[], []]) == {}


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_videomod_train_cli_on_clips_through_the_family_processor(family, world, clips, tmp_path, monkeypatch):
    """`mllm-mod train --preset videomod` on LLaVA-JSON clips: every frame read reaches the processor with its
    timing (not resampled, not assumed 24 fps), labels are the assistant turn, the loss goes down, each frame
    keeps ceil(r * its tokens) in every MoD layer, and the checkpoint reloads bit for bit."""
    from transformers import AutoProcessor

    from mllm_mod.cli import main

    base, synth = world["base"](family), clips["root"] / "synth"
    processor = AutoProcessor.from_pretrained(base)
    records = json.loads((synth / "train.json").read_text())
    data = ConversationDataset(synth / "train.json", processor, DataOptions(video_folder=str(synth), num_frames=CLIP_FRAMES))
    first = data[0]
    # the same as the processor given the clip's frames and timing by hand
    from mllm_mod.data.conversation import TEXT_KEYS, assistant_spans, to_messages

    frames = read_frames(synth / records[0]["video"])
    text, _ = assistant_spans(processor, to_messages(records[0]["conversations"]))
    by_hand = processor(text=[text], videos=[[frames]], video_metadata=[CLIP_TIMING], do_sample_frames=False, return_tensors="pt")
    for key, value in by_hand.items():  # per-token keys are kept as [T], the rest as the processor gives them
        assert torch.equal(first[key], value[0] if key in TEXT_KEYS else value), key
    if family == "qwen2_5_vl":  # seconds per temporal patch: 2 frames at 4 fps (temporal M-RoPE positions)
        assert first["second_per_grid_ts"].tolist() == [0.5]
    if family.startswith("qwen"):
        assert first["video_grid_thw"][0, 0] == CLIP_FRAMES // 2  # every frame read is used
    for record, item in zip(records, data):
        learned = item["labels"] != IGNORE_INDEX
        n = int(learned.sum())
        assert bool(learned[-n:].all()) and processor.tokenizer.decode(item["labels"][learned]).split()[0] == record["conversations"][1]["value"]

    trainers = recording_trainers(monkeypatch)
    out = tmp_path / "out"
    argv = ["train", "--model", str(base), "--data", str(synth / "train.json"), "--video-folder", str(synth),
            "--output-dir", str(out), "--preset", "videomod", "--lr", "1e-3", "--num-frames", str(CLIP_FRAMES),
            "batch_size=4", "num_workers=0", "max_steps=4", "gradient_checkpointing=false", "progress=false", "bf16=false"]  # fmt: skip
    assert main(argv) == 0
    trained = trainers[0].model.eval()
    losses = [json.loads(line).get("loss") for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(x) for x in losses if x is not None)
    collate = Collator(processor.tokenizer.pad_token_id)
    batches = [collate([data[i] for i in range(j, j + 4)]) for j in range(0, len(data), 4)]
    fresh = mllm_mod.retrofit(type(trained).from_pretrained(base), "videomod")
    assert lm_loss(trained, batches) < lm_loss(fresh, batches)

    # videomod: each frame keeps ceil(r * its tokens) in every MoD layer, the text all of it (measured in the cache)
    batch = batches[0]
    counts = frame_counts(trained, batch)
    assert [len(c) for c in counts] == [CLIP_GROUPS[family]] * 4
    report = efficiency(trained, batch)
    assert report.accounting_matches, report.mismatches
    for layer, ratio in zip(report.kv_entries_per_layer, mllm_mod.layer_ratios(trained)):
        r = np.float32(ratio)
        kept = [t + sum(int(np.ceil(r * n)) if ratio < 1 else n for n in c) for t, c in zip(report.n_text, counts)]
        assert layer == kept

    reloaded = mllm_mod.from_pretrained(out).eval()
    with torch.no_grad():
        for b in batches:
            assert torch.equal(reloaded(**b).logits, trained(**b).logits)


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_lmms_eval_plugin_on_video_tasks_batches_equal_the_model_alone(family, world, clips, tmp_path, monkeypatch):
    """The synthetic video tasks (mp4 files, 8 frames read) through the plugin with a videomod adapter: each
    batched loglikelihood row == prompt + choice alone (its frames and timing given by hand) at every real
    position; each generation == the greedy continuation alone."""
    from lmms_eval import evaluator
    from lmms_eval.tasks import TaskManager
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mllm_mod.eval.lmms_plugin import MoDLMM

    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    base = world["base"](family)
    model = AutoModelForImageTextToText.from_pretrained(base).eval()
    mllm_mod.retrofit(model, "videomod")
    randomize_routers(model)
    mllm_mod.save_mod(model, tmp_path / "adapter")
    processor = AutoProcessor.from_pretrained(base)
    lm = MoDLMM(pretrained=str(base), mod=str(tmp_path / "adapter"), dtype="float32", batch_size="6", num_frames=CLIP_FRAMES)  # 8 choices a question: mixed batches
    scored, padded = record_scoring(lm)
    manager = TaskManager("WARNING", include_path=str(clips["tasks"]), include_defaults=False)
    res = evaluator.simple_evaluate(model=lm, tasks=["mllm_mod_motion", "mllm_mod_motion_mc"], task_manager=manager, log_samples=True)
    assert any(padded) and "acc,none" in res["results"]["mllm_mod_motion_mc"]

    def video_inputs(doc, text: str) -> dict:
        frames = read_frames(doc["video"])
        return processor(text=[text], videos=[[frames]], video_metadata=[CLIP_TIMING], do_sample_frames=False, return_tensors="pt")

    def video_prompt(question: str) -> str:
        content = [{"type": "video"}, {"type": "text", "text": question}]
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)

    docs = clips["docs"]
    for s in res["samples"]["mllm_mod_motion_mc"]:
        doc = docs[s["doc_id"]]
        prompt = video_prompt(doc["question"])
        for choice, ((nll, _),) in zip(doc["choices"], s["resps"]):
            inputs = video_inputs(doc, f"{prompt} {choice}")
            with torch.no_grad():
                logits = model(**inputs).logits[0].float()
            ids = inputs["input_ids"][0]
            (row,) = [lg for rid, lg in scored if torch.equal(rid, ids)][:1]
            assert_logits_close(row, logits, f"plugin loglikelihood batched == alone, video ({family})")
            n = len(processor.tokenizer(f"{prompt} {choice}").input_ids) - len(processor.tokenizer(prompt).input_ids)
            logp = torch.log_softmax(logits[:-1], dim=-1)
            assert nll == pytest.approx(float(-logp[-n:].gather(1, ids[1:][-n:, None]).sum()), abs=1e-4)
    generated = {s["doc_id"]: s["resps"][0][0].strip() for s in res["samples"]["mllm_mod_motion"]}
    eos = processor.tokenizer.convert_tokens_to_ids("</s>")
    for i, doc in enumerate(docs):
        inputs = video_inputs(doc, video_prompt(doc["question"]))
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
        new = out[0, inputs["input_ids"].shape[1] :].tolist()
        new = new[: new.index(eos)] if eos in new else new
        assert generated[i] == processor.tokenizer.decode(new, skip_special_tokens=True).split(".")[0].strip(), i


# -- labels under chat templates shaped like the released checkpoints' ---------------------------------
SYSTEM = "answer the question with a word ."  # the default system turn ("You are a helpful assistant." in Qwen2-VL's)
IM_TEMPLATE = (  # Qwen2-VL / Qwen2.5-VL (and InternVL's, with its own system prompt): ChatML, a default system turn
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "SYSTEM_PROMPT<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}IMAGE{% elif part['type'] == 'video' %}VIDEO"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
UTTERANCE_TEMPLATE = (  # Idefics3 / SmolVLM: "User:<image>...<end_of_utterance>\nAssistant: ...<end_of_utterance>\n"
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% elif part['type'] == 'image' %}"
    "IMAGE{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
RELEASED_TEMPLATES = {  # family -> (template, image as the template writes it, end of an assistant turn)
    "llava": (None, None, "</s>"),  # LLaVA-1.5-hf: "USER: <image>\n... ASSISTANT: ...</s>", the tiny template's shape
    "internvl": (IM_TEMPLATE.replace("SYSTEM_PROMPT", SYSTEM), "<IMG_CONTEXT>\n", "<|im_end|>"),
    "idefics3": (UTTERANCE_TEMPLATE, "<image>", "<end_of_utterance>"),
    "smolvlm": (UTTERANCE_TEMPLATE, "<image>", "<end_of_utterance>"),
    "qwen2_vl": (IM_TEMPLATE.replace("SYSTEM_PROMPT", SYSTEM), "<|vision_start|><image><|vision_end|>", "<|im_end|>"),
    "qwen2_5_vl": (IM_TEMPLATE.replace("SYSTEM_PROMPT", SYSTEM), "<|vision_start|><image><|vision_end|>", "<|im_end|>"),
    "qwen3_vl": (IM_TEMPLATE.replace("SYSTEM_PROMPT", SYSTEM), "<|vision_start|><image><|vision_end|>", "<|im_end|>"),
    "gemma3": (None, None, "<end_of_turn>"),  # the tiny template is the released gemma-3 one (a system turn folds in)
}


@pytest.mark.parametrize("family", FAMILIES)
def test_labels_are_the_assistant_turns_under_the_released_chat_template(family, world):
    """A two-turn conversation with a picture through the family's processor, its chat template shaped like the
    released checkpoint's (ChatML with a default system turn; Idefics3 / SmolVLM's end-of-utterance turns): the
    labels are exactly both answers with their end-of-turn tokens, in order; the system turn, the questions,
    the role markers and every vision placeholder are not learned."""
    from transformers import AutoConfig, AutoProcessor

    base, synth = world["base"](family), world["root"] / "synth"
    processor = AutoProcessor.from_pretrained(base)
    template, image, end = RELEASED_TEMPLATES[family]
    if template is not None:
        processor.tokenizer.add_tokens(["<|im_start|>", "<|im_end|>", "<end_of_utterance>"], special_tokens=True)
        processor.tokenizer.add_tokens(["system", "user", "assistant", "User", "Assistant"])  # role names
        processor.chat_template = template.replace("IMAGE", image)
    record = json.loads((synth / "train.json").read_text())[0]
    if family == "gemma3":  # the released template writes a system turn at the start of the first user turn
        record["conversations"].insert(0, {"from": "system", "value": SYSTEM})
    record["conversations"] += [
        {"from": "human", "value": "is there a red circle ?"},
        {"from": "gpt", "value": "no , there is a blue square"},
    ]
    (item,) = ConversationDataset([record], processor, DataOptions(image_folder=str(synth)))
    ids, labels = item["input_ids"], item["labels"]
    learned = labels != IGNORE_INDEX
    runs = torch.nonzero(learned[1:] != learned[:-1]).flatten().tolist()  # boundaries of the learned runs
    assert len(runs) == 4 - int(bool(learned[-1])), runs  # two runs: each answer and its end of turn
    tokens = processor.tokenizer.convert_ids_to_tokens(ids.tolist())
    answers = [turn["value"] for turn in record["conversations"] if turn["from"] == "gpt"]
    spans = [(runs[0] + 1, runs[1] + 1), (runs[2] + 1, len(ids) if len(runs) == 3 else runs[3] + 1)]
    for (start, stop), answer in zip(spans, answers):
        assert processor.tokenizer.decode(ids[start:stop]) == f"{answer} {end}"
        assert tokens[start - 1] in (":", "assistant", "model")  # right after the role marker of the assistant turn
    config = AutoConfig.from_pretrained(base)
    vision = torch.isin(ids, torch.tensor(mllm_mod.adapter_for(config).vision_token_ids(config)))
    assert int(vision.sum()) > 0 and not bool(learned[vision].any())
    if template is not None:
        assert tokens.count("<|im_start|>") == (5 if end == "<|im_end|>" else 1)  # system + 4 turns (ChatML)
        assert processor.tokenizer.decode(ids[~learned]).count(SYSTEM) == (end == "<|im_end|>")
    if family == "gemma3":  # <start_of_turn> user SYSTEM <start_of_image> ...: the system text, unlearned, once
        assert tokens.count("<start_of_turn>") == 4 and tokens.count("<end_of_turn>") == 4
        assert processor.tokenizer.decode(ids[~learned]).count(SYSTEM) == 1 and SYSTEM not in processor.tokenizer.decode(ids[learned])
