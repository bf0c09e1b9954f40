"""Evaluation: the lmms-eval model plugin (`lmms_plugin`), synthetic local tasks (`synthetic`), benchmark
suites with an offline reachability check (`suites`), training-free baselines (`baselines`), the
efficiency meter (`meter`), the suite runner (`runner`) and the accuracy-plus-efficiency report (`report`).

Importing this package does not import lmms-eval (it is heavy and optional: ``pip install mllm-mod[eval]``);
the modules that need it import it themselves.
"""

from __future__ import annotations

MODEL_ID = "mllm_mod"
PLUGIN_MODULE = "mllm_mod.eval.lmms_plugin"


def manifests() -> list:
    """The ``lmms_eval.models`` entry-point payload: model id ``mllm_mod`` with a simple and a chat class.

    Kept out of `lmms_plugin` (and importing lmms-eval only here) because lmms-eval loads entry points
    while its ``lmms_eval.models`` package initialises: the plugin module, which imports lmms-eval, would
    be half-imported at that moment.
    """
    from lmms_eval.models.registry_v2 import ModelManifest

    return [
        ModelManifest(
            model_id=MODEL_ID,
            simple_class_path=f"{PLUGIN_MODULE}.MoDLMM",
            chat_class_path=f"{PLUGIN_MODULE}.MoDLMMChat",
        )
    ]
