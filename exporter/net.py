"""ResNet18 box regressor with a spatial head.

A plain pooled ResNet18 regressor loses where things are; here a small
feature pyramid brings layer4 context down to stride 8, and each of the 8
box coordinates is read from its own heatmap by soft-argmax (the expected x
or y under a softmax over positions).  During training a second 1x1 head
predicts heart and lung masks from the same features (dense supervision);
it is not part of the exported graph.  Input normalization is a buffer of
the module, so the ONNX graph carries it and the runtime never repeats it.

With ``mask_head=True`` a small decoder (:class:`MaskDecoder`) brings the pyramid to stride 4
with layer1's features and predicts three masks (heart, right lung, left lung) that *are*
exported: the model's optional ``masks`` output, which the runtime measures from
(:mod:`heartbatch.masks`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18

COORDS = 8  # heart x0 y0 x1 y1, thorax x0 y0 x1 y1
LAYER4_DIMS = 512  # channels of ResNet18's last stage: the pooled features the content check reads


def _conv_bn(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


MASK_CHANNELS = 3  # heart, right lung, left lung (heartbatch.masks)
DECODER_WIDTH = 48


class MaskDecoder(nn.Module):
    """Stride-8 pyramid features + stride-4 layer1 features -> mask logits at stride 4.

    Narrow (48 channels) because its two 3x3 convolutions run on 56 x 56 positions at 224 px,
    where each channel costs as much as four in the pyramid: about 8 % of the backbone's work.
    """

    def __init__(self, width: int, skip: int = 64, channels: int = MASK_CHANNELS, inner: int = DECODER_WIDTH):
        super().__init__()
        self.reduce = nn.Conv2d(width, inner, 1)
        self.skip = nn.Conv2d(skip, inner, 1)
        self.refine = nn.Sequential(_conv_bn(inner, inner), _conv_bn(inner, inner))
        self.logits = nn.Conv2d(inner, channels, 1)

    def forward(self, fused: torch.Tensor, c1: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(self.reduce(fused), size=c1.shape[-2:], mode="bilinear", align_corners=False)
        return self.logits(self.refine(up + self.skip(c1)))


class HeartBoxNet(nn.Module):
    def __init__(self, outputs: int = COORDS, mean: float = 0.5, std: float = 0.25,
                 width: int = 128, imagenet_weights: Path | None = None, mask_head: bool = False):
        super().__init__()
        backbone = resnet18(weights=None)
        if imagenet_weights is not None:
            backbone.load_state_dict(torch.load(imagenet_weights, map_location="cpu"))
        rgb = backbone.conv1.weight.data
        backbone.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
        if imagenet_weights is not None:  # greyscale = sum of the RGB filters
            backbone.conv1.weight.data = rgb.sum(1, keepdim=True)
        self.stem = nn.Sequential(backbone.conv1, backbone.bn1, backbone.relu, backbone.maxpool)
        self.layer1, self.layer2 = backbone.layer1, backbone.layer2
        self.layer3, self.layer4 = backbone.layer3, backbone.layer4
        self.lateral = nn.ModuleList([nn.Conv2d(c, width, 1) for c in (128, 256, 512)])
        self.fuse = nn.Sequential(_conv_bn(width, width), _conv_bn(width, width))
        self.heatmaps = nn.Conv2d(width, outputs, 1)
        self.segment = nn.Conv2d(width, 2, 1)
        self.decoder = MaskDecoder(width) if mask_head else None
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))
        self.outputs = outputs

    @property
    def has_masks(self) -> bool:
        return self.decoder is not None

    def pyramid(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(fused stride-8 features, layer1's stride-4 features)."""
        x = (x - self.mean) / self.std
        c1 = self.layer1(self.stem(x))
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        p = self.lateral[2](c4)
        p = self.lateral[1](c3) + F.interpolate(p, size=c3.shape[-2:], mode="nearest")
        p = self.lateral[0](c2) + F.interpolate(p, size=c2.shape[-2:], mode="nearest")
        return self.fuse(p), c1

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pyramid(x)[0]

    def soft_argmax(self, logits: torch.Tensor) -> torch.Tensor:
        n, c, h, w = logits.shape
        prob = torch.softmax(logits.reshape(n, c, h * w), -1).reshape(n, c, h, w)
        xs = (torch.arange(w, dtype=logits.dtype, device=logits.device) + 0.5) / w
        ys = (torch.arange(h, dtype=logits.dtype, device=logits.device) + 0.5) / h
        ex = (prob.sum(2) * xs).sum(-1)
        ey = (prob.sum(3) * ys).sum(-1)
        is_x = (torch.arange(c, device=logits.device) % 2 == 0).to(logits.dtype)
        return ex * is_x + ey * (1 - is_x)

    def forward_train(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(boxes, mask logits): the decoder's three masks at stride 4 with a mask head, else the
        training-only two masks (heart, lungs) at stride 8."""
        f, c1 = self.pyramid(x)
        masks = self.decoder(f, c1) if self.decoder is not None else self.segment(f)
        return self.soft_argmax(self.heatmaps(f)), masks

    def forward(self, x: torch.Tensor):
        """Boxes; with a mask head (boxes, mask probabilities), the exported outputs."""
        f, c1 = self.pyramid(x)
        boxes = self.soft_argmax(self.heatmaps(f))
        if self.decoder is None:
            return boxes
        return boxes, torch.sigmoid(self.decoder(f, c1))

    def mask_parameters(self) -> list[nn.Parameter]:
        """The decoder's weights: what ``--train-only masks`` trains."""
        return list(self.decoder.parameters()) if self.decoder is not None else []
