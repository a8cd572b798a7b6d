"""Encoders that fit both 8-28 px CPU experiments and 32-96 px GPU runs.

Every backbone maps ``[B, C, H, W]`` to a pooled feature ``[B, feature_dim]``; heads live in
``heads.py`` so a method can attach a projection, a predictor or prototypes without touching it.
Every backbone ``build_backbone`` returns also carries a ``recipe`` (``methods.encoders.recipes``): how to
build the same module without protoray, which ``protoray export`` writes beside the weights.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torchvision

from methods.encoders.recipes import build, protoray_recipe, resnet_recipe
from methods.encoders.timm_backbones import PREFIX as TIMM_PREFIX
from methods.encoders.timm_backbones import check_timm_name, timm_backbone

BACKBONES = ("convnet", "convnet_wide", "convnet_1024", "convnet_wide_1024", "convnet_wide_signed",
             "resnet18", "resnet50", "vit_tiny")


def _conv_block(cin: int, cout: int, pool: bool, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                               nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class ConvNet(nn.Module):
    """Four 3x3 conv blocks (32..256 channels), the default for 2-core CPU training.

    Sized for short Fashion-MNIST epochs on 2 cores (seconds per epoch: benchmarks/RESULTS.md);
    the last block does not pool so 8x8 digits still have a 1x1 map left.
    """

    def __init__(self, in_channels: int = 1, widths: tuple[int, ...] = (32, 64, 128, 256),
                 final_relu: bool = True):
        super().__init__()
        chans = (in_channels, *widths)
        last = len(widths) - 1
        self.stages = nn.ModuleList(
            _conv_block(chans[i], chans[i + 1], pool=i < last, relu=final_relu or i < last)
            for i in range(len(widths))
        )
        self.feature_dim = widths[-1]
        # channels_last weights and inputs (NHWC): oneDNN's NCHW max-pool is much slower on CPU
        # than its NHWC one, and the convolutions gain too (benchmarks/RESULTS.md, channels-last).
        # Converting only the input is not enough: a 1-channel image is NCHW and NHWC at once, so
        # the weights decide.
        self.to(memory_format=torch.channels_last)

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every stage's feature map, for multi-exit methods (SelfCon)."""
        maps = []
        x = x.contiguous(memory_format=torch.channels_last)
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_stages(x)[-1].mean(dim=(2, 3))


def _resnet(name: str, in_channels: int, small_images: bool) -> nn.Module:
    """torchvision ResNet without its classifier; for small images a 3x3 stride-1 stem and no
    max-pool (as SimCLR's CIFAR variant), so a 32 px input is not shrunk to 8 px in two layers.
    The replacements are ``methods.recipes.resnet_recipe``'s, in the order they always ran."""
    recipe = resnet_recipe(name, in_channels, small_images)
    net = build(recipe)
    net.feature_dim = net.layer4[-1].conv1.in_channels  # what fc read: 512 (18), 2048 (50)
    net.recipe = recipe
    return net


def small_vit(in_channels: int, image_size: int) -> nn.Module:
    """A ViT for small images (MoCo v3's ViT option, scaled down): torchvision's
    VisionTransformer with 4 px patches up to 32 px inputs (image_size / 8 above), 4 layers,
    3 heads, width 192 (ViT-Tiny's). The class token is the feature. Inputs must be exactly
    ``image_size`` square, so multi-crop's smaller views do not fit it."""
    patch = 4 if image_size <= 32 else image_size // 8
    if image_size % patch:
        raise ValueError(f"vit_tiny needs an image size divisible by its {patch} px patches, "
                         f"got {image_size}")
    net = torchvision.models.VisionTransformer(image_size=image_size, patch_size=patch,
                                               num_layers=4, num_heads=3, hidden_dim=192,
                                               mlp_dim=768)
    net.conv_proj = nn.Conv2d(in_channels, 192, kernel_size=patch, stride=patch)
    net.heads = nn.Identity()
    net.feature_dim = 192
    return net


def check_backbone_name(name: str) -> str:
    """``name`` if ``build_backbone`` knows it: one of ``BACKBONES`` or ``timm/<a timm model>``;
    else ``ValueError`` saying what is accepted."""
    if name.startswith(TIMM_PREFIX):
        check_timm_name(name[len(TIMM_PREFIX):])
    elif name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)} or "
                         f"{TIMM_PREFIX}<a timm model name>")
    return name


def build_backbone(name: str, in_channels: int, image_size: int) -> nn.Module:
    """A backbone with ``feature_dim`` and ``recipe`` attributes. ResNets (torchvision's and
    timm's) switch to the small-image stem below 64 px; ``timm/<name>``: see
    ``methods.encoders.timm_backbones``. ``ValueError`` for an unknown name."""
    if name.startswith(TIMM_PREFIX):
        return timm_backbone(name[len(TIMM_PREFIX):], in_channels, image_size)
    if name in ("resnet18", "resnet50"):
        return _resnet(name, in_channels, small_images=image_size < 64)
    net = _own_backbone(name, in_channels, image_size)
    net.recipe = protoray_recipe(name, in_channels, image_size)
    return net


