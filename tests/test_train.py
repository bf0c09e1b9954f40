"""Fine-tuning: typed config, the trainable set of each recipe, the router learning rate, the routing
loss hook, gradient checkpointing through MoD layers, resume, reloadable checkpoints, the CLI."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from conftest import loss_grads

import mllm_mod
from mllm_mod.compat import enable_checkpointing
from mllm_mod.data import Collator, ConversationDataset, DataOptions
from mllm_mod.data.synth import generate, vocabulary
from mllm_mod.retrofit import AGREEMENT_KEY, LOSS_KEY
from mllm_mod.tiny import tiny_model
from mllm_mod.train import (
    MoDTrainer,
    TrainConfig,
    deepspeed_config,
    load_config,
    router_parameter_names,
    set_trainable,
    train,
)
from mllm_mod.train.recipe import training_arguments

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate(root, 48, seed=0, only=["color", "shape", "presence", "count"], progress=False)
    return root


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A stock tiny LLaVA (4 layers) saved with its processor, knowing the synthetic vocabulary."""
    root = tmp_path_factory.mktemp("base")
    model, processor = tiny_model("llava", num_layers=4, words=vocabulary())
    model.save_pretrained(root)
    processor.save_pretrained(root)
    return root


def quick(base_dir, synth_dir, out, **overrides) -> TrainConfig:
    settings = {
        "model": str(base_dir), "data": str(synth_dir / "train.json"), "image_folder": str(synth_dir), "output_dir": str(out),
        "preset": "pmod", "batch_size": 4, "num_workers": 0, "gradient_checkpointing": False, "lr": 1e-3, "max_steps": 4,
        "logging_steps": 1, "save_steps": 1000, "progress": False, "bf16": False,
    }
    return load_config(**{**settings, **overrides})


# -- config ----------------------------------------------------------------------------------------
def test_config_yaml_then_typed_overrides(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({"model": "m", "data": "d.json", "output_dir": "o", "lr": 1e-4, "preset": "pmod", "mod": {"prd_min_ratio": 0.2}}))
    config = load_config(
        path, ["lr=3e-5", "router_lr=1e-3", "bf16=true", "epochs=2", "deepspeed=zero3", "mod.ratio=0.3", "hf.dataloader_pin_memory=false", "fps=none"],
        batch_size=8,
    )
    assert config.lr == 3e-5 and isinstance(config.lr, float)
    assert config.router_lr == 1e-3 and config.bf16 is True and config.epochs == 2.0 and isinstance(config.epochs, float)
    assert config.deepspeed == "zero3" and config.batch_size == 8 and config.fps is None
    assert config.mod == {"prd_min_ratio": 0.2, "ratio": 0.3} and config.hf == {"dataloader_pin_memory": False}
    # defaults are p-MoD's recipe
    defaults = TrainConfig()
    assert (defaults.lr, defaults.lr_scheduler, defaults.warmup_ratio, defaults.freeze_vision_tower) == (2e-5, "cosine", 0.03, True)
    for recipe, length in (("pmod_llava15_7b", 2048), ("pmod_llava_next_7b", 4096)):  # the shipped 8-GPU recipes
        shipped = load_config(recipe, model="m", data="d", output_dir="o")
        assert (shipped.preset, shipped.lr, shipped.batch_size, shipped.max_length, shipped.bf16) == ("pmod", 2e-5, 16, length, True)
    with pytest.raises(ValueError, match="unknown training setting 'learning_rate'"):
        load_config(path, ["learning_rate=1"])
    with pytest.raises(ValueError, match="batch_size: expected int"):
        load_config(path, ["batch_size=many"])
    with pytest.raises(ValueError, match="unknown mod.rattio"):
        load_config(path, ["mod.rattio=0.3"])
    with pytest.raises(ValueError, match="missing required training settings: data"):
        load_config(overrides=["model=m", "output_dir=o"])


