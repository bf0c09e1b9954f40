"""The suite runner across model variants: one replica alive at a time on every rank."""

from __future__ import annotations

import weakref

import pytest

from mllm_mod.eval import runner
from mllm_mod.eval.meter import Meter
from mllm_mod.eval.suites import SuiteTask


class Weights:
    """Stands in for a model replica: tracked by weak reference."""


@pytest.mark.parametrize("main_process", [True, False])
def test_one_replica_alive_between_variants(main_process, monkeypatch, tmp_path):
    """Under `accelerate launch` a rank > 0 gets None from lmms-eval; it must free its replica before the next
    variant loads, as the main process does (a `continue` used to skip the `del`)."""
    import lmms_eval.evaluator
    import lmms_eval.tasks

    import mllm_mod.eval.lmms_plugin as plugin

    replicas: list[weakref.ref] = []
    alive_at_load: list[int] = []

    class FakeLMM:
        def __init__(self, **model_args):
            alive_at_load.append(sum(r() is not None for r in replicas))
            self.model, self.processor, self.tokenizer = Weights(), object(), object()
            self.meter = Meter()
            replicas.append(weakref.ref(self.model))

    entries = (SuiteTask("t", "acc"),)
    the_plan = runner.Plan(entries, ["t"], [], {"t": ["t"]}, builtins=False)
    result = {"results": {"t": {"acc,none": 0.5}}} if main_process else None
    monkeypatch.setattr(runner, "plan", lambda *args, **kwargs: the_plan)
    monkeypatch.setattr(lmms_eval.tasks, "TaskManager", lambda *args, **kwargs: None)
    monkeypatch.setattr(lmms_eval.evaluator, "simple_evaluate", lambda **kwargs: result)
    monkeypatch.setattr(plugin, "MoDLMM", FakeLMM)
    specs = [runner.ModelSpec(name, {}) for name in ("a", "b", "c")]
    report = runner.run_suite(specs, "synthetic", tmp_path)
    assert alive_at_load == [0, 0, 0]
    assert all(r() is None for r in replicas)
    assert (report is not None) == main_process
