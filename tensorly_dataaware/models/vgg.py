"""A plain VGG-style CNN for 1x28x28 Fashion-MNIST images: the second benchmark architecture.

Unlike :class:`~tensorly_dataaware.models.resnet.FashionResNet` it has no skip connections
and much wider layers (up to 256 channels, ~1.2M parameters in the convolutions), so the
compression error of each layer propagates unattenuated and the ranks to choose are larger.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FashionVGG"]


class FashionVGG(nn.Module):
    """Six 3x3 conv-BN-ReLU layers in three pairs, max-pooled after each pair, then a Linear.

    Parameters
    ----------
    num_classes : int, default 10
    widths : tuple of int, default (64, 128, 256)
        Channels of the three conv pairs; resolution goes 28 -> 14 -> 7 -> 3.
    in_channels : int, default 1
    dropout : float, default 0.1
        Dropout before the classifier (inactive in ``eval()`` mode, so it does not affect
        covariance statistics collected on an evaluated model).

    Notes
    -----
    Convolutions are ``features.0``, ``features.3``, ... (plain :class:`torch.nn.Conv2d`)
    and the classifier is ``classifier`` (a :class:`torch.nn.Linear` on the 256*3*3
    flattened features).
    """

    def __init__(
        self,
        num_classes: int = 10,
        widths: tuple[int, ...] = (64, 128, 256),
        in_channels: int = 1,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        size = 28
        for width in widths:
            for _ in range(2):
                layers += [
                    nn.Conv2d(channels, width, 3, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                ]
                channels = width
            layers.append(nn.MaxPool2d(2))
            size //= 2
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(channels * size * size, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.classifier(self.dropout(torch.flatten(x, 1)))
