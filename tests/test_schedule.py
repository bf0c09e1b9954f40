"""PRD, TanhNorm and the other schedules against DESIGN.md's numbers."""

from __future__ import annotations

import pytest
import torch

from mllm_mod import MoDConfig, preset
from mllm_mod.router import token_weights
from mllm_mod.schedule import layer_ratios_for, mod_layers, prd_curve

PRD32 = [0.844483, 0.806053, 0.764482, 0.720197, 0.673653, 0.625326, 0.575714, 0.525325,
         0.474675, 0.424286, 0.374674, 0.326347, 0.279803, 0.235518, 0.193947, 0.155517]


def test_prd_32_layers_matches_design():
    ratios = layer_ratios_for(preset("pmod"), 32)
    assert ratios[:8] == [1.0] * 8
    assert ratios[8:24] == pytest.approx(PRD32, abs=1e-6)
    assert ratios[24:] == [0.15] * 8
    assert sum(ratios) / 32 == pytest.approx(0.5375, abs=1e-4)
    assert sorted(mod_layers(preset("pmod"), 32)) == list(range(8, 32))


def test_prd_other_depth_spans_the_stack():
    curve = prd_curve(24)
    assert curve[0] == pytest.approx(1.0) and curve[-1] == pytest.approx(0.0, abs=1e-12)
    assert layer_ratios_for(preset("pmod"), 24)[-1] == 0.15


def test_constant_interleave_deep():
    assert layer_ratios_for(MoDConfig(schedule="constant", ratio=0.3, layers=[1, 2]), 4) == [1.0, 0.3, 0.3, 1.0]
    assert layer_ratios_for(MoDConfig(schedule="interleave", ratio=0.2), 5) == [1.0, 0.2, 1.0, 0.2, 1.0]
    assert layer_ratios_for(MoDConfig(schedule="deep", ratio=0.5), 4) == [1.0, 1.0, 0.5, 0.5]
    assert layer_ratios_for(MoDConfig(schedule="deep", ratio=0.5, deep_start=3), 4) == [1.0, 1.0, 1.0, 0.5]
    with pytest.raises(ValueError, match=r"\[7\] do not exist"):
        layer_ratios_for(MoDConfig(schedule="constant", ratio=0.5, layers=[7]), 4)


def test_tanhnorm_hand_computed():
    cfg = preset("pmod")
    z = torch.tensor([[0.0, 1.0, -2.0, 100.0]])
    expected = torch.tensor([[1.0, 0.2 * 0.7615941559557649 + 1, 1 - 0.2 * 0.9640275800758169, 1.2]])
    torch.testing.assert_close(token_weights(z, cfg), expected)
    assert token_weights(torch.zeros(1, 3), cfg).eq(1.0).all()  # exactly 1 at initialisation


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_ratio_outside_unit_interval_is_refused(bad):
    with pytest.raises(ValueError, match="ratio must be in"):
        MoDConfig(schedule="constant", ratio=bad)


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError, match="available presets: gmod, pmod, videomod"):
        preset("nope")