def test_deepspeed_configs_by_name_or_path(tmp_path):
    for name, stage in (("zero2", 2), ("zero3", 3)):
        with open(deepspeed_config(name)) as f:
            ds = json.load(f)
        assert ds["zero_optimization"]["stage"] == stage and ds["train_micro_batch_size_per_gpu"] == "auto"
        assert "optimizer" not in ds  # the Trainer builds it, so the router lr group survives
    own = tmp_path / "ds.json"
    own.write_text("{}")
    assert deepspeed_config(str(own)) == str(own)
    with pytest.raises(FileNotFoundError, match="zero4"):
        deepspeed_config("zero4")


# -- what trains -----------------------------------------------------------------------------------
def one_step(model, processor, synth_dir, tmp_path, router_lr=None, **args) -> dict[str, torch.Tensor]:
    """Run one MoDTrainer step; returns the parameters before it."""
    dataset = ConversationDataset(str(synth_dir / "train.json"), processor, DataOptions(image_folder=str(synth_dir)))
    config = load_config(model="m", data="d", output_dir=str(tmp_path), batch_size=4, num_workers=0, max_steps=1,
                         lr=1e-2, warmup_ratio=0.0, progress=False, bf16=False, gradient_checkpointing=False, **args)
    trainer = MoDTrainer(model=model, args=training_arguments(config), train_dataset=dataset,
                         data_collator=Collator(processor.tokenizer.pad_token_id), router_lr=router_lr)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    return before, trainer


def changed(model, before) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}


@pytest.mark.parametrize("recipe", ["pmod", "routers_only"])
def test_a_step_changes_exactly_the_trainable_parameters(recipe, synth_dir, tmp_path):
    model, processor = tiny_model("llava", num_layers=4, words=vocabulary())
    mllm_mod.retrofit(model, "pmod")
    set_trainable(model, freeze_vision_tower=True, routers_only=recipe == "routers_only")
    routers = router_parameter_names(model)
    names = {n for n, _ in model.named_parameters()}
    tower = {n for n in names if ".vision_tower." in n}
    expected = routers if recipe == "routers_only" else names - tower
    # the last layer's router gets no gradient: its weight scales only vision-token outputs of the last
    # layer, which no later layer reads and no label looks at; Adam leaves a zero-gradient tensor as is
    last = {n for n in routers if n.startswith("model.language_model.layers.3.")}
    assert routers and tower and last and expected
    before, _ = one_step(model, processor, synth_dir, tmp_path)
    assert changed(model, before) == expected - last
    assert all(p.grad is None or not p.grad.any() for n, p in model.named_parameters() if n in last)


def test_router_learning_rate_group(synth_dir, tmp_path):
    model, processor = tiny_model("llava", num_layers=4, words=vocabulary())
    mllm_mod.retrofit(model, "pmod")
    set_trainable(model)
    _, trainer = one_step(model, processor, synth_dir, tmp_path, router_lr=0.5)
    routers = {id(p) for n, p in model.named_parameters() if n in router_parameter_names(model)}
    groups = trainer.optimizer.param_groups
    router_groups = [g for g in groups if {id(p) for p in g["params"]} & routers]
    assert len(router_groups) == 1 and {id(p) for p in router_groups[0]["params"]} == routers
    assert router_groups[0]["initial_lr"] == 0.5 and router_groups[0]["weight_decay"] == 0.0
    assert all(g["initial_lr"] == 1e-2 for g in groups if g is not router_groups[0])


