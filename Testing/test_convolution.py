"""The networks the engine builds run their 3D convolutions on oneDNN (meddl.models.convolution) and give what
MONAI's plain network gives: the same brain probabilities on a real head, the same training gradients."""

from __future__ import annotations

from typing import Optional

import numpy as np
import pytest
import torch
from monai.networks import nets
from torch import nn

from meddl.data import fsl_mni152_brain_pairs
from meddl.models import build_network, load_model
from meddl.models.convolution import OneDnnConv3d
from meddl.transforms import normalize_intensity, to_model_grid

torch.set_num_threads(1)


def _plain_monai(spec, weights: Optional[dict] = None) -> nn.Module:
    """MONAI's own network for ``spec`` (with ``weights``): every convolution as PyTorch runs it."""
    network = getattr(nets, spec.architecture)(**spec.architecture_args)
    if weights is not None:
        network.load_state_dict(weights)
    assert not any(isinstance(m, OneDnnConv3d) for m in network.modules())
    return network


@pytest.mark.parametrize("depth", [7, 9, 12])
@pytest.mark.parametrize("stride,kernel,padding", [(1, 3, 1), (2, 3, 1), (1, 1, 0), (2, 1, 0), (1, 3, 0)])
def test_a_convolution_gives_plain_pytorch_values_and_gradients(depth, stride, kernel, padding):
    torch.manual_seed(depth)
    plain = nn.Conv3d(2, 3, kernel, stride=stride, padding=padding)
    ours = nn.Conv3d(2, 3, kernel, stride=stride, padding=padding)
    ours.load_state_dict(plain.state_dict())
    ours.__class__ = OneDnnConv3d
    x = torch.randn(1, 2, depth, 10, 11)
    inputs = [x.clone().requires_grad_(True) for _ in range(2)]
    outputs = [conv(i) for conv, i in zip((plain, ours), inputs)]
    assert outputs[0].shape == outputs[1].shape
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-5)
    for output in outputs:
        (output * torch.linspace(-1, 1, output.numel()).reshape(output.shape)).sum().backward()
    torch.testing.assert_close(inputs[1].grad, inputs[0].grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.weight.grad, plain.weight.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.bias.grad, plain.bias.grad, atol=1e-4, rtol=1e-4)


def test_the_bundled_brain_model_draws_the_brain_monai_draws_and_trains_the_same(repo):
    package = load_model(repo / "Resources" / "models" / "brain-t1")
    network = package.network.eval()
    assert any(isinstance(m, OneDnnConv3d) for m in network.modules())
    plain = _plain_monai(package.spec, network.state_dict()).eval()

    head = fsl_mni152_brain_pairs()[0].image
    grid = to_model_grid(head, package.spec.target_spacing)
    array = normalize_intensity(grid.array, package.spec.normalization)
    z, y, x = (np.array(array.shape) - 80) // 2
    patch = torch.from_numpy(np.ascontiguousarray(array[z : z + 80, y : y + 80, x : x + 80]))[None, None].float()
    with torch.no_grad():
        ours, theirs = (torch.softmax(net(patch), 1)[0, 1] for net in (network, plain))
    assert (theirs > 0.5).sum() > 50_000  # the patch holds a brain
    assert float((ours - theirs).abs().max()) < 1e-4
    assert int(((ours > 0.5) != (theirs > 0.5)).sum()) == 0

    # One training step's gradients, all parameters together (a bias before an instance norm gets only rounding).
    network.train(), plain.train()
    gradients = []
    for net in (network, plain):
        net.zero_grad()
        torch.softmax(net(patch), 1)[0, 1].mean().backward()
        gradients.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    assert float((gradients[0] - gradients[1]).norm() / gradients[1].norm()) < 1e-3


def test_build_network_keeps_monai_state_dict_keys(repo):
    spec = load_model(repo / "Resources" / "models" / "brain-t1").spec
    assert list(build_network(spec).state_dict()) == list(_plain_monai(spec).state_dict())
