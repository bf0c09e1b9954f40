"""gamma-MoD's preset against its reference code (Yaxin9Luo/Gamma-MOD, llava_llama_mod.py), hand-computed cases.

Reference behaviour pinned here (docs/DESIGN.md, "differences from the reference code"):
- training: masked routing (image + system prompt compete, question/answer forced to keep), top-k; the MLP
  branch of every token that goes through the layer is scaled by p, forced-keep text included; the routing
  cross-entropy is a mean over all B * T positions, forced-keep and padding tokens with target 1;
- inference: every token competes; a prefill token goes through when p > 0.005, a generated token when
  p >= 0.5 (it skips the layer, adding nothing to its cache, when p < 0.5);
- kept tokens are renumbered 0..k-1 (decoding continues from the layer's shorter cache);
- the shared router Linear(hidden, 2, bias=False) keeps PyTorch's default init.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mllm_mod.config import preset
from mllm_mod.layer import RouterRecord
from mllm_mod.losses import routing_loss


def test_routing_loss_averages_over_every_position_with_forced_keep_and_padding_as_target_one():
    gen = torch.Generator().manual_seed(0)
    records = []
    for idx in (1, 2):
        logits = torch.randn(2, 6, 2, generator=gen)  # [B, T, 2]
        candidates = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0]], dtype=torch.bool)  # padding is not a candidate
        keep = torch.tensor([[1, 0, 1, 0, 1, 1], [1, 1, 0, 0, 1, 1]], dtype=torch.bool)  # non-candidates kept
        records.append(RouterRecord(idx, logits, torch.softmax(logits, -1)[..., 1], candidates, keep))
    config = preset("gmod", routing_loss_tokens="all", routing_loss_weight=0.01)
    loss, _ = routing_loss(records, config)
    by_hand = 0.0
    for r in records:  # mean over B * T = 12 positions, targets 1 = kept
        terms = [-torch.log_softmax(r.logits[b, t], -1)[int(r.keep[b, t])] for b in range(2) for t in range(6)]
        by_hand += float(sum(terms) / 12)
    assert abs(float(loss) - 0.01 * by_hand) < 1e-6
    competing = preset("gmod", routing_loss_tokens="competing", routing_loss_weight=0.01)
    loss_c, _ = routing_loss(records, competing)
    by_hand_c = sum(float(F.cross_entropy(r.logits[r.candidates], r.keep[r.candidates].long())) for r in records)
    assert abs(float(loss_c) - 0.01 * by_hand_c) < 1e-6
    assert abs(float(loss) - float(loss_c)) > 1e-4  # the two conventions differ on these records