def test_routing_loss_is_added_by_the_hook_and_logged(synth_dir, tmp_path):
    """gamma-MoD's routing loss: the trainer's loss is the LM loss plus outputs['mod_routing_loss'],
    and the log carries routing_loss and router_agreement separately."""
    model, processor = tiny_model("llava", num_layers=4, words=vocabulary())
    mllm_mod.retrofit(model, "gmod", skip_layers=[0])
    set_trainable(model)
    dataset = ConversationDataset(str(synth_dir / "train.json"), processor, DataOptions(image_folder=str(synth_dir)))
    batch = Collator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(4)])
    config = load_config(model="m", data="d", output_dir=str(tmp_path), batch_size=4, num_workers=0, max_steps=2,
                         logging_steps=1, progress=False, bf16=False, gradient_checkpointing=False)
    trainer = MoDTrainer(model=model, args=training_arguments(config), train_dataset=dataset,
                         data_collator=Collator(processor.tokenizer.pad_token_id))
    model.train()
    torch.manual_seed(0)
    loss, outputs = trainer.compute_loss(model, dict(batch), return_outputs=True)
    assert outputs[LOSS_KEY] > 0 and 0 <= float(outputs[AGREEMENT_KEY]) <= 1
    torch.testing.assert_close(loss, outputs.loss + outputs[LOSS_KEY])
    # nothing added in eval mode, and a model without routing losses trains on the LM loss alone
    model.eval()
    eval_loss, eval_out = trainer.compute_loss(model, dict(batch), return_outputs=True)
    assert LOSS_KEY not in eval_out and torch.equal(eval_loss, eval_out.loss)
    trainer.train()
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert logged and all("routing_loss" in e and "router_agreement" in e and e["routing_loss"] > 0 for e in logged)
    with open(tmp_path / "train_log.jsonl") as f:
        assert [json.loads(line)["routing_loss"] for line in f if '"loss"' in line] == [e["routing_loss"] for e in logged]


def test_gradient_checkpointing_through_mod_layers_gives_the_same_gradients(synth_dir):
    model, processor = tiny_model("llava", num_layers=4, words=vocabulary())
    mllm_mod.retrofit(model, "pmod")
    conftest_scale = 1.0
    with torch.no_grad():  # non-trivial routers so that selection matters
        gen = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if name in router_parameter_names(model):
                p.copy_(torch.randn(p.shape, generator=gen) * conftest_scale)
    set_trainable(model)
    dataset = ConversationDataset(str(synth_dir / "train.json"), processor, DataOptions(image_folder=str(synth_dir)))
    batch = Collator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(4)])
    model.train()

    plain = loss_grads(model, batch)
    enable_checkpointing(model, {"use_reentrant": False})
    mod_layers = [m for m in model.modules() if isinstance(m, mllm_mod.MoDLayer)]
    assert mod_layers and all(m.gradient_checkpointing for m in mod_layers)
    checkpointed = loss_grads(model, batch)
    assert plain.keys() == checkpointed.keys() and any(".router." in k for k in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


# -- runs ------------------------------------------------------------------------------------------
def test_train_saves_a_checkpoint_that_from_pretrained_reloads(base_dir, synth_dir, tmp_path):
    result = train(quick(base_dir, synth_dir, tmp_path / "run", max_steps=6, gradient_checkpointing=True))
    assert result.mod and result.global_step == 6 and result.last_loss < result.first_loss
    reloaded = mllm_mod.from_pretrained(tmp_path / "run").eval()
    assert mllm_mod.layer_ratios(reloaded)[1:] == pytest.approx([0.75, 0.25, 0.15])
    assert any(float(v.abs().max()) > 0 for v in mllm_mod.mod_state_dict(reloaded).values())  # routers trained
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tmp_path / "run")
    dataset = ConversationDataset(str(synth_dir / "test.json"), processor, DataOptions(image_folder=str(synth_dir)))
    batch = Collator(processor.tokenizer.pad_token_id)([dataset[0]])
    out = reloaded.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            pixel_values=batch["pixel_values"], max_new_tokens=3, do_sample=False)
    assert batch["input_ids"].shape[1] < out.shape[1] <= batch["input_ids"].shape[1] + 3  # may stop at </s>
    with open(tmp_path / "run" / "train_summary.json") as f:
        summary = json.load(f)
    assert summary["result"]["global_step"] == 6 and "none skipped" in summary["result"]["data_summary"]


