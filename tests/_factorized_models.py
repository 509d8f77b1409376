"""Small models holding every factorized layer type and padding mode (deploy and export tests)."""

from __future__ import annotations

import torch
from torch import nn

from tensorly_dataaware.torch.layers import CPConv2d, LowRankConv2d, LowRankLinear, Tucker2Conv2d

# (padding, padding_mode, stride, dilation, bias) per factorized convolution: together they
# cover every padding mode, 'same' / 'valid', stride, dilation and bias / no bias.
CONV_SETTINGS = [
    (1, "zeros", 1, 1, True),
    ("same", "reflect", 1, 1, False),
    (1, "replicate", 2, 1, True),
    ((2, 1), "circular", 1, 2, False),
    ("valid", "zeros", 1, 1, True),
    ("same", "circular", 1, 2, True),
]


def _rand(*shape: int, gen: torch.Generator) -> torch.Tensor:
    # Factors of unit-variance products keep the activations O(1) through the whole stack.
    return torch.randn(*shape, generator=gen) / shape[0] ** 0.5


def _conv(kind: str, s: int, t: int, setting, gen: torch.Generator) -> nn.Module:
    padding, mode, stride, dilation, bias = setting
    hyper = {"padding": padding, "padding_mode": mode, "stride": stride, "dilation": dilation,
             "bias": torch.randn(t, generator=gen) if bias else None}
    if kind == "tucker2":
        return Tucker2Conv2d(_rand(3, 2, 3, 3, gen=gen), _rand(s, 2, gen=gen), _rand(t, 3, gen=gen) * 2, **hyper)
    if kind == "cp":
        factors = [_rand(n, 4, gen=gen) * 2 for n in (t, s, 3, 3)]
        return CPConv2d(torch.rand(4, generator=gen) + 0.5, factors, **hyper)
    return LowRankConv2d(_rand(3, s, 3, 3, gen=gen), _rand(t, 3, gen=gen) * 2, **hyper)


class SmallFactorized(nn.Module):
    """Conv stack of factorized layers (each kind in turn), BN/ReLU, pooling, low-rank head."""

    def __init__(self, seed: int = 0, width: int = 6) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        kinds = ["tucker2", "cp", "lowrank"]
        layers: list[nn.Module] = [nn.Conv2d(1, width, 3, padding=1)]
        for index, setting in enumerate(CONV_SETTINGS):
            layers += [_conv(kinds[index % 3], width, width, setting, gen), nn.BatchNorm2d(width), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)  # global: exportable with a dynamic batch
        self.head = LowRankLinear(torch.randn(3, width, generator=gen), torch.randn(5, 3, generator=gen),
                                  torch.randn(5, generator=gen))
        # BN statistics from one batch (momentum 1): activations stay O(1) through the stack,
        # so absolute and relative tolerances mean the same thing in the tests.
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 1.0
        with torch.no_grad():
            self.train()(small_input(batch=8, seed=seed + 100))
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


def small_input(batch: int = 2, size: int = 20, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 1, size, size, generator=torch.Generator().manual_seed(seed))


class SharedStem(nn.Module):
    """One convolution registered under two names: an attribute and a ModuleList entry
    (``named_modules()`` lists it once, under its first name; the forward uses the other)."""

    def __init__(self, in_channels: int = 3, channels: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.layers = nn.ModuleList([self.stem, nn.Conv2d(channels, channels, 3, padding=1)])

    def forward(self, x):
        return self.layers[1](torch.relu(self.layers[0](x)))
