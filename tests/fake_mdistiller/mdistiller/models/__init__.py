"""Double of ``mdistiller/models``: the model registries, with tiny networks under the real names.

Like mdistiller's models, each returns ``(logits, feats)`` and names its last layer as the real one does:
``fc`` (CIFAR ResNets and WRNs, ImageNet ResNets and MobileNetV1), ``classifier`` (VGG), ``classifier``
as an ``nn.Sequential`` ending in the Linear (MobileNetV2), ``linear`` (ShuffleNets, CIFAR ResNet50).
``cifar_model_dict`` maps a name to ``(constructor, teacher checkpoint path or None)``.
"""

import os

import torch
from torch import nn

# As in mdistiller: teacher checkpoints under the checkout's download_ckpts/, found from this file.
_TEACHERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../download_ckpts/cifar_teachers/")


class _TinyNet(nn.Module):
    def __init__(self, head_name, width, num_classes=100, sequential_head=False):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, kernel_size=3, stride=4, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
        )
        head = nn.Linear(width, num_classes)
        self.head_name = head_name
        setattr(self, head_name, nn.Sequential(head) if sequential_head else head)

    def forward(self, x):
        pooled = torch.flatten(self.body(x), 1)
        logits = getattr(self, self.head_name)(pooled)
        return logits, {"feats": [pooled], "pooled_feat": pooled}


def _cifar(head_name, width, sequential_head=False):
    def build(num_classes=100):
        return _TinyNet(head_name, width, num_classes, sequential_head)

    return build


def _imagenet(head_name, width):
    def build(pretrained=False, **kwargs):
        return _TinyNet(head_name, width, kwargs.get("num_classes", 1000))

    return build


cifar_model_dict = {
    # teachers (mdistiller: checkpoint paths under download_ckpts/)
    "resnet56": (_cifar("fc", 16), _TEACHERS + "resnet56_vanilla/ckpt_epoch_240.pth"),
    "resnet110": (_cifar("fc", 16), _TEACHERS + "resnet110_vanilla/ckpt_epoch_240.pth"),
    "resnet32x4": (_cifar("fc", 16), _TEACHERS + "resnet32x4_vanilla/ckpt_epoch_240.pth"),
    "ResNet50": (_cifar("linear", 16), _TEACHERS + "ResNet50_vanilla/ckpt_epoch_240.pth"),
    "wrn_40_2": (_cifar("fc", 16), _TEACHERS + "wrn_40_2_vanilla/ckpt_epoch_240.pth"),
    "vgg13": (_cifar("classifier", 16), _TEACHERS + "vgg13_vanilla/ckpt_epoch_240.pth"),
    # students
    "resnet20": (_cifar("fc", 8), None),
    "resnet32": (_cifar("fc", 8), None),
    "resnet8x4": (_cifar("fc", 8), None),
    "ResNet18": (_cifar("linear", 8), None),
    "wrn_16_2": (_cifar("fc", 8), None),
    "wrn_40_1": (_cifar("fc", 8), None),
    "vgg8": (_cifar("classifier", 8), None),
    "MobileNetV2": (_cifar("classifier", 8, sequential_head=True), None),
    "ShuffleV1": (_cifar("linear", 8), None),
    "ShuffleV2": (_cifar("linear", 8), None),
}

imagenet_model_dict = {
    "ResNet18": _imagenet("fc", 8),
    "ResNet34": _imagenet("fc", 16),
    "ResNet50": _imagenet("fc", 16),
    "MobileNetV1": _imagenet("fc", 8),
}
