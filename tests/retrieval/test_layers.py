"""Golden tests of the cross layers and the MLP against the formulas, written out by hand."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from retrieval.layers import (
    MLP,
    CrossNetwork,
    FullRankCrossLayer,
    LowRankCrossLayer,
    MaskedLowRankCrossLayer,
    MixtureCrossLayer,
)


def t(values: list[Any]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# ----------------------------------------------------------------------------- references


def reference_full(x0: torch.Tensor, xl: torch.Tensor, w: torch.Tensor, b: torch.Tensor):
    """x_{l+1} = x_0 * (W x_l + b) + x_l, one example at a time."""
    rows = [x0[n] * (w @ xl[n] + b) + xl[n] for n in range(x0.shape[0])]
    return torch.stack(rows)


def reference_lowrank(x0, xl, u, v, b):
    """x_{l+1} = x_0 * (U (V^T x_l) + b) + x_l."""
    rows = [x0[n] * (u @ (v.t() @ xl[n]) + b) + xl[n] for n in range(x0.shape[0])]
    return torch.stack(rows)


def reference_mix(x0, xl, us, vs, cs, b, gate_w, g, gate=None):
    """x_{l+1} = sum_i G_i(x_l) x_0 * (U_i g(C_i g(V_i^T x_l)) + b) + x_l, G = softmax(W_g x_l)."""
    rows = []
    for n in range(x0.shape[0]):
        weights = torch.softmax(gate_w @ xl[n], dim=0) if gate is None else gate[n]
        out = xl[n].clone()
        for i in range(len(us)):
            expert = x0[n] * (us[i] @ g(cs[i] @ g(vs[i].t() @ xl[n])) + b)
            out = out + weights[i] * expert
        rows.append(out)
    return torch.stack(rows)


def reference_masked(x0, xl, u, v, b, m1, c1, m2, c2, mask=None):
    """x_{l+1} = x_0 * (U (m * V^T x_l) + b) + x_l, m = 2 sigmoid(M2 relu(M1 x_0 + c1) + c2)."""
    rows = []
    for n in range(x0.shape[0]):
        m = 2 * torch.sigmoid(m2 @ torch.relu(m1 @ x0[n] + c1) + c2) if mask is None else mask[n]
        rows.append(x0[n] * (u @ (m * (v.t() @ xl[n])) + b) + xl[n])
    return torch.stack(rows)


def set_lowrank(layer: LowRankCrossLayer | MaskedLowRankCrossLayer, u, v, b) -> None:
    with torch.no_grad():
        layer.up.weight.copy_(u)  # U: (d, r)
        layer.down.weight.copy_(v.t())  # V^T: (r, d)
        layer.up.bias.copy_(b)


def set_mix(layer: MixtureCrossLayer, us, vs, cs, b, gate_w=None) -> None:
    with torch.no_grad():
        for i in range(layer.num_experts):
            layer.down[:, i].copy_(vs[i])
            layer.core[i].copy_(cs[i])
            layer.up[i].copy_(us[i].t())
        layer.bias.copy_(b)
        if gate_w is not None:
            layer.gate.weight.copy_(gate_w)


# ----------------------------------------------------------------------------- full rank


def test_full_rank_one_layer_two_features_is_the_expected_polynomial() -> None:
    # x_0 = [a, b] = [2, 3], W = [[1, 2], [3, 4]], bias = [0.5, -1]:
    #   out_0 = a (w11 a + w12 b + c0) + a = 1*4 + 2*6 + 0.5*2 + 2 = 19
    #   out_1 = b (w21 a + w22 b + c1) + b = 3*6 + 4*9 - 1*3 + 3 = 54
    layer = FullRankCrossLayer(2)
    with torch.no_grad():
        layer.weight.copy_(t([[1, 2], [3, 4]]))
        layer.bias.copy_(t([0.5, -1]))
    x0 = t([[2, 3]])
    assert torch.equal(layer(x0, x0), t([[19, 54]]))

    # The same polynomial at other points: terms a^2, ab, a (first) and ab, b^2, b (second).
    w11, w12, w21, w22, c0, c1 = 1.0, 2.0, 3.0, 4.0, 0.5, -1.0
    for a, b in [(0.0, 0.0), (1.0, -1.0), (-2.5, 0.5), (3.0, 7.0)]:
        expected = t(
            [
                [
                    w11 * a * a + w12 * a * b + c0 * a + a,
                    w21 * a * b + w22 * b * b + c1 * b + b,
                ]
            ]
        )
        x = t([[a, b]])
        torch.testing.assert_close(layer(x, x), expected)


def test_full_rank_matches_reference_with_distinct_x0_and_xl() -> None:
    torch.manual_seed(0)
    layer = FullRankCrossLayer(5)
    with torch.no_grad():
        layer.bias.normal_()
    x0, xl = torch.randn(4, 5), torch.randn(4, 5)
    expected = reference_full(x0, xl, layer.weight.detach(), layer.bias.detach())
    torch.testing.assert_close(layer(x0, xl), expected)


def test_full_rank_init_is_xavier_weight_and_zero_bias() -> None:
    layer = FullRankCrossLayer(64)
    assert torch.equal(layer.bias, torch.zeros(64))
    bound = (6 / 128) ** 0.5
    assert layer.weight.abs().max() <= bound
    assert layer.weight.std() > bound / 3  # not all zeros: uniform has std bound/sqrt(3)


# ----------------------------------------------------------------------------- low rank


def test_low_rank_hand_computed() -> None:
    # d = 2, r = 1: U = [[1], [2]], V = [[1], [-1]], b = [1, 1], x_0 = x_l = [2, 3]
    #   V^T x = 2 - 3 = -1;  U (-1) + b = [0, -1];  x_0 * that = [0, -3];  + x_l = [2, 0]
    layer = LowRankCrossLayer(2, rank=1)
    set_lowrank(layer, t([[1], [2]]), t([[1], [-1]]), t([1, 1]))
    x = t([[2, 3]])
    assert torch.equal(layer(x, x), t([[2, 0]]))


def test_low_rank_matches_reference() -> None:
    torch.manual_seed(1)
    u, v, b = torch.randn(6, 3), torch.randn(6, 3), torch.randn(6)
    layer = LowRankCrossLayer(6, rank=3)
    set_lowrank(layer, u, v, b)
    x0, xl = torch.randn(4, 6), torch.randn(4, 6)
    torch.testing.assert_close(layer(x0, xl), reference_lowrank(x0, xl, u, v, b))


def test_low_rank_with_full_rank_factors_equals_full_rank() -> None:
    # r = d, U = W, V = I  =>  U V^T = W.
    torch.manual_seed(2)
    d = 4
    full = CrossNetwork(d, num_layers=2, kind="full")
    low = CrossNetwork(d, num_layers=2, kind="lowrank", rank=d)
    for full_layer, low_layer in zip(full.layers, low.layers, strict=True):
        assert isinstance(full_layer, FullRankCrossLayer)
        assert isinstance(low_layer, LowRankCrossLayer)
        with torch.no_grad():
            full_layer.bias.normal_()
        set_lowrank(low_layer, full_layer.weight.detach(), torch.eye(d), full_layer.bias.detach())
    x0 = torch.randn(5, d)
    torch.testing.assert_close(low(x0), full(x0))


# ----------------------------------------------------------------------------- mixture


def test_mixture_hand_computed_with_gate_override() -> None:
    # d = 2, r = 1, K = 2, g = identity, b = 0, gate G = [0.25, 0.75], x_0 = x_l = [2, 3]
    #   expert 1: V1 = [1, 0] -> 2; C1 = 1 -> 2; U1 = [1, 1] -> [2, 2];   x_0 * = [4, 6]
    #   expert 2: V2 = [0, 1] -> 3; C2 = 2 -> 6; U2 = [1, -1] -> [6, -6]; x_0 * = [12, -18]
    #   0.25 [4, 6] + 0.75 [12, -18] = [10, -12];  + x_l = [12, -9]
    layer = MixtureCrossLayer(2, rank=1, num_experts=2, activation="identity")
    us = [t([[1], [1]]), t([[1], [-1]])]
    vs = [t([[1], [0]]), t([[0], [1]])]
    cs = [t([[1]]), t([[2]])]
    set_mix(layer, us, vs, cs, t([0, 0]))
    x = t([[2, 3]])
    assert torch.equal(layer(x, x, gate_weights=t([[0.25, 0.75]])), t([[12, -9]]))


@pytest.mark.parametrize("activation", ["tanh", "relu", "identity"])
def test_mixture_matches_reference_with_softmax_gate(activation: str) -> None:
    torch.manual_seed(3)
    d, r, k = 6, 3, 3
    us = [torch.randn(d, r) for _ in range(k)]
    vs = [torch.randn(d, r) for _ in range(k)]
    cs = [torch.randn(r, r) for _ in range(k)]
    b, gate_w = torch.randn(d), torch.randn(k, d)
    layer = MixtureCrossLayer(d, rank=r, num_experts=k, activation=activation)  # type: ignore[arg-type]
    set_mix(layer, us, vs, cs, b, gate_w)
    g = {"tanh": torch.tanh, "relu": torch.relu, "identity": lambda z: z}[activation]
    x0, xl = torch.randn(4, d), torch.randn(4, d)
    expected = reference_mix(x0, xl, us, vs, cs, b, gate_w, g)
    torch.testing.assert_close(layer(x0, xl), expected)
    # A gate that does not sum to 1 still follows the formula (bias weighted per expert).
    gate = torch.rand(4, k)
    expected = reference_mix(x0, xl, us, vs, cs, b, gate_w, g, gate=gate)
    torch.testing.assert_close(layer(x0, xl, gate_weights=gate), expected)


def test_mixture_single_expert_identity_core_equals_low_rank() -> None:
    # K = 1: softmax over one expert is 1; with C = I and g = identity, E_1 is the low-rank layer.
    torch.manual_seed(4)
    d, r = 5, 2
    u, v, b = torch.randn(d, r), torch.randn(d, r), torch.randn(d)
    mix = MixtureCrossLayer(d, rank=r, num_experts=1, activation="identity")
    set_mix(mix, [u], [v], [torch.eye(r)], b)
    low = LowRankCrossLayer(d, rank=r)
    set_lowrank(low, u, v, b)
    x0, xl = torch.randn(3, d), torch.randn(3, d)
    torch.testing.assert_close(mix(x0, xl), low(x0, xl))
    torch.testing.assert_close(mix(x0, xl, gate_weights=torch.ones(3, 1)), low(x0, xl))


# ----------------------------------------------------------------------------- masked


def test_masked_hand_computed_with_mask_override() -> None:
    # d = r = 2, U = V = I, b = 0, mask = [0, 2], x_0 = x_l = [2, 3]
    #   V^T x = [2, 3]; mask * = [0, 6]; U = [0, 6]; x_0 * = [0, 18]; + x_l = [2, 21]
    layer = MaskedLowRankCrossLayer(2, rank=2, mask_hidden=3)
    set_lowrank(layer, torch.eye(2), torch.eye(2), t([0, 0]))
    x = t([[2, 3]])
    assert torch.equal(layer(x, x, mask=t([[0, 2]])), t([[2, 21]]))


def test_masked_matches_reference_with_mask_network() -> None:
    torch.manual_seed(5)
    d, r, h = 6, 3, 4
    layer = MaskedLowRankCrossLayer(d, rank=r, mask_hidden=h)
    u, v, b = torch.randn(d, r), torch.randn(d, r), torch.randn(d)
    set_lowrank(layer, u, v, b)
    first, _, last = layer.mask_net
    assert isinstance(first, nn.Linear) and isinstance(last, nn.Linear)
    with torch.no_grad():
        for p in (*first.parameters(), *last.parameters()):
            p.normal_()
    x0, xl = torch.randn(4, d), torch.randn(4, d)
    expected = reference_masked(
        x0, xl, u, v, b, first.weight, first.bias, last.weight, last.bias
    ).detach()
    torch.testing.assert_close(layer(x0, xl), expected)
    mask = layer.compute_mask(x0)
    assert mask.shape == (4, r)
    assert bool(((mask > 0) & (mask < 2)).all())


def test_masked_with_all_ones_mask_equals_low_rank() -> None:
    torch.manual_seed(6)
    d, r = 5, 3
    u, v, b = torch.randn(d, r), torch.randn(d, r), torch.randn(d)
    masked = MaskedLowRankCrossLayer(d, rank=r, mask_hidden=4)
    set_lowrank(masked, u, v, b)
    low = LowRankCrossLayer(d, rank=r)
    set_lowrank(low, u, v, b)
    x0, xl = torch.randn(3, d), torch.randn(3, d)
    torch.testing.assert_close(masked(x0, xl, mask=torch.ones(3, r)), low(x0, xl))


def test_masked_mask_starts_near_one() -> None:
    torch.manual_seed(7)
    layer = MaskedLowRankCrossLayer(32, rank=8, mask_hidden=16)
    with torch.no_grad():
        mask = layer.compute_mask(torch.randn(64, 32))
    assert float((mask - 1).abs().max()) < 0.1


# ----------------------------------------------------------------------------- network, MLP


@pytest.mark.parametrize("kind", ["full", "lowrank", "mix", "masked"])
def test_cross_network_composes_its_layers_on_the_same_x0(kind: str) -> None:
    torch.manual_seed(8)
    net = CrossNetwork(6, num_layers=3, kind=kind, rank=2, num_experts=2, mask_hidden=4)  # type: ignore[arg-type]
    assert len(net.layers) == 3 and net.output_dim == 6
    x0 = torch.randn(4, 6)
    expected = x0
    for layer in net.layers:
        expected = layer(x0, expected)
    torch.testing.assert_close(net(x0), expected)


def test_cross_network_with_no_layers_is_identity() -> None:
    x0 = torch.randn(2, 3)
    assert torch.equal(CrossNetwork(3, num_layers=0)(x0), x0)


def test_mlp_matches_manual_computation() -> None:
    torch.manual_seed(9)
    mlp = MLP(4, hidden=(3, 2), dropout=0.0, layer_norm=False)
    linears = [m for m in mlp.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(4, 3), (3, 2)]
    x = torch.randn(5, 4)
    expected = torch.relu(linears[1](torch.relu(linears[0](x))))
    torch.testing.assert_close(mlp(x), expected)
    assert mlp.output_dim == 2


def test_mlp_defaults_layer_norm_and_dropout() -> None:
    assert MLP(10).hidden == (256, 128, 64)
    mlp = MLP(4, hidden=(8, 8), dropout=0.5, layer_norm=True)
    kinds = [type(m).__name__ for m in mlp.net]
    assert kinds == ["Linear", "LayerNorm", "ReLU", "Dropout"] * 2
    mlp.eval()
    x = torch.randn(3, 4)
    assert torch.equal(mlp(x), mlp(x))  # dropout off in eval
    assert MLP(4, hidden=()).output_dim == 4


# ----------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: FullRankCrossLayer(0), "`in_features` must be an integer >= 1; got 0"),
        (lambda: LowRankCrossLayer(4, rank=0), "`rank` must be in [1, in_features=4]; got 0"),
        (lambda: LowRankCrossLayer(4, rank=5), "`rank` must be in [1, in_features=4]; got 5"),
        (
            lambda: MixtureCrossLayer(4, 2, num_experts=0),
            "`num_experts` must be an integer >= 1; got 0",
        ),
        (
            lambda: MixtureCrossLayer(4, 2, 2, activation="gelu"),  # type: ignore[arg-type]
            "`activation` must be one of ['tanh', 'relu', 'identity']; got 'gelu'",
        ),
        (
            lambda: MaskedLowRankCrossLayer(4, 2, mask_hidden=0),
            "`mask_hidden` must be an integer >= 1; got 0",
        ),
        (lambda: CrossNetwork(4, num_layers=-1), "`num_layers` must be an integer >= 0; got -1"),
        (
            lambda: CrossNetwork(4, 2, kind="quadratic"),  # type: ignore[arg-type]
            "`kind` must be one of ['full', 'lowrank', 'mix', 'masked']; got 'quadratic'",
        ),
        (
            lambda: CrossNetwork(4, 2, kind="mix", rank=8),
            "`rank` must be in [1, in_features=4]; got 8",
        ),
        (lambda: CrossNetwork(0, 2), "`in_features` must be an integer >= 1; got 0"),
        (lambda: MLP(4, dropout=-0.1), "`dropout` must be in [0, 1); got -0.1"),
        (lambda: MLP(4, dropout=1.0), "`dropout` must be in [0, 1); got 1.0"),
        (lambda: MLP(4, hidden=(8, 0)), "`hidden` sizes must be integers >= 1; got (8, 0)"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(build, message: str) -> None:
    with pytest.raises(ValueError) as info:
        build()
    assert str(info.value) == message


def test_full_kind_ignores_rank() -> None:
    # The rank is only read by the low-rank kinds, so it is not checked for "full".
    assert len(CrossNetwork(4, 1, kind="full", rank=100).layers) == 1
