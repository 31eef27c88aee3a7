"""Feature-interaction layers for the towers: DCN-V2 cross layers and the MLP.

Every cross layer maps ``(x_0, x_l) -> x_{l+1}``, all of shape ``[batch_size, in_features]``,
where ``x_0`` is the tower input (the concatenated feature embeddings) and ``x_l`` the
output of the previous layer (``x_l = x_0`` for the first one). Four variants:

=========  ====================================================================  ==============
kind       x_{l+1}                                                               weights
=========  ====================================================================  ==============
full       x_0 * (W x_l + b) + x_l                                               W: d x d
lowrank    x_0 * (U (V^T x_l) + b) + x_l                                          U, V: d x r
mix        sum_i G_i(x_l) x_0 * (U_i g(C_i g(V_i^T x_l)) + b) + x_l              K x (U, V, C)
masked     x_0 * (U (m(x_0) * V^T x_l) + b) + x_l                                 U, V + mask net
=========  ====================================================================  ==============

``*`` is the elementwise product. References: Wang et al., "DCN V2: Improved Deep & Cross
Network and Practical Lessons for Web-scale Learning to Rank Systems", WWW 2021
(arXiv:2008.13535), Eq. 1 (full), the low-rank form of Sec. 5 and Eq. 3-4 (mixture of
low-rank experts, "DCN-Mix"); the masked variant follows the idea of ML-DCN (an
instance-conditioned mask over the low-rank directions), whose exact mask network is not
public: see `MaskedLowRankCrossLayer` for the choice made here.

Example:
    >>> import torch
    >>> net = CrossNetwork(in_features=8, num_layers=2, kind="lowrank", rank=4)
    >>> net(torch.randn(3, 8)).shape
    torch.Size([3, 8])
    >>> CrossNetwork(in_features=8, num_layers=2, kind="lowrank", rank=9)
    Traceback (most recent call last):
    ...
    ValueError: `rank` must be in [1, in_features=8]; got 9
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, get_args

import torch
from torch import nn

from retrieval.kinds import CROSS_KINDS, CrossKind  # re-exported: the names' home

ExpertActivation = Literal["tanh", "relu", "identity"]
EXPERT_ACTIVATIONS: tuple[str, ...] = get_args(ExpertActivation)


def check_positive(name: str, value: int) -> None:
    """Raise ``ValueError`` naming `name` unless `value` is an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be an integer >= 1; got {value!r}")


def check_dropout(dropout: float) -> None:
    """Raise ``ValueError`` unless `dropout` is a probability in [0, 1)."""
    if not (isinstance(dropout, int | float) and 0.0 <= dropout < 1.0):
        raise ValueError(f"`dropout` must be in [0, 1); got {dropout!r}")


def check_rank(rank: int, in_features: int) -> None:
    """Raise ``ValueError`` unless 1 <= `rank` <= `in_features`."""
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= in_features:
        raise ValueError(f"`rank` must be in [1, in_features={in_features}]; got {rank!r}")


def _xavier_(weight: torch.Tensor, fan_in: int, fan_out: int) -> None:
    """Glorot-uniform init of `weight` for a map with the given fans (any tensor layout)."""
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    nn.init.uniform_(weight, -bound, bound)


class FullRankCrossLayer(nn.Module):
    """DCN-V2 cross layer with a full-rank weight (Wang et al. 2021, Eq. 1).

    ``x_{l+1} = x_0 * (W x_l + b) + x_l`` with ``W`` in R^{d x d}, ``b`` in R^d, ``*``
    elementwise. One layer makes every output coordinate a sum of the degree-2 terms
    ``x_0[i] * W[i, j] * x_l[j]`` plus the bias and residual terms.

    Init: Glorot-uniform ``W``, zero ``b``.

    Args:
        in_features: d, the width of x_0 and x_l.

    Shapes:
        x_0, x_l: ``[batch_size, in_features]``; output ``[batch_size, in_features]``.
    """

    def __init__(self, in_features: int) -> None:
        super().__init__()
        check_positive("in_features", in_features)
        self.in_features = in_features
        self.weight = nn.Parameter(torch.empty(in_features, in_features))  # W: (d, d)
        self.bias = nn.Parameter(torch.zeros(in_features))  # b: (d,)
        _xavier_(self.weight, in_features, in_features)

    def forward(self, x_0: torch.Tensor, x_l: torch.Tensor) -> torch.Tensor:
        return x_0 * torch.addmm(self.bias, x_l, self.weight.t()) + x_l  # (B, d)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}"


