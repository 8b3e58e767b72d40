"""A user's own model code, for ``--arch user_models:tiny_net`` in the CLI tests (tests/ is on sys.path)."""

from torch import nn


def tiny_net(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))


class _DetectorLike(nn.Module):
    """Returns a list of per-image dicts, as torchvision's detectors (ssd300) do: not exportable as one tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x):
        scores = self.conv(x).flatten(1)
        return [{"scores": s, "labels": s.argmax(0, keepdim=True)} for s in scores]


def detector_like() -> nn.Module:
    return _DetectorLike()
