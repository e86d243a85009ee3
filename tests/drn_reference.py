"""A PyTorch re-statement of fyu/drn's DRN (arch "D") and DRNSeg, written for the tests from the architecture
(not copied). Its module names give exactly DRNSeg's state_dict keys (`base.{i}...`, `seg`, `up`).
"""

import math
import os

import torch
from torch import nn as tnn

STRIDES, DILATIONS = (1, 2, 2, 2, 1, 1, 1, 1), (1, 1, 1, 1, 2, 4, 2, 1)


def _conv_layers(cin, cout, n, stride, dilation):
    mods = []
    for j in range(n):
        mods += [tnn.Conv2d(cin if j == 0 else cout, cout, 3, stride if j == 0 else 1, dilation, dilation,
                            bias=False), tnn.BatchNorm2d(cout), tnn.ReLU()]
    return tnn.Sequential(*mods)


class Bottleneck(tnn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride, dilation):
        super().__init__()
        out = planes * 4
        self.conv1, self.bn1 = tnn.Conv2d(cin, planes, 1, bias=False), tnn.BatchNorm2d(planes)
        self.conv2 = tnn.Conv2d(planes, planes, 3, stride, dilation, dilation, bias=False)
        self.bn2 = tnn.BatchNorm2d(planes)
        self.conv3, self.bn3 = tnn.Conv2d(planes, out, 1, bias=False), tnn.BatchNorm2d(out)
        self.relu = tnn.ReLU()
        self.downsample = None
        if stride != 1 or cin != out:
            self.downsample = tnn.Sequential(tnn.Conv2d(cin, out, 1, stride, bias=False), tnn.BatchNorm2d(out))

    def forward(self, x):
        h = self.relu(self.bn1(self.conv1(x)))
        h = self.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        return self.relu(h + (x if self.downsample is None else self.downsample(x)))


class BasicBlock(tnn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride, dilation):
        super().__init__()
        self.conv1 = tnn.Conv2d(cin, planes, 3, stride, dilation, dilation, bias=False)
        self.bn1 = tnn.BatchNorm2d(planes)
        self.conv2 = tnn.Conv2d(planes, planes, 3, 1, dilation, dilation, bias=False)
        self.bn2 = tnn.BatchNorm2d(planes)
        self.relu = tnn.ReLU()
        self.downsample = None
        if stride != 1 or cin != planes:
            self.downsample = tnn.Sequential(tnn.Conv2d(cin, planes, 1, stride, bias=False), tnn.BatchNorm2d(planes))

    def forward(self, x):
        h = self.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return self.relu(h + (x if self.downsample is None else self.downsample(x)))


def _bilinear_fill(weight):
    k = weight.shape[2]
    f = math.ceil(k / 2)
    c = (2 * f - 1 - f % 2) / (2.0 * f)
    with torch.no_grad():
        for i in range(k):
            for j in range(k):
                weight[:, 0, i, j] = (1 - abs(i / f - c)) * (1 - abs(j / f - c))


class TorchDRNSeg(tnn.Module):
    def __init__(self, channels, depths, classes, block=Bottleneck):
        super().__init__()
        layers = [tnn.Sequential(tnn.Conv2d(3, channels[0], 7, 1, 3, bias=False), tnn.BatchNorm2d(channels[0]),
                                 tnn.ReLU())]
        cin = channels[0]
        for i, (c, n) in enumerate(zip(channels, depths)):
            if i in (2, 3, 4, 5):
                blocks = []
                for j in range(n):
                    blocks.append(block(cin, c, STRIDES[i] if j == 0 else 1, DILATIONS[i]))
                    cin = c * block.expansion
                layers.append(tnn.Sequential(*blocks))
            else:
                layers.append(_conv_layers(cin, c, n, STRIDES[i], DILATIONS[i]))
                cin = c
        self.base = tnn.Sequential(*layers)
        self.seg = tnn.Conv2d(cin, classes, 1, bias=True)
        self.up = tnn.ConvTranspose2d(classes, classes, 16, stride=8, padding=4, groups=classes, bias=False)
        _bilinear_fill(self.up.weight.data)
        self.up.weight.requires_grad = False

    def stages(self, x):
        outs = []
        for i, layer in enumerate(self.base):
            x = layer(x)
            if i > 0:
                outs.append(x)
        return outs

    def forward(self, x):
        """Logits at the input size (DRNSeg returns LogSoftmax of these and the coarse map)."""
        return self.up(self.seg(self.base(x)))


def randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "up.weight":
                continue
            if p.ndim == 4:
                fan_in = p.shape[1] * p.shape[2] * p.shape[3]
                p.copy_(torch.randn(p.shape, generator=g) * math.sqrt(2.0 / fan_in))
            elif name.endswith("weight"):  # BatchNorm scale
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.3 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + 1.5 * torch.rand(b.shape, generator=g))
            elif name.endswith("num_batches_tracked"):
                b.fill_(int(torch.randint(0, 10000, (), generator=g)))
    return model.eval()


def write_drn_file(path, channels, depths, classes, seed=0):
    """A random DRNSeg saved as its state dict (what `--pretrained` files hold) at `path`."""
    torch.manual_seed(seed)
    model = randomize(TorchDRNSeg(channels, depths, classes), seed).eval()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(model.state_dict(), path)
    return path
