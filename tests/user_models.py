"""A user's own model code, for ``--arch user_models:tiny_net`` in the CLI tests (tests/ is on sys.path)."""

from torch import nn


def tiny_net(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))