class LowRankCrossLayer(nn.Module):
    """DCN-V2 cross layer with a low-rank weight ``W = U V^T`` (Wang et al. 2021, Sec. 5).

    ``x_{l+1} = x_0 * (U (V^T x_l) + b) + x_l`` with ``U, V`` in R^{d x r}. Costs
    ``2 d r`` weights instead of ``d^2``; with ``r = d`` it can express any full-rank layer.

    Init: Glorot-uniform ``U`` and ``V``, zero ``b``.

    Args:
        in_features: d, the width of x_0 and x_l.
        rank: r, in [1, d].

    Shapes:
        x_0, x_l: ``[batch_size, in_features]``; output ``[batch_size, in_features]``.
        ``down.weight`` holds ``V^T`` ``[rank, in_features]``, ``up.weight`` holds ``U``
        ``[in_features, rank]`` and ``up.bias`` holds ``b``.
    """

    def __init__(self, in_features: int, rank: int) -> None:
        super().__init__()
        check_positive("in_features", in_features)
        check_rank(rank, in_features)
        self.in_features = in_features
        self.rank = rank
        self.down = nn.Linear(in_features, rank, bias=False)  # V^T: (r, d)
        self.up = nn.Linear(rank, in_features, bias=True)  # U: (d, r), b: (d,)
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.xavier_uniform_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x_0: torch.Tensor, x_l: torch.Tensor) -> torch.Tensor:
        return x_0 * self.up(self.down(x_l)) + x_l  # (B, d)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, rank={self.rank}"


def _expert_activation(name: str) -> nn.Module:
    if name == "tanh":
        return nn.Tanh()
    if name == "relu":
        return nn.ReLU()
    if name == "identity":
        return nn.Identity()
    raise ValueError(f"`activation` must be one of {list(EXPERT_ACTIVATIONS)}; got {name!r}")


class MixtureCrossLayer(nn.Module):
    """Mixture of low-rank cross experts, "DCN-Mix" (Wang et al. 2021, Eq. 3-4).

    ``E_i(x_l) = x_0 * (U_i g(C_i g(V_i^T x_l)) + b)`` for experts ``i = 1..K``, and
    ``x_{l+1} = sum_i G_i(x_l) E_i(x_l) + x_l``, with ``U_i, V_i`` in R^{d x r},
    ``C_i`` in R^{r x r}, ``b`` in R^d shared by the experts (as in the paper's Eq. 4
    and its reference code) and ``g`` a nonlinearity applied in the r-dimensional
    projected space, both before and after ``C_i``.

    Choices: ``g = tanh`` by default (the paper's released code uses tanh; "relu" and
    "identity" are offered). The gate is ``G(x_l) = softmax(W_g x_l)`` over the K
    experts, ``W_g`` in R^{K x d} without bias (one linear scorer per expert, as in
    the paper). Because the softmax sums to 1 the mixture is evaluated as
    ``x_0 * (sum_i G_i U_i h_i + (sum_i G_i) b) + x_l`` with ``h_i = g(C_i g(V_i^T x_l))``,
    which equals the formula above for any gate and needs one ``[B, K r] x [K r, d]``
    product instead of K separate ones.

    Init: Glorot-uniform ``U_i``, ``V_i``, ``C_i`` and ``W_g``; zero ``b``.

    Args:
        in_features: d, the width of x_0 and x_l.
        rank: r, in [1, d].
        num_experts: K >= 1.
        activation: g, one of "tanh", "relu", "identity".

    Shapes:
        x_0, x_l: ``[batch_size, in_features]``; output ``[batch_size, in_features]``.
        ``gate_weights`` (optional override of ``G(x_l)``): ``[batch_size, num_experts]``.
        Parameters: ``down`` ``[d, K, r]`` (``down[:, i]`` is V_i), ``core`` ``[K, r, r]`` (the C_i),
        ``up`` ``[K, r, d]`` (the U_i transposed), ``bias`` ``[d]``, ``gate.weight`` ``[K, d]``.
    """

    def __init__(
        self,
        in_features: int,
        rank: int,
        num_experts: int,
        activation: ExpertActivation = "tanh",
    ) -> None:
        super().__init__()
        check_positive("in_features", in_features)
        check_rank(rank, in_features)
        check_positive("num_experts", num_experts)
        self.activation = _expert_activation(activation)
        self.activation_name = activation
        self.in_features = in_features
        self.rank = rank
        self.num_experts = num_experts
        d, r, k = in_features, rank, num_experts
        self.down = nn.Parameter(torch.empty(d, k, r))  # V_i = down[:, i]: (d, K, r)
        self.core = nn.Parameter(torch.empty(k, r, r))  # C_i: (K, r, r), out x in
        self.up = nn.Parameter(torch.empty(k, r, d))  # U_i^T: (K, r, d)
        self.bias = nn.Parameter(torch.zeros(d))  # b: (d,)
        self.gate = nn.Linear(d, k, bias=False)  # W_g: (K, d)
        for i in range(k):
            _xavier_(self.down.data[:, i], d, r)
            _xavier_(self.core.data[i], r, r)
            _xavier_(self.up.data[i], r, d)
        nn.init.xavier_uniform_(self.gate.weight)

    def forward(
        self,
        x_0: torch.Tensor,
        x_l: torch.Tensor,
        gate_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        k, r, d = self.num_experts, self.rank, self.in_features
        if gate_weights is None:
            gate_weights = torch.softmax(self.gate(x_l), dim=-1)  # (B, K)
        v = x_l @ self.down.view(d, k * r)  # (B, K*r): all V_i^T x_l
        v = self.activation(v).view(-1, k, r).transpose(0, 1)  # (K, B, r)
        h = self.activation(torch.bmm(v, self.core.transpose(1, 2)))  # (K, B, r): g(C_i v_i)
        h = h.transpose(0, 1) * gate_weights.unsqueeze(-1)  # (B, K, r): G_i h_i
        mixed = h.reshape(-1, k * r) @ self.up.reshape(k * r, d)  # (B, d): sum_i G_i U_i h_i
        mixed = mixed + gate_weights.sum(dim=-1, keepdim=True) * self.bias  # (B, d)
        return x_0 * mixed + x_l  # (B, d)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, rank={self.rank}, "
            f"num_experts={self.num_experts}, activation={self.activation_name!r}"
        )


