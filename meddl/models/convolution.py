"""3D convolutions that run on oneDNN on the CPU at batch size 1, where PyTorch would not.

PyTorch sends a float32 CPU convolution of one patch to oneDNN only when ``N·C·D·H`` exceeds 20480
(``use_mkldnn`` in ATen's ``Convolution.cpp``). A 96³ patch's first and last layers (one or two channels) and the
deep layers of a UNet (128 channels at 12³) fall below that and take the im2col reference path instead, which
made up half of a training step of the bundled brain network (``benchmarks/training_step.py``). Cutting the
patch into two halves along depth (each with the rows the kernel needs from the other) makes a batch of two,
which always goes to oneDNN, and gives the same numbers up to float32 rounding. The slabs go in channels-last
layout, because oneDNN's blocked layout pads a layer of one or two channels to sixteen.

Under autocast and on other devices PyTorch already picks well, and the convolution is left as it is: a
bfloat16 run of the recipe keeps its arithmetic to the bit.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["OneDnnConv3d", "use_onednn_convolutions"]


class OneDnnConv3d(nn.Conv3d):
    """:class:`torch.nn.Conv3d` that feeds a float32 CPU batch of one to oneDNN as two half-depth slabs.

    Same parameters and state dict as ``nn.Conv3d``; :func:`use_onednn_convolutions` converts built networks.
    """

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if not self._splits(input):
            return super()._conv_forward(input, weight, bias)
        (pad_d, pad_h, pad_w), stride, kernel = self.padding, self.stride[0], self.kernel_size[0]
        padded = F.pad(input, (pad_w, pad_w, pad_h, pad_h, pad_d, pad_d))
        depth_out = (padded.shape[2] - kernel) // stride + 1
        half = math.ceil(depth_out / 2)
        span = (half - 1) * stride + kernel  # input rows behind `half` output rows
        second = padded[:, :, half * stride : half * stride + span]
        if second.shape[2] < span:  # an odd number of output rows: the second slab computes one row too many
            second = F.pad(second, (0, 0, 0, 0, 0, span - second.shape[2]))
        slabs = torch.cat([padded[:, :, :span], second]).contiguous(memory_format=torch.channels_last_3d)
        weight = weight.contiguous(memory_format=torch.channels_last_3d)
        output = F.conv3d(slabs, weight, bias, self.stride, 0, self.dilation)
        return torch.cat([output[:1], output[1:, :, : depth_out - half]], 2).contiguous()

    def _splits(self, input: torch.Tensor) -> bool:
        return (
            input.device.type == "cpu"
            and input.dtype == torch.float32
            and input.dim() == 5
            and input.shape[0] == 1
            and not torch.is_autocast_enabled("cpu")
            and self.groups == 1
            and self.padding_mode == "zeros"
            and not isinstance(self.padding, str)
            and self.dilation == (1, 1, 1)
        )


def use_onednn_convolutions(network: nn.Module) -> nn.Module:
    """Make every plain ``nn.Conv3d`` in ``network`` a :class:`OneDnnConv3d`, in place; returns ``network``.

    Only the class changes: parameters, state dict keys and the network's structure stay as they are.
    """
    for module in network.modules():
        if type(module) is nn.Conv3d:
            module.__class__ = OneDnnConv3d
    return network
