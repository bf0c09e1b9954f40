"""The machinery every training-free method of the zoo shares: a plan of *stages* on the MoD core.

A stage is a run of decoder layers ``start .. next stage's start - 1`` (the last one runs to the end) in
which every layer sees the text tokens plus the same kept vision tokens. Its keep set is decided once per
prefill, in a forward pre-hook on the stage's first layer, from what that layer receives (its input hidden
states, the positions, the tokens the previous stage kept) by the method's rule (`Rule`). The layers before
the first stage are the stock layers.

How the decision reaches the unchanged MoD core (the same as FastV's, `mllm_mod.eval.baselines`): the stage's
layers are MoD layers whose router is a `StageRouter` returning ``z = 0`` (TanhNorm weight ``w = 1``) for the
kept vision tokens and ``z = -1`` (``w = 1 + 0.2 * tanh(-1) ~ 0.85``) for the others; the layers select with
``inference="threshold"`` at ``w > 0.9``, so they keep exactly the decided set, whatever its size (each
method counts as its paper does: PyramidDrop ``int(n * lambda^s)``, DivPrune ``round(r * n)``, VTW none),
and with the ``"mlp"`` weighting a kept token runs the stock block while a dropped one passes unchanged.
The measured kept tokens and KV entries are what `mllm_mod.efficiency` reports (data-dependent accounting).

Positions: ``"original"`` (the kept tokens keep their indices, with gaps) or ``"renumber"`` (the kept tokens
are numbered 0.. in order, as if the pruned sequence were the input: the reference code of PyramidDrop
rebuilds ``position_ids`` after each drop, and DivPrune's LLM receives a shorter sequence). Decoding steps
follow each layer's shorter cache either way.

Side cost: a rule adds to ``seen.side[b]`` the FLOPs it computes for sample b outside the decoder layers
(attention rows, distances, similarities; `DropDecision.add_side`), so each method's side cost is measured on
the forwards it runs and reported beside the decoder TFLOPs, never folded into them.

Ranking token, cached and uncached generation: as FastV's (`DropDecision`): each forward ranks at each row's
last real token, or at the token `ranking_at` names, or, when uncached generation recomputes a prefill's rows
(``use_cache=False``), at the prefill's own ranking token. The decision runs in eval mode only (in training
the core's top-k would count with the nominal ratio).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ... import compat
from ..baselines import DROPPED_LOGIT, DecisionRouter, DropDecision, drop_config

THRESHOLD = 0.9  # between w = 1 (kept) and w = 1 + alpha * tanh(DROPPED_LOGIT) (dropped), for alpha = 0.2


@dataclass(frozen=True)
class Stage:
    """Layers from `start` on (to the next stage) see the vision tokens this stage keeps; `ratio` is the
    nominal fraction kept, reported as those layers' keep ratio."""

    start: int
    ratio: float


@dataclass
class StageInput:
    """What the rule of a stage sees, in the pre-hook of the stage's first layer (all [B, T] unless said)."""

    stage: int
    layer: nn.Module  # the stage's first layer (a `MoDLayer`: its stock block is ``layer.base_layer``)
    hidden: torch.Tensor  # [B, T, D] the layer's input (full length; dropped tokens hold stale values)
    real: torch.Tensor  # real (non-padding) tokens
    vision: torch.Tensor  # real vision tokens
    before: torch.Tensor  # vision tokens the previous stage kept (every vision token for the first stage)
    ranking: torch.Tensor  # [B] index of each row's ranking token (the last instruction token)
    side: list[float] = field(default_factory=list)  # [B] FLOPs the rule computes outside the decoder (it adds)
    renumber: bool = True  # the pruned sequence is numbered 0.. (False: its tokens keep their own positions)
    rope: tuple[torch.Tensor, torch.Tensor] | None = None  # the layer's (cos, sin) at the original positions

    def positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE (cos, sin) [B, T, hd] of the pruned sequence: `renumbered`, or for a family whose pruned
        sequence keeps its tokens' own positions (M-RoPE, `sequence_positions`) the layer's own."""
        if self.renumber:
            return self.renumbered()
        if self.rope is None:
            raise RuntimeError("the stage's first layer received no position_embeddings")
        batch = self.hidden.shape[0]
        return tuple(t.expand(batch, -1, -1) for t in self.rope)  # type: ignore[return-value]

    def visible(self) -> torch.Tensor:
        """The tokens the stage's first layer would attend to without this stage: text + `before`."""
        return self.real & (~self.vision | self.before)

    def renumbered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE (cos, sin) [B, T, hd] at the positions the visible tokens have in the pruned sequence
        (0.. in order, padding and dropped tokens not counted)."""
        positions = (self.visible().long().cumsum(dim=1) - 1).clamp(min=0)  # [B, T]
        return self.layer.rotary(self.hidden, positions)


Rule = Callable[[Any, StageInput], torch.Tensor]  # (spec, input) -> [B, T] kept vision tokens (within `before`)


def top_count(scores: torch.Tensor, among: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """[B, T] bool: the `counts[b]` best-scoring tokens of each row among `among` [B, T] (ties by position)."""
    masked = scores.float().masked_fill(~among, float("-inf"))
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices  # [B, T]
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    limit = torch.tensor(list(counts), device=scores.device)[:, None]  # [B, 1]
    return among & (rank < limit)


class StagedDecision(DropDecision):
    """The keep decisions of the current forward, one per stage, read by the stages' `StageRouter`s.

    `keeps[s]` [B, T] bool: the vision tokens stage s keeps; `stage_logits[s]` [B, T, 1] the router logits
    that make the core keep them. None outside a prefill with vision.
    """

    def __init__(self, spec: Any, stages: Sequence[Stage], rule: Rule, positions: str = "original") -> None:
        super().__init__(spec)
        self.stages = tuple(stages)
        self.rule = rule
        self.positions = positions
        self.keeps: list[torch.Tensor | None] = [None] * len(self.stages)
        self.stage_logits: list[torch.Tensor | None] = [None] * len(self.stages)
        self.ranking: torch.Tensor | None = None

    def hook(self, stage: int) -> Callable[..., None]:
        """The forward pre-hook of stage `stage`'s first layer."""

        def pre_hook(layer: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            self.decide(stage, layer, args, kwargs)

        return pre_hook

    def decide(self, stage: int, layer: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self.keeps[stage] = self.stage_logits[stage] = None
        tokens = self.prefill_tokens(args, kwargs)
        if tokens is None:  # a decoding step or a text-only prompt: nothing to drop
            return
        hidden, real, vision = tokens  # hidden: the layer's input [B, T, D]
        length = hidden.shape[1]
        if stage == 0:  # one ranking token per forward, for every stage
            self.ranking = self.ranking_tokens(real)  # [B]
            if self.input_ids is not None:
                self.prefill = (self.input_ids[:, -length:], self.ranking)
        before = vision if stage == 0 else self.keeps[stage - 1]
        if before is None or before.shape != vision.shape:
            raise RuntimeError(f"{self.spec.method}: stage {stage} ran without stage {stage - 1}'s decision")
        rope = kwargs.get("position_embeddings")
        seen = StageInput(
            stage, layer, hidden, real, vision, before, self.ranking, [0.0] * hidden.shape[0], self.positions == "renumber", rope
        )
        keep = self.rule(self.spec, seen) & before  # [B, T]
        self.add_side(seen.side, new_forward=stage == 0)
        self.keeps[stage] = keep
        self.stage_logits[stage] = torch.where(keep | ~vision, 0.0, DROPPED_LOGIT).to(torch.float32)[..., None]


class StageRouter(DecisionRouter):
    """Stands in for the router of a layer of stage `stage`: the logits of that stage's decision."""

    def __init__(self, decision: StagedDecision, stage: int) -> None:
        super().__init__(decision)
        self.stage = stage

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = self.decision.stage_logits[self.stage]
        if logits is None or logits.shape[:2] != hidden_states.shape[:2]:
            raise RuntimeError(
                f"{self.decision.spec.method}: no decision of stage {self.stage} for this forward (its first layer "
                "did not see the vision tokens); chunked prefill is not supported by the training-free methods"
            )
        return logits  # [B, T, 1]


def staged_config(method: str, num_layers: int, stages: Sequence[Stage], positions: str):
    """The `MoDConfig`: MoD layers from the first stage's start to the last layer, threshold selection on
    the `StageRouter` weights, the "mlp" rule (a dropped token passes unchanged)."""
    starts = [s.start for s in stages]
    if not stages or starts != sorted(set(starts)) or starts[0] < 0 or starts[-1] >= num_layers:
        raise ValueError(f"{method}: stage starts {starts} must be increasing layer indices of a {num_layers}-layer decoder")
    layers = list(range(starts[0], num_layers))  # ratio 1.0 nominal: each layer gets its stage's after the retrofit
    return drop_config(method, layers, 1.0, inference="threshold", threshold=THRESHOLD, positions=positions)


def sequence_positions(model: nn.Module) -> str:
    """How a method that shortens the sequence numbers it in this model's family: ``"renumber"`` (0.. in order,
    as the references of PyramidDrop and DivPrune rebuild ``position_ids`` on LLaVA's 1-D RoPE), or
    ``"original"`` for a family whose positions the model computes from the image grids (M-RoPE, Qwen2-VL /
    Qwen2.5-VL / Qwen3-VL: the adapter's `renumber_refused`): there a shorter sequence's positions are its
    tokens' own gathered (t, h, w) positions -- renumbering would give all three axes one 1-D index and erase
    the image grid of the tokens that stay (a public port of VisionZip to Qwen2-VL, Hanjiangli/VisionZip-Qwen2VL,
    gathers the kept tokens' 3-D ``position_ids`` the same way)."""
    from ...adapters import adapter_for

    return "original" if adapter_for(model).renumber_refused else "renumber"


def install(model: nn.Module, spec: Any, stages: Sequence[Stage], rule: Rule, positions: str) -> nn.Module:
    """Retrofit `model` in place with the staged decision of `spec`; ``mllm_mod.unload`` undoes it."""
    from ...adapters import adapter_for
    from ...retrofit import mod_layer_map, retrofit

    layers = adapter_for(model).layers(model)
    windowed = [i for i, layer in enumerate(layers) if compat.attention_window(layer.self_attn) is not None]
    if positions == "renumber" and windowed:  # refused before anything is installed
        raise NotImplementedError(
            f"{spec.method}: the LLM should see the shorter sequence (positions renumbered), but layers {windowed} have "
            "a sliding window, which the MoD layers measure in original positions: past the window the result would "
            "be neither the shorter sequence's forward nor the stock model's; not implemented"
        )
    config = staged_config(spec.method, len(layers), stages, positions)
    retrofit(model, config)
    decision = StagedDecision(spec, stages, rule, positions)
    mod = mod_layer_map(model)
    for idx, layer in mod.items():
        stage = max(s for s, st in enumerate(stages) if st.start <= idx)
        layer.router = StageRouter(decision, stage)
        layer.ratio = float(stages[stage].ratio)
    handles = [model.register_forward_pre_hook(decision.see_forward, with_kwargs=True)]
    handles += [mod[st.start].register_forward_pre_hook(decision.hook(s), with_kwargs=True) for s, st in enumerate(stages)]
    model.mod_state.hooks.extend(handles)  # removed by unload with the core's own hooks
    return model