class MaskedLowRankCrossLayer(nn.Module):
    """Low-rank cross layer with an instance-conditioned mask over the r directions (ML-DCN).

    ``x_{l+1} = x_0 * (U (m(x_0) * V^T x_l) + b) + x_l`` with ``U, V`` in R^{d x r} and
    ``m(x_0)`` in R^r a per-example mask that selects (m ~ 0), keeps (m ~ 1) or
    amplifies (m up to 2) each low-rank direction of the cross term.

    The ML-DCN mask network is not published; this layer uses a two-layer MLP on x_0::

        m(x_0) = 2 * sigmoid(M_2 relu(M_1 x_0 + c_1) + c_2)   in (0, 2)^r

    with ``M_1`` in R^{h x d}, ``M_2`` in R^{r x h}. The factor 2 lets the mask both
    suppress and amplify, and ``m = 1`` is the plain low-rank layer. ``M_2`` is
    initialised small (normal, std 0.01) and ``c_2`` at zero so that ``m(x_0) ~ 1`` at
    the start of training (the layer starts as a low-rank DCN layer) while every mask
    parameter still gets a gradient from the first step. Conditioning on x_0 rather than
    x_l keeps the mask a property of the example, the same at every depth's input.

    Init: Glorot-uniform ``U``, ``V``, ``M_1``; zero ``b``, ``c_1``, ``c_2``.

    Args:
        in_features: d, the width of x_0 and x_l.
        rank: r, in [1, d].
        mask_hidden: h >= 1, hidden width of the mask network.

    Shapes:
        x_0, x_l: ``[batch_size, in_features]``; output ``[batch_size, in_features]``.
        ``mask`` (optional override of ``m(x_0)``, e.g. all ones): ``[batch_size, rank]``.
    """

    def __init__(self, in_features: int, rank: int, mask_hidden: int) -> None:
        super().__init__()
        check_positive("in_features", in_features)
        check_rank(rank, in_features)
        check_positive("mask_hidden", mask_hidden)
        self.in_features = in_features
        self.rank = rank
        self.mask_hidden = mask_hidden
        self.down = nn.Linear(in_features, rank, bias=False)  # V^T: (r, d)
        self.up = nn.Linear(rank, in_features, bias=True)  # U: (d, r), b: (d,)
        self.mask_net = nn.Sequential(
            nn.Linear(in_features, mask_hidden),  # M_1: (h, d), c_1: (h,)
            nn.ReLU(),
            nn.Linear(mask_hidden, rank),  # M_2: (r, h), c_2: (r,)
        )
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.xavier_uniform_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        hidden_layer, _, out_layer = self.mask_net
        assert isinstance(hidden_layer, nn.Linear) and isinstance(out_layer, nn.Linear)
        nn.init.xavier_uniform_(hidden_layer.weight)
        nn.init.zeros_(hidden_layer.bias)
        nn.init.normal_(out_layer.weight, std=0.01)
        nn.init.zeros_(out_layer.bias)

    def compute_mask(self, x_0: torch.Tensor) -> torch.Tensor:
        """``m(x_0) = 2 sigmoid(mask_net(x_0))``: ``[batch_size, in_features] -> [batch_size, rank]``."""
        return 2.0 * torch.sigmoid(self.mask_net(x_0))  # (B, r)

    def forward(
        self,
        x_0: torch.Tensor,
        x_l: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if mask is None:
            mask = self.compute_mask(x_0)  # (B, r)
        return x_0 * self.up(mask * self.down(x_l)) + x_l  # (B, d)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, rank={self.rank}, mask_hidden={self.mask_hidden}"


class CrossNetwork(nn.Module):
    """A stack of L cross layers of one kind: ``x_{l+1} = f_l(x_0, x_l)``, ``l = 0..L-1``.

    See the module docstring for the four layer formulas (DCN-V2, Wang et al. 2021).
    With ``num_layers = 0`` the network is the identity.

    Args:
        in_features: d, the width of the input x_0.
        num_layers: L >= 0, number of stacked layers.
        kind: "full", "lowrank", "mix" or "masked".
        rank: r in [1, d] for the low-rank kinds (ignored by "full").
        num_experts: K >= 1 for "mix" (ignored otherwise).
        expert_activation: g for "mix": "tanh", "relu" or "identity".
        mask_hidden: hidden width of the mask network for "masked" (ignored otherwise).

    Shapes:
        input x_0 ``[batch_size, in_features]``; output ``[batch_size, in_features]``.
    """

    def __init__(
        self,
        in_features: int,
        num_layers: int,
        kind: CrossKind = "full",
        rank: int = 32,
        num_experts: int = 4,
        expert_activation: ExpertActivation = "tanh",
        mask_hidden: int = 32,
    ) -> None:
        super().__init__()
        check_positive("in_features", in_features)
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 0:
            raise ValueError(f"`num_layers` must be an integer >= 0; got {num_layers!r}")
        if kind not in CROSS_KINDS:
            raise ValueError(f"`kind` must be one of {list(CROSS_KINDS)}; got {kind!r}")
        if kind != "full":
            check_rank(rank, in_features)
        if kind == "mix":
            check_positive("num_experts", num_experts)
            _expert_activation(expert_activation)
        if kind == "masked":
            check_positive("mask_hidden", mask_hidden)
        self.in_features = in_features
        self.kind = kind
        layers: list[nn.Module] = []
        for _ in range(num_layers):
            if kind == "full":
                layers.append(FullRankCrossLayer(in_features))
            elif kind == "lowrank":
                layers.append(LowRankCrossLayer(in_features, rank))
            elif kind == "mix":
                layers.append(MixtureCrossLayer(in_features, rank, num_experts, expert_activation))
            else:
                layers.append(MaskedLowRankCrossLayer(in_features, rank, mask_hidden))
        self.layers = nn.ModuleList(layers)

    @property
    def output_dim(self) -> int:
        """Width of the output: the same as the input, d."""
        return self.in_features

    def forward(self, x_0: torch.Tensor) -> torch.Tensor:
        x_l = x_0
        for layer in self.layers:
            x_l = layer(x_0, x_l)  # (B, d)
        return x_l


class MLP(nn.Module):
    """Feed-forward stack: ``h_{k+1} = dropout(relu(norm(W_k h_k + b_k)))`` for each hidden size.

    The "deep" network of DCN-V2 (Wang et al. 2021, Sec. 3). ``norm`` is a LayerNorm
    when `layer_norm` is set, else the identity; every layer, the last included, ends
    with the ReLU (the tower puts a linear projection after it). An empty `hidden` is
    the identity. Init: PyTorch's default for ``nn.Linear`` (Kaiming-uniform).

    Args:
        in_features: width of the input.
        hidden: output width of each layer, e.g. (256, 128, 64).
        dropout: dropout probability after each activation, in [0, 1).
        layer_norm: apply LayerNorm before each activation.

    Shapes:
        input ``[batch_size, in_features]``; output ``[batch_size, hidden[-1]]``
        (``[batch_size, in_features]`` when `hidden` is empty).
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int] = (256, 128, 64),
        dropout: float = 0.0,
        layer_norm: bool = False,
    ) -> None:
        super().__init__()
        check_positive("in_features", in_features)
        hidden = tuple(hidden)
        for width in hidden:
            if isinstance(width, bool) or not isinstance(width, int) or width < 1:
                raise ValueError(f"`hidden` sizes must be integers >= 1; got {hidden!r}")
        check_dropout(dropout)
        self.in_features = in_features
        self.hidden = hidden
        layers: list[nn.Module] = []
        width_in = in_features
        for width in hidden:
            layers.append(nn.Linear(width_in, width))
            if layer_norm:
                layers.append(nn.LayerNorm(width))
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width_in = width
        self.net = nn.Sequential(*layers)

    @property
    def output_dim(self) -> int:
        """Width of the output: the last hidden size, or `in_features` without layers."""
        return self.hidden[-1] if self.hidden else self.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, output_dim)
