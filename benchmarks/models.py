"""Benchmark networks in plain PyTorch (no MONAI needed).

:func:`spleen_unet` is MONAI's ``UNet(spatial_dims=3, in_channels=1, out_channels=2,
channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2)`` -- the network of the
``spleen_ct_segmentation`` bundle and the reference of the other benchmarks -- rebuilt module for module:
the same layers, the same forward pass and the same state-dict keys, so MONAI weights load into it (checked
against ``monai.networks.nets.UNet`` when MONAI is installed: ``python -m benchmarks.models``).

Structure (MONAI defaults: kernel 3, up-kernel 3, PReLU, instance norm without affine, dropout 0, "NDA" order)::

    model = Sequential(down_1, SkipConnection(Sequential(down_2, SkipConnection(... bottom ...), up_2)), up_1)
    down_i  = ResidualUnit(stride 2, 2 sub-units)      bottom = ResidualUnit(stride 1, 2 sub-units)
    up_i    = Sequential(ConvTranspose(stride 2) + norm/act, ResidualUnit(stride 1, 1 sub-unit))
    the top up block ends in a bare convolution (logits)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class ADN(nn.Sequential):
    """Norm (instance, no affine), dropout (p = 0), activation (PReLU): MONAI's ``ADN(ordering="NDA")``."""

    def __init__(self, channels: int, norm: str = "instance"):
        super().__init__()
        if norm == "instance":
            self.add_module("N", nn.InstanceNorm3d(channels))
        elif norm == "batch":
            self.add_module("N", nn.BatchNorm3d(channels))
        else:
            raise ValueError(f"norm {norm!r}: instance or batch")
        self.add_module("D", nn.Dropout(0.0))
        self.add_module("A", nn.PReLU())


class Convolution(nn.Sequential):
    """MONAI's ``Convolution``: a (transposed) convolution with 'same' padding, then ``ADN`` unless conv-only."""

    def __init__(self, cin: int, cout: int, stride: int = 1, *, transposed: bool = False, conv_only: bool = False,
                 norm: str = "instance"):
        super().__init__()
        if transposed:
            conv: nn.Module = nn.ConvTranspose3d(cin, cout, 3, stride=stride, padding=1, output_padding=stride - 1)
        else:
            conv = nn.Conv3d(cin, cout, 3, stride=stride, padding=1)
        self.add_module("conv", conv)
        if not conv_only:
            self.add_module("adn", ADN(cout, norm))


class ResidualUnit(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1, subunits: int = 2, last_conv_only: bool = False,
                 norm: str = "instance"):
        super().__init__()
        self.conv = nn.Sequential()
        channels, s = cin, stride
        for i in range(max(1, subunits)):
            only = last_conv_only and i == subunits - 1
            self.conv.add_module(f"unit{i}", Convolution(channels, cout, s, conv_only=only, norm=norm))
            channels, s = cout, 1
        self.residual: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            k, p = (3, 1) if stride != 1 else (1, 0)
            self.residual = nn.Conv3d(cin, cout, k, stride, p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.residual(x)


class SkipConnection(nn.Module):
    def __init__(self, submodule: nn.Module):
        super().__init__()
        self.submodule = submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.submodule(x)], dim=1)


class UNet(nn.Module):
    """MONAI's residual ``UNet`` for 3D (``num_res_units`` > 0)."""

    def __init__(self, in_channels: int = 1, out_channels: int = 2,
                 channels: Sequence[int] = (16, 32, 64, 128, 256), strides: Sequence[int] = (2, 2, 2, 2),
                 num_res_units: int = 2, norm: str = "instance"):
        super().__init__()
        if num_res_units < 1:
            raise ValueError("this rebuild covers num_res_units >= 1")
        if len(channels) != len(strides) + 1:
            raise ValueError("len(channels) must be len(strides) + 1")

        def block(cin: int, cout: int, chans: Sequence[int], strs: Sequence[int], top: bool) -> nn.Module:
            c, s = chans[0], strs[0]
            if len(chans) > 2:
                sub = block(c, c, chans[1:], strs[1:], False)
                up_in = c * 2
            else:
                sub = ResidualUnit(c, chans[1], 1, num_res_units, norm=norm)
                up_in = c + chans[1]
            down = ResidualUnit(cin, c, s, num_res_units, norm=norm)
            up = nn.Sequential(
                Convolution(up_in, cout, s, transposed=True, norm=norm),
                ResidualUnit(cout, cout, 1, 1, last_conv_only=top, norm=norm),
            )
            return nn.Sequential(down, SkipConnection(sub), up)

        self.model = block(in_channels, out_channels, list(channels), list(strides), True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def spleen_unet(seed: int = 0, norm: str = "instance") -> UNet:
    """The spleen bundle's UNet with seeded random weights, in eval mode."""
    torch.manual_seed(seed)
    return UNet(norm=norm).eval()


if __name__ == "__main__":  # compare with MONAI's own UNet when it is installed
    from monai.networks.nets import UNet as MonaiUNet

    ours = spleen_unet(0)
    theirs = MonaiUNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(16, 32, 64, 128, 256),
                       strides=(2, 2, 2, 2), num_res_units=2).eval()
    assert list(ours.state_dict()) == list(theirs.state_dict()), "state-dict keys differ"
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(1, 1, 64, 64, 64)
    with torch.no_grad():
        diff = (ours(x) - theirs(x)).abs().max().item()
    print(f"same keys; max |ours - MONAI| = {diff:.3g}")
    assert diff < 1e-5
