"""PyTorch ResNets with the reference implementation's ``state_dict`` layout, for the tests of
``gdreg.tools.convert_reference`` (needs torch; imported by tests that skip without it).

:class:`TorchResNet` is written for these tests, not taken from the authors' code: it builds the
network the reference's ``ResNet`` builds for the paper (``fullbatch/models/resnets.py`` with
``stem="CIFAR"``, ``downsample="C"``, ``norm="BatchNorm2d"``, ``nonlin="ReLU"``) and registers
its modules under the same names in the same order, so that its ``state_dict`` has their keys,
shapes and order: ``stem`` = (conv 3x3, BatchNorm, ReLU); ``layers`` = one Sequential per stage
of blocks with ``conv1``, ``bn1``, ``conv2``, ``bn2`` (and ``conv3``, ``bn3`` in bottlenecks),
``nonlin`` and ``downsample`` = (AvgPool2d, conv 1x1, BatchNorm) where the shape changes;
``avgpool``; ``fc``. Unlike theirs, it honours ``width`` (theirs always builds 64), so the
tests can use narrow networks. :func:`authors_resnet` builds the authors' own class where their
code is at hand (``AUTHORS_DIR``), to check the two against each other.

:func:`save_published` writes a model the way the reference's training loop checkpoints
(``_save_to_checkpoint``: ``[optimizer, model, scheduler, scaler, step]``).
"""

from __future__ import annotations

import builtins
import importlib
import math
import os
import sys
import types

import numpy as np
import torch
from torch import nn

STAGES = {18: ("basic", (2, 2, 2, 2)), 50: ("bottleneck", (3, 4, 6, 3))}
STAGES[152] = ("bottleneck", (3, 8, 36, 3))


