"""A PyTorch re-statement of mit_semseg's `Resnet` encoder and `UPerNet` decoder (CSAIL's semantic segmentation
project), written for the tests from the architecture (not copied): deep stem, bottleneck stages, PPM
(pool -> resize -> 1x1 conv), FPN, fusion. Its module names give exactly mit_semseg's state_dict keys.
"""

import os

import torch
import torch.nn.functional as F
from torch import nn as tnn


MOMENTUM = 0.001  # mit_semseg's SynchronizedBatchNorm2d default


def _bn(c):
    return tnn.BatchNorm2d(c, eps=1e-5, momentum=MOMENTUM)


def _cbr(cin, cout, k, stride=1):
    return tnn.Sequential(tnn.Conv2d(cin, cout, k, stride, k // 2, bias=False), _bn(cout), tnn.ReLU())


class Block(tnn.Module):
    def __init__(self, cin, width, stride):
        super().__init__()
        mid = width // 4
        self.conv1, self.bn1 = tnn.Conv2d(cin, mid, 1, bias=False), _bn(mid)
        self.conv2, self.bn2 = tnn.Conv2d(mid, mid, 3, stride, 1, bias=False), _bn(mid)
        self.conv3, self.bn3 = tnn.Conv2d(mid, width, 1, bias=False), _bn(width)
        self.relu = tnn.ReLU()
        self.downsample = None
        if stride != 1 or cin != width:
            self.downsample = tnn.Sequential(tnn.Conv2d(cin, width, 1, stride, bias=False), _bn(width))

    def forward(self, x):
        h = self.relu(self.bn1(self.conv1(x)))
        h = self.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        return self.relu(h + (x if self.downsample is None else self.downsample(x)))


class Encoder(tnn.Module):
    def __init__(self, stem, widths, depths):
        super().__init__()
        self.num_stem, self.num_stages = len(stem), len(widths)
        cin = 3
        for k, c in enumerate(stem, 1):
            setattr(self, f"conv{k}", tnn.Conv2d(cin, c, 3, 2 if k == 1 else 1, 1, bias=False))
            setattr(self, f"bn{k}", _bn(c))
            setattr(self, f"relu{k}", tnn.ReLU())
            cin = c
        self.maxpool = tnn.MaxPool2d(3, 2, 1)
        for i, (w, d) in enumerate(zip(widths, depths), 1):
            blocks = []
            for j in range(d):
                blocks.append(Block(cin, w, 2 if (i > 1 and j == 0) else 1))
                cin = w
            setattr(self, f"layer{i}", tnn.Sequential(*blocks))

    def forward(self, x):
        for k in range(1, self.num_stem + 1):
            x = getattr(self, f"relu{k}")(getattr(self, f"bn{k}")(getattr(self, f"conv{k}")(x)))
        x = self.maxpool(x)
        feats = []
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{i}")(x)
            feats.append(x)
        return feats


class Decoder(tnn.Module):
    def __init__(self, widths, fpn, ppm, num_classes, pool_scales=(1, 2, 3, 6)):
        super().__init__()
        top = widths[-1]
        self.ppm_pooling = tnn.ModuleList([tnn.AdaptiveAvgPool2d(s) for s in pool_scales])
        self.ppm_conv = tnn.ModuleList([_cbr(top, ppm, 1) for _ in pool_scales])
        self.ppm_last_conv = _cbr(top + len(pool_scales) * ppm, fpn, 3)
        self.fpn_in = tnn.ModuleList([_cbr(c, fpn, 1) for c in widths[:-1]])
        self.fpn_out = tnn.ModuleList([tnn.Sequential(_cbr(fpn, fpn, 3)) for _ in widths[:-1]])
        self.conv_last = tnn.Sequential(_cbr(len(widths) * fpn, fpn, 3), tnn.Conv2d(fpn, num_classes, 1))

    def forward(self, feats, size):
        """Logits resized to `size` (mit_semseg's inference path, before its softmax)."""
        top = feats[-1]
        up = lambda t, s: F.interpolate(t, size=s, mode="bilinear", align_corners=False)  # noqa: E731
        ppm = [top] + [conv(up(pool(top), top.shape[2:])) for pool, conv in zip(self.ppm_pooling, self.ppm_conv)]
        f = self.ppm_last_conv(torch.cat(ppm, 1))
        levels = [f]
        for i in reversed(range(len(feats) - 1)):
            lateral = self.fpn_in[i](feats[i])
            f = lateral + up(f, lateral.shape[2:])
            levels.insert(0, self.fpn_out[i](f))
        fused = torch.cat([levels[0]] + [up(x, levels[0].shape[2:]) for x in levels[1:]], 1)
        return up(self.conv_last(fused), size)


def randomize(*modules, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for m in module.modules():
                if isinstance(m, tnn.Conv2d):
                    m.weight.normal_(0.0, (2.0 / m.weight[0].numel()) ** 0.5)
                    if m.bias is not None:
                        m.bias.normal_(0.0, 0.2)
                elif isinstance(m, tnn.BatchNorm2d):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0.0, 0.2)
                    m.running_mean.normal_(0.0, 0.2)
                    m.running_var.uniform_(0.5, 2.0)
                    m.num_batches_tracked.fill_(int(torch.randint(0, 1000, ())))


def write_csail_files(directory, num_classes, stem, widths, depths, fpn, ppm, seed=0):
    """encoder_epoch_50.pth and decoder_epoch_50.pth of a random network (eval mode) in `directory`; their paths."""
    enc, dec = Encoder(stem, widths, depths), Decoder(widths, fpn, ppm, num_classes)
    randomize(enc, dec, seed=seed)
    os.makedirs(directory, exist_ok=True)
    paths = os.path.join(directory, "encoder_epoch_50.pth"), os.path.join(directory, "decoder_epoch_50.pth")
    torch.save(enc.eval().state_dict(), paths[0])
    torch.save(dec.eval().state_dict(), paths[1])
    return paths