def test_resume_continues_with_the_same_step_lr_and_data(base_dir, synth_dir, tmp_path):
    full = tmp_path / "full"
    train(quick(base_dir, synth_dir, full, max_steps=6, save_steps=3, save_total_limit=None, warmup_ratio=0.2))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    os.symlink(full / "checkpoint-3", resumed / "checkpoint-3")
    result = train(quick(base_dir, synth_dir, resumed, max_steps=6, save_steps=3, save_total_limit=None,
                         warmup_ratio=0.2, resume="last"))
    assert result.global_step == 6

    def steps(directory):
        with open(directory / "train_log.jsonl") as f:
            return {e["step"]: e for e in map(json.loads, f) if "loss" in e}

    a, b = steps(full), steps(resumed)
    assert sorted(b) == [4, 5, 6]  # it started at step 4
    for step in (4, 5, 6):  # same learning rate, same batches (so the same loss), same step
        assert b[step]["learning_rate"] == a[step]["learning_rate"]
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(quick(base_dir, synth_dir, tmp_path / "empty", resume="last"))


def test_cli_train_with_yaml_overrides_and_skipped_samples(base_dir, synth_dir, tmp_path):
    from mllm_mod.cli import main

    records = json.loads((synth_dir / "train.json").read_text())
    records.append({"id": "ghost", "image": "images/ghost.png", "conversations": records[0]["conversations"]})
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"preset": "pmod", "batch_size": 4, "num_workers": 0, "max_steps": 2,
                                      "gradient_checkpointing": False, "progress": False, "bf16": False}))
    out = tmp_path / "cli"
    argv = ["train", "--config", str(config), "--model", str(base_dir), "--data", str(data), "--image-folder",
            str(synth_dir), "--output-dir", str(out), "--skip-bad-samples", "--routers-only", "lr=0.01", "mod.prd_min_ratio=0.3"]
    assert main(argv) == 0
    with open(out / "train_summary.json") as f:
        summary = json.load(f)
    assert summary["config"]["lr"] == 0.01 and summary["config"]["routers_only"] is True
    assert summary["result"]["skipped"] == 1 and "1 skipped (1 image file not found)" in summary["result"]["data_summary"]
    assert summary["result"]["trainable"]["trainable"] == summary["result"]["trainable"]["routers"]
    reloaded = mllm_mod.from_pretrained(out)
    assert reloaded.mod_state.config.prd_min_ratio == 0.3
    # without --skip-bad-samples the same data stops with the sample id and the file
    assert main(argv[:-4] + ["--output-dir", str(tmp_path / "cli2"), "--routers-only"]) == 2


def test_cli_train_from_a_retrofit_adapter_directory(base_dir, synth_dir, tmp_path, capsys):
    """`mllm-mod retrofit BASE --out A` then `mllm-mod train --model A`: the adapter names its base; with the
    base moved, the error says to pass `--model BASE --adapter A`, which works."""
    from mllm_mod.cli import main

    adapter = tmp_path / "adapter"
    assert main(["retrofit", str(base_dir), "--preset", "pmod", "--set", "prd_min_ratio=0.3", "--out", str(adapter)]) == 0
    assert not (adapter / "config.json").exists()
    common = ["--data", str(synth_dir / "train.json"), "--image-folder", str(synth_dir), "batch_size=4",
              "num_workers=0", "max_steps=2", "gradient_checkpointing=false", "progress=false", "bf16=false"]
    assert main(["train", "--model", str(adapter), "--output-dir", str(tmp_path / "a"), *common]) == 0
    assert mllm_mod.from_pretrained(tmp_path / "a").mod_state.config.prd_min_ratio == 0.3

    config = json.loads((adapter / "mod_config.json").read_text())
    config["base_model"]["name_or_path"] = str(tmp_path / "moved")
    (adapter / "mod_config.json").write_text(json.dumps(config))
    assert main(["train", "--model", str(adapter), "--output-dir", str(tmp_path / "b"), *common]) != 0
    assert f"--model BASE_DIR --adapter {adapter}" in capsys.readouterr().err
    argv = ["train", "--model", str(base_dir), "--adapter", str(adapter), "--output-dir", str(tmp_path / "c"), *common]
    assert main(argv) == 0
    assert mllm_mod.from_pretrained(tmp_path / "c").mod_state.config.prd_min_ratio == 0.3
    assert main([*argv, "--output-dir", str(tmp_path / "d"), "--preset", "pmod"]) != 0
    assert "drop preset='pmod'" in capsys.readouterr().err