def _own_backbone(name: str, in_channels: int, image_size: int) -> nn.Module:
    if name == "convnet":
        return ConvNet(in_channels)
    if name == "convnet_wide":  # twice the channels (64..512), about 4x the FLOPs
        return ConvNet(in_channels, widths=(64, 128, 256, 512))
    if name == "convnet_1024":
        # The default net with a 1024-channel last block: a larger feature for the linear probe
        # at small cost, the block running on a 3x3 map at 28 px. With PCL its linear gain over
        # ``convnet`` is large at equal epochs and shrinks at equal training time, as each epoch
        # costs more (benchmarks/RESULTS.md: four-epoch screens, round 4; P11).
        return ConvNet(in_channels, widths=(32, 64, 128, 1024))
    if name == "convnet_wide_1024":
        # The wide net with a 1024-channel last block, for the linear probe: on 20 px views that
        # block runs on a 2x2 map, so a bf16 step costs about the same as ``convnet_wide``'s. With
        # PCL at lr 0.3 it gives a better linear probe than the 512-channel block in the same hour
        # (benchmarks/RESULTS.md: PCL against the target; the step times under design choices).
        return ConvNet(in_channels, widths=(64, 128, 256, 1024))
    if name == "convnet_wide_signed":
        # The wide net without the last ReLU, so the pooled feature is signed. After ReLU every
        # feature lies in the positive orthant: PCL's features sat in a narrow cone, which flattens
        # the k=200 kNN vote (centring them at evaluation helped a little). Signed, the cone
        # widens but kNN does not move, as the share of same-class neighbours does not change
        # (benchmarks/RESULTS.md: PCL evaluation-side checks, V14).
        return ConvNet(in_channels, widths=(64, 128, 256, 512), final_relu=False)
    if name == "vit_tiny":
        return small_vit(in_channels, image_size)
    check_backbone_name(name)
    raise AssertionError(f"{name} is in BACKBONES but not built")  # unreachable for valid names


def fresh_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s architecture with newly initialised weights (not shared, not equal)."""
    out = copy.deepcopy(module)
    for m in out.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return out


def backbone_stages(backbone: nn.Module) -> list[nn.Module]:
    """The backbone as four sequential stages (pooling excluded), for multi-exit wrappers."""
    if isinstance(backbone, ConvNet):
        return list(backbone.stages)
    if isinstance(backbone, torchvision.models.ResNet):
        stem = nn.Sequential(backbone.conv1, backbone.bn1, backbone.relu, backbone.maxpool,
                             backbone.layer1)
        return [stem, backbone.layer2, backbone.layer3, backbone.layer4]
    raise ValueError(f"no stage split known for {type(backbone).__name__}")


class MultiExit(nn.Module):
    """A backbone with a second exit (SelfCon, Bae et al. 2021, arXiv 2106.15499, sec. 3).

    The sub-network branches after stage ``branch_after`` (1-based; the paper's default is after
    the second of four). ``sub_network="fc"`` pools the branch's map and maps it with one linear
    layer to the backbone's feature size (the authors' CIFAR setting); ``"same"`` runs fresh,
    unshared copies of the remaining stages (their ImageNet setting). ``forward`` returns
    ``(backbone_feature, sub_feature)``, both ``[B, feature_dim]``, from one backbone pass.
    """

    def __init__(self, backbone: nn.Module, branch_after: int = 2, sub_network: str = "fc"):
        super().__init__()
        stages = backbone_stages(backbone)
        if not 1 <= branch_after < len(stages):
            raise ValueError(f"method.branch_after must be in 1..{len(stages) - 1} (a stage after "
                             f"which a sub-network can branch), got {branch_after}")
        self.backbone = backbone
        self.trunk = nn.Sequential(*stages[:branch_after])
        self.rest = nn.Sequential(*stages[branch_after:])
        self.feature_dim = backbone.feature_dim
        if sub_network == "fc":
            branch_channels = [m for m in self.trunk.modules() if isinstance(m, nn.Conv2d)][-1].out_channels
            self.sub = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                     nn.Linear(branch_channels, self.feature_dim))
        elif sub_network == "same":
            self.sub = nn.Sequential(fresh_copy(self.rest), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        else:
            raise ValueError(f"method.sub_network must be 'fc' or 'same', got {sub_network!r}")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mid = self.trunk(x)
        return self.rest(mid).mean(dim=(2, 3)), self.sub(mid)



def with_in_channels(backbone: nn.Module, in_channels: int) -> nn.Module:
    """``backbone`` with its first convolution replaced by a fresh one reading ``in_channels``
    (CMC's encoders for the L and ab views); unchanged if it already reads that many."""
    for parent in backbone.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                if child.in_channels != in_channels:
                    setattr(parent, name, nn.Conv2d(in_channels, child.out_channels, child.kernel_size,
                                                    child.stride, child.padding,
                                                    bias=child.bias is not None))
                return backbone
    raise ValueError(f"{type(backbone).__name__} has no convolution to adapt")
