"""The FID network (TF inception-2015-12-05 to its pool layer), rebuilt in eager PyTorch from
NVIDIA's TorchScript file, with the same weights.

Why not run the TorchScript file as it is: it runs every convolution's batch norm as a pass of
its own and copies each branch of every Inception block to NCHW (`.contiguous()`) before
concatenating, so channels-last input is converted back and forth 11 times. Folding the batch
norm into the convolution (y = conv(x, w / sqrt(var + eps)) + beta - mean / sqrt(var + eps);
the file's gamma is 1) and concatenating the branches as they come gives the file's features to
about 1e-6 of their largest, about 2.2x faster in fp32 on a 2-core CPU (docs/BENCHMARKS.md).
pytorch-fid and torch-fidelity each carry an eager copy of this network, but load its weights
from the internet; this one reads the file already installed, so it stays offline."""

import re

import torch
import torch.nn as nn
import torch.nn.functional as F

BN_EPS = 0.001  # the file's batch_norm(..., 0.1, 0.001): TensorFlow's epsilon


class ConvBNReLU(nn.Module):
    """A Conv2dLayer of the file (conv without bias, batch norm with gamma 1, ReLU) as one
    convolution with the batch norm folded into its weight and bias."""

    def __init__(self, layer):
        super().__init__()
        scale = (layer.var + BN_EPS).rsqrt()
        weight = layer.weight * scale[:, None, None, None]
        padding = layer.padding if isinstance(layer.padding, (list, tuple)) else [layer.padding] * 2
        self.conv = nn.Conv2d(weight.shape[1], weight.shape[0], tuple(weight.shape[2:]),
                              stride=layer.stride, padding=tuple(padding))
        with torch.no_grad():
            self.conv.weight.copy_(weight)
            self.conv.bias.copy_(layer.beta - layer.mean * scale)

    def forward(self, x):
        return F.relu(self.conv(x), inplace=True)


_POOL_CALL = re.compile(r"\(input, \[(\d+), \1\], \[(\d+), \2\], \[(\d+), \3\](.*)\)")


def pool(layer):
    """The file's MaxPool2d / AvgPool2d, read from its code (the sizes are constants there):
    square windows, no ceil mode; an average pool counts its padding unless the call says False."""
    match = _POOL_CALL.search(layer.code)
    flags = re.findall(r"True|False", match.group(4)) if match else []
    if match is None or "True" in flags[:-1] or (layer.original_name == "MaxPool2d" and "True" in flags):
        raise ValueError(f"unrecognised pooling layer in the FID network file:\n{layer.code}")
    kernel, stride, padding = (int(match.group(i)) for i in (1, 2, 3))
    if layer.original_name == "MaxPool2d":
        return nn.MaxPool2d(kernel, stride, padding)
    return nn.AvgPool2d(kernel, stride, padding, count_include_pad=flags[-1:] != ["False"])


def rebuild(layer):
    """The eager module of one of the file's layers, by its original class name."""
    kind = layer.original_name
    if kind == "Conv2dLayer":
        return ConvBNReLU(layer)
    if kind in ("MaxPool2d", "AvgPool2d"):
        return pool(layer)
    if kind == "Sequential":
        return nn.Sequential(*(rebuild(child) for _, child in layer.named_children()))
    if kind == "InceptionE":
        return InceptionE(layer)
    if kind.startswith("Inception"):  # A, B, C, D: branches side by side, concatenated
        return Branches(layer)
    raise ValueError(f"unrecognised layer {kind!r} in the FID network file")


class Branches(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.branches = nn.ModuleList(rebuild(child) for _, child in layer.named_children())

    def forward(self, x):
        return torch.cat([branch(x) for branch in self.branches], 1)


class InceptionE(nn.Module):
    """The last two blocks: two towers whose ends split into 1x3 and 3x1 convolutions."""

    def __init__(self, layer):
        super().__init__()
        part = lambda name: rebuild(getattr(layer, name))  # noqa: E731
        self.conv = part("conv")
        self.tower = part("tower_conv")
        self.tower_ends = nn.ModuleList([part("tower_mixed_conv"), part("tower_mixed_conv_1")])
        self.tower_1 = nn.Sequential(part("tower_1_conv"), part("tower_1_conv_1"))
        self.tower_1_ends = nn.ModuleList([part("tower_1_mixed_conv"), part("tower_1_mixed_conv_1")])
        self.tower_2 = nn.Sequential(part("tower_2_pool"), part("tower_2_conv"))

    def forward(self, x):
        a, b = self.tower(x), self.tower_1(x)
        return torch.cat([self.conv(x), *(end(a) for end in self.tower_ends),
                          *(end(b) for end in self.tower_1_ends), self.tower_2(x)], 1)


def from_torchscript(scripted):
    """Eager (N, 3, 299, 299) in [-1, 1] -> (N, 2048) pool features, from the loaded file."""
    layers = scripted.net.layers
    return nn.Sequential(*(rebuild(child) for _, child in layers.named_children()), nn.Flatten()).eval()
