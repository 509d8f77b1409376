"""A ResNet-20-style residual CNN for 1x28x28 Fashion-MNIST images.

The layout follows the CIFAR ResNets of He et al. (2016): a 3x3 stem, three stages of
basic blocks at 16/32/64 channels (the last two halve the resolution, 28 -> 14 -> 7), global
average pooling and one linear classifier. Every convolution and the classifier are plain
:class:`torch.nn.Conv2d` / :class:`torch.nn.Linear` modules, because the compression code
finds the layers to factorize by module type and swaps them by their dotted name.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BasicBlock", "FashionResNet"]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity or 1x1-conv shortcut.

    Parameters
    ----------
    in_channels, out_channels : int
    stride : int, default 1
        Stride of the first convolution; when it is not 1 or the channel count changes,
        the shortcut is a strided 1x1 convolution followed by BatchNorm ("option B").
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        # No conv bias: the BatchNorm that follows would cancel it.
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class FashionResNet(nn.Module):
    """ResNet-20-like network: 19 conv layers + 1 linear, about 0.27M parameters.

    Parameters
    ----------
    num_classes : int, default 10
    widths : tuple of int, default (16, 32, 64)
        Channels of the three stages.
    blocks_per_stage : int, default 3
        3 gives ResNet-20 (6 * 3 + 2 weighted layers, counting the stem and the classifier).
    in_channels : int, default 1

    Notes
    -----
    Input: ``float32`` ``(N, in_channels, 28, 28)`` normalized with
    :data:`tensorly_dataaware.data.FASHION_MEAN` / :data:`~tensorly_dataaware.data.FASHION_STD`.
    Output: unnormalized logits ``(N, num_classes)``. Any input size works (the pooling is
    global), but the shipped weights were trained at 28x28.
    """

    def __init__(
        self,
        num_classes: int = 10,
        widths: tuple[int, ...] = (16, 32, 64),
        blocks_per_stage: int = 3,
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        if len(widths) != 3:
            raise ValueError(f"FashionResNet has exactly three stages, got widths={widths}")
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages = []
        channels = widths[0]
        for index, width in enumerate(widths):
            stride = 1 if index == 0 else 2
            blocks = [BasicBlock(channels, width, stride)]
            blocks += [BasicBlock(width, width) for _ in range(blocks_per_stage - 1)]
            stages.append(nn.Sequential(*blocks))
            channels = width
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        # Zero-init the last BN of each residual branch: every block starts as the identity,
        # which makes the first epochs of a short schedule markedly more stable.
        for module in self.modules():
            if isinstance(module, BasicBlock):
                nn.init.zeros_(module.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))
