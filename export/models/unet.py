"""A compact 3D U-Net for the phantom-trained default package.

Plain U-Net (Ronneberger / Cicek et al., nnU-Net style blocks): per level ``conv 3x3x3 -> BatchNorm ->
LeakyReLU`` repeated, 2x2x2 max pooling down, 2x2x2 transposed convolution up, skip connections by
concatenation, a 1x1x1 head giving logits for background plus one channel per label.

Choices made for a CPU edge runtime:

* BatchNorm, not InstanceNorm: in eval mode it is an affine map that :meth:`UNet3D.fused` folds into the
  preceding convolution before export, so the ONNX graph is only Conv / LeakyRelu / MaxPool /
  ConvTranspose / Concat (opset 18, nothing ONNX Runtime has to emulate), and the output of a window does not
  depend on what else is in the window.
* Few channels at full resolution (8 by default, one convolution on each side), where the compute is, and
  more channels deeper down, where it is cheap.
* CT windows inside the graph: the single normalised input channel is expanded into the input itself plus
  a few clipped intensity windows (lung, soft tissue, narrow soft tissue, bone by default) before the first
  convolution, and the soft-tissue windows also smoothed (a separable box filter). Organs that differ by
  10-30 HU (liver, spleen, kidney, muscle), under noise of about 15 HU, are then as far apart for the network
  as air and bone, which it otherwise has to learn slowly from few steps. In ONNX this is
  Mul/Add/Clip/AveragePool/Concat, small next to the convolutions; the package's manifest still declares one
  input channel (``ct_window`` normalisation).

Input: ``(N, 1, Z, Y, X)`` CT normalised as the package manifest says; every spatial size must be a multiple
of ``2 ** (levels - 1)`` (16 with the default five levels). The sliding window of ``edge_runtime`` always
sends whole patches, so the manifest's patch size must be such a multiple. Output: logits
``(N, num_classes, Z, Y, X)``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_CHANNELS = (8, 16, 32, 64, 128)
DEFAULT_ENCODER_CONVS = (1, 2, 2, 2, 2)
DEFAULT_DECODER_CONVS = (1, 2, 2, 2)
#: (centre, width) in HU of the windows computed from the input: lung/air, soft tissue, narrow soft tissue
#: (liver, spleen, kidney and muscle differ by 10-30 HU), bone
DEFAULT_WINDOWS = ((-750.0, 500.0), (40.0, 200.0), (45.0, 90.0), (450.0, 900.0))
#: windows (indices) also given to the network smoothed: both soft-tissue windows
DEFAULT_SMOOTHED_WINDOWS = (1, 2)


class ConvBlock(nn.Sequential):
    """``n`` times conv 3x3x3 -> BatchNorm -> LeakyReLU."""

    def __init__(self, cin: int, cout: int, n: int, negative_slope: float):
        layers: list[nn.Module] = []
        for i in range(n):
            layers += [
                nn.Conv3d(cin if i == 0 else cout, cout, 3, padding=1, bias=False),
                nn.BatchNorm3d(cout),
                nn.LeakyReLU(negative_slope, inplace=True),
            ]
        super().__init__(*layers)


class UNet3D(nn.Module):
    # buffers (register_buffer): the CT windows as x * scale + shift, one channel each
    window_scale: torch.Tensor
    window_shift: torch.Tensor

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 6,
        channels: Sequence[int] = DEFAULT_CHANNELS,
        encoder_convs: Sequence[int] | None = None,
        decoder_convs: Sequence[int] | None = None,
        negative_slope: float = 0.01,
        windows: Sequence[Sequence[float]] = DEFAULT_WINDOWS,
        input_mean: float = 0.0,
        input_std: float = 512.0,
        deep_supervision: int = 2,
        smoothed_windows: Sequence[int] = DEFAULT_SMOOTHED_WINDOWS,
        smooth_kernel: int = 5,
    ):
        """``windows``: (centre, width) HU windows added as input channels, each ``clip((hu - centre) /
        (width / 2), -1, 1)``; ``input_mean`` / ``input_std``: the normalisation of the input (the manifest's
        ``ct_window`` mean and std), so that HU = input * std + mean. ``deep_supervision``: decoder levels
        below full resolution that get an auxiliary 1x1x1 head for training (:meth:`forward_train`); the
        exported graph (:meth:`forward`) never uses them. ``smoothed_windows``: indices into ``windows`` whose
        box-filtered copy (``smooth_kernel`` voxels wide, separable, edges averaged over the inside only) is
        added as a further channel."""
        super().__init__()
        channels = [int(c) for c in channels]
        levels = len(channels)
        if levels < 2:
            raise ValueError("a U-Net needs at least two levels")
        if encoder_convs is None:
            encoder_convs = [1] + [2] * (levels - 1)
        if decoder_convs is None:
            decoder_convs = [1] + [2] * (levels - 2)
        if windows and in_channels != 1:
            raise ValueError("input windows need a single input channel")
        encoder_convs = [int(n) for n in encoder_convs]
        decoder_convs = [int(n) for n in decoder_convs]
        if len(encoder_convs) != levels or len(decoder_convs) != levels - 1:
            raise ValueError(
                f"{levels} levels need {levels} encoder and {levels - 1} decoder conv counts, "
                f"got {encoder_convs} and {decoder_convs}"
            )
        self._config = {
            "in_channels": int(in_channels),
            "num_classes": int(num_classes),
            "channels": channels,
            "encoder_convs": encoder_convs,
            "decoder_convs": decoder_convs,
            "negative_slope": float(negative_slope),
            "windows": [[float(c), float(w)] for c, w in windows],
            "input_mean": float(input_mean),
            "input_std": float(input_std),
            "deep_supervision": int(deep_supervision),
            "smoothed_windows": [int(i) for i in smoothed_windows],
            "smooth_kernel": int(smooth_kernel),
        }
        if any(not 0 <= int(i) < len(windows) for i in smoothed_windows):
            raise ValueError(f"smoothed_windows {list(smoothed_windows)} must index the {len(windows)} windows")
        if smooth_kernel < 1 or smooth_kernel % 2 == 0:
            raise ValueError("smooth_kernel must be odd and positive")
        self.smoothed = [int(i) for i in smoothed_windows]
        self.smooth_kernel = int(smooth_kernel)
        # window k of the normalised input x: clip(x * scale_k + shift_k, -1, 1)
        scale = [2.0 * input_std / float(w) for _c, w in windows]
        shift = [2.0 * (input_mean - float(c)) / float(w) for c, w in windows]
        self.register_buffer("window_scale", torch.tensor(scale, dtype=torch.float32).view(1, -1, 1, 1, 1))
        self.register_buffer("window_shift", torch.tensor(shift, dtype=torch.float32).view(1, -1, 1, 1, 1))
        self.encoder = nn.ModuleList()
        cin = in_channels * (1 + len(scale)) + len(self.smoothed) if scale else in_channels
        for c, n in zip(channels, encoder_convs, strict=False):
            self.encoder.append(ConvBlock(cin, c, n, negative_slope))
            cin = c
        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for level in range(levels - 2, -1, -1):
            self.up.append(nn.ConvTranspose3d(channels[level + 1], channels[level], 2, stride=2))
            self.decoder.append(ConvBlock(2 * channels[level], channels[level], decoder_convs[level], negative_slope))
        self.head = nn.Conv3d(channels[0], num_classes, 1)
        # auxiliary heads on the decoder outputs at levels 1..deep_supervision (training only)
        n_aux = max(0, min(int(deep_supervision), levels - 2))
        self.aux_heads = nn.ModuleList(nn.Conv3d(channels[level], num_classes, 1) for level in range(1, n_aux + 1))
        for m in self.modules():
            if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
                nn.init.kaiming_normal_(m.weight, a=negative_slope, nonlinearity="leaky_relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def divisor(self) -> int:
        """Every spatial size of the input must be a multiple of this."""
        return 2 ** (len(self.encoder) - 1)

    def config(self) -> dict[str, Any]:
        """Constructor arguments (JSON-serialisable): ``UNet3D(**model.config())`` rebuilds the architecture."""
        return copy.deepcopy(self._config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, deep=False)[0]

    def forward_train(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits at full resolution, then at 1/2, 1/4, ... (the auxiliary heads), for deep supervision."""
        return self._run(x, deep=True)

    def _run(self, x: torch.Tensor, deep: bool) -> list[torch.Tensor]:
        if self.window_scale.numel():
            win = torch.clamp(x * self.window_scale + self.window_shift, -1.0, 1.0)
            parts = [x, win]
            if self.smoothed:
                parts.append(self._smooth(win[:, self.smoothed]))
            x = torch.cat(parts, dim=1)
        skips = []
        for i, block in enumerate(self.encoder):
            if i:
                x = F.max_pool3d(x, 2)
            x = block(x)
            skips.append(x)
        skips.pop()
        aux: list[torch.Tensor] = []
        levels = len(self.decoder)
        for k, (up, block) in enumerate(zip(self.up, self.decoder, strict=False)):
            x = block(torch.cat([skips.pop(), up(x)], dim=1))
            level = levels - 1 - k  # decoder level of x (0 = full resolution)
            if deep and 1 <= level <= len(self.aux_heads):
                aux.append(self.aux_heads[level - 1](x))
        return [self.head(x), *reversed(aux)]

    def _smooth(self, x: torch.Tensor) -> torch.Tensor:
        k, p = self.smooth_kernel, self.smooth_kernel // 2
        for kernel, pad in (((k, 1, 1), (p, 0, 0)), ((1, k, 1), (0, p, 0)), ((1, 1, k), (0, 0, p))):
            x = F.avg_pool3d(x, kernel, stride=1, padding=pad, count_include_pad=False)
        return x

    def fused(self) -> UNet3D:
        """An eval-mode copy with every BatchNorm folded into its convolution (for export)."""
        from torch.nn.utils.fusion import fuse_conv_bn_eval

        model = copy.deepcopy(self).eval()
        for block in [*model.encoder, *model.decoder]:
            layers = list(block)
            fused_layers: list[nn.Module] = []
            i = 0
            while i < len(layers):
                if (
                    i + 1 < len(layers)
                    and isinstance(layers[i], nn.Conv3d)
                    and isinstance(layers[i + 1], nn.BatchNorm3d)
                ):
                    fused_layers.append(fuse_conv_bn_eval(layers[i], layers[i + 1]))
                    i += 2
                else:
                    fused_layers.append(layers[i])
                    i += 1
            for name in list(block._modules):
                del block._modules[name]
            for j, layer in enumerate(fused_layers):
                block.add_module(str(j), layer)
        return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_checkpoint(path: str | Any, map_location: str = "cpu") -> tuple[UNet3D, dict[str, Any]]:
    """Rebuild a trained model from a checkpoint written by ``export.models.train_phantom_unet``.

    Returns (model in eval mode, checkpoint)."""
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    model = UNet3D(**ckpt["model"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt
