"""The launch-lean top-k (`kept_in_order`, `keep_count_host`) selects exactly what `topk_per_sample` does."""

from __future__ import annotations

import torch

from mllm_mod.schedule import prd_curve
from mllm_mod.select import keep_count, keep_count_host, kept_in_order, topk_per_sample


def test_host_keep_count_is_the_float32_device_count():
    ratios = [r for n in (4, 22, 32, 40) for r in prd_curve(n) if r > 0] + [0.15, 0.2, 0.5, 0.7, 1.0]
    n = torch.arange(0, 3000)
    for ratio in ratios:
        host = torch.tensor([keep_count_host(int(v), ratio) for v in n])
        assert torch.equal(host, keep_count(n, ratio)), ratio


def test_kept_in_order_keeps_the_topk_set_in_original_order_ties_included():
    gen = torch.Generator().manual_seed(0)
    batch, length, ratio = 4, 40, 0.37
    candidates = torch.rand(batch, length, generator=gen) > 0.4  # [B, T], different counts per row
    scores = torch.randint(0, 4, (batch, length), generator=gen).float()  # many ties
    scores[0] = 1.0  # a zero-initialised router: every weight equal
    keep = topk_per_sample(scores, candidates, ratio)  # [B, T]
    rows = [length - int(c) + keep_count_host(int(c), ratio) for c in candidates.sum(1)]
    order, rank = kept_in_order(scores, candidates, max(rows))
    assert torch.equal(order, order.sort(dim=1).values)  # original order
    for b, n in enumerate(rows):
        kept = order[b][rank[b] < n]
        assert torch.equal(kept, keep[b].nonzero().squeeze(1)), b