class Block(nn.Module):
    """A basic block (two 3x3 convolutions) or a bottleneck (1x1, strided 3x3, 1x1 with four
    times the planes), each convolution followed by BatchNorm, the shortcut added before the
    last ReLU."""

    def __init__(self, inputs: int, planes: int, stride: int, bottleneck: bool) -> None:
        super().__init__()
        self.bottleneck = bottleneck
        outputs = planes * (4 if bottleneck else 1)
        if bottleneck:
            self.conv1 = nn.Conv2d(inputs, planes, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv3 = nn.Conv2d(planes, outputs, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(outputs)
        else:
            self.conv1 = nn.Conv2d(inputs, planes, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
        self.nonlin = nn.ReLU()
        self.downsample = None
        if stride != 1 or inputs != outputs:
            self.downsample = nn.Sequential(
                nn.AvgPool2d(stride, stride),
                nn.Conv2d(inputs, outputs, 1, bias=False),
                nn.BatchNorm2d(outputs),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.nonlin(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        if self.bottleneck:
            y = self.bn3(self.conv3(self.nonlin(y)))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.nonlin(y + shortcut)


class TorchResNet(nn.Module):
    """The reference's CIFAR ResNet-``depth`` (18, 50 or 152) at base width ``width``."""

    def __init__(self, depth: int, width: int = 64, classes: int = 10) -> None:
        super().__init__()
        kind, stages = STAGES[depth]
        bottleneck = kind == "bottleneck"
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        inputs, layers = width, []
        for index, count in enumerate(stages):
            planes = width * 2**index
            blocks = []
            for block in range(count):
                stride = 2 if index > 0 and block == 0 else 1
                blocks.append(Block(inputs, planes, stride, bottleneck))
                inputs = planes * (4 if bottleneck else 1)
            layers.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inputs, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.layers(self.stem(x))), 1))


def authors_resnet(depth: int, width: int = 64, classes: int = 10) -> nn.Module:
    """The authors' own ``ResNet`` (their ``fullbatch/models/resnets.py`` under
    ``$AUTHORS_DIR``) as their ``hubconf.py`` builds it, at base width ``width``.

    Only their ``resnets`` module and the two it imports are loaded (their package's
    ``__init__`` imports hydra, torchvision and more). Their code always builds width 64: it
    tests ``isinstance(block, BasicBlock)`` on the block *class*; for another width that test is
    answered as for an instance (and ``isinstance(block, Bottleneck)``, which scales a
    bottleneck's inner width by ``width / 64``, as False), which gives gdreg's narrow networks.
    """
    root = os.path.join(os.environ["AUTHORS_DIR"], "fullbatch")
    saved = {name: sys.modules.get(name) for name in ("fullbatch", "fullbatch.models")}
    try:
        for name, folder in (("fullbatch", root), ("fullbatch.models", f"{root}/models")):
            package = types.ModuleType(name)
            package.__path__ = [folder]
            sys.modules[name] = package
        resnets = importlib.import_module("fullbatch.models.resnets")
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    block, layers = resnets.resnet_depths_to_config(depth)
    if width != 64:
        classes_ = (resnets.BasicBlock, resnets.Bottleneck)

        def narrow_isinstance(obj, cls):
            if obj in classes_:
                return cls is resnets.BasicBlock
            return builtins.isinstance(obj, cls)

        resnets.isinstance = narrow_isinstance
    try:
        return resnets.ResNet(
            block,
            layers,
            channels=3,
            classes=classes,
            stem="CIFAR",
            convolution_type="Standard",
            nonlin="ReLU",
            norm="BatchNorm2d",
            downsample="C",
            width_per_group=width,
            zero_init_residual="skip-residual",
        )
    finally:
        if width != 64:
            del resnets.isinstance


def randomize(model: nn.Module, seed: int = 0, image_size: int = 8) -> torch.optim.SGD:
    """Random weights and BatchNorm statistics of a trained network, and an optimizer with
    momentum: random BatchNorm scales and offsets, two Nesterov SGD steps with the reference's
    optimizer settings (momentum buffers), then the running statistics of three train-mode
    passes over random images (their cumulative average, PyTorch's ``momentum=None``: eval
    mode then keeps the activations of a deep network in range, as a trained one does)."""
    generator = torch.Generator().manual_seed(seed)
    norms = [module for module in model.modules() if isinstance(module, nn.BatchNorm2d)]
    # The last BatchNorm of each residual branch scaled down (as trained ResNets tend to have
    # them, and as zero_init_residual starts them): each block stays near the identity, so the
    # rounding of one layer is not amplified through the 50 blocks of a ResNet-152.
    last = set()
    for module in model.modules():  # a block: its bn3 (bottleneck) or bn2 (basic block)
        norm = getattr(module, "bn3", None) or getattr(module, "bn2", None)
        if norm is not None:
            last.add(id(norm))
    with torch.no_grad():
        for module in norms:
            low, high = (0.1, 0.3) if id(module) in last else (0.5, 1.5)
            scale = torch.rand(module.weight.shape, generator=generator)
            module.weight.copy_(low + (high - low) * scale)
            module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=generator))
    model.train()
    images = torch.randn(16, 3, image_size, image_size, generator=generator)
    labels = torch.randint(0, model.fc.out_features, (16,), generator=generator)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=1e-3, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    for _ in range(2):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
    for module in norms:
        module.reset_running_stats()
        module.momentum = None
    with torch.no_grad():
        for _ in range(3):
            model(images + 0.5 * torch.randn(images.shape, generator=generator))
    for module in norms:
        module.momentum = 0.1
    model.eval()
    return optimizer


def save_published(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, path: str, step: int = 3000
) -> None:
    """Writes ``model`` as the reference's training loop checkpoints it: ``[optimizer state,
    model state, scheduler state, scaler state, step]``. The scheduler state is what their
    ``GradualWarmupScheduler`` (400 warmup steps) around ``CosineAnnealingLR(4000)`` holds after
    ``step`` steps at lr 0.8 (printed by their scheduler under torch 2.13: the warmup's own
    ``last_epoch`` stops at 401, the cosine's counts on from there)."""
    base = 0.8
    cosine = 0.5 * base * (1 + math.cos(math.pi * (step - 401) / 4000))
    common = {"base_lrs": [base], "_get_lr_called_within_step": False, "_last_lr": [cosine]}
    scheduler = {
        "multiplier": 1.0,
        "total_epoch": 400,
        "finished": True,
        "last_epoch": 401,
        "_step_count": 402,
        **common,
        "after_scheduler": {
            "T_max": 4000,
            "eta_min": 0.0,
            "last_epoch": step - 401,
            "_step_count": step - 400,
            **common,
        },
    }
    optimizer_state = None if optimizer is None else optimizer.state_dict()
    torch.save([optimizer_state, model.state_dict(), scheduler, None, step], path)


def nhwc(images: torch.Tensor) -> np.ndarray:
    """NCHW torch images as the NHWC numpy array gdreg takes."""
    return images.detach().numpy().transpose(0, 2, 3, 1)
