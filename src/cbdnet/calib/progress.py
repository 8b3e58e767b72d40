"""Progress of the calibration stages on standard error: which stage, which layer.

A bar is drawn only where progress is wanted and standard error is a terminal (tqdm's ``disable=None``), so
``--json -`` and redirected runs get no progress output.
"""

from __future__ import annotations

from tqdm.auto import tqdm

__all__ = ["stage_bar"]


def stage_bar(total: int, stage: str, enabled: bool) -> tqdm:
    """A bar of ``total`` layers for ``stage`` (use as a context manager; ``set_postfix_str`` names the layer)."""
    return tqdm(total=total, desc=stage, unit="layer", disable=None if enabled else True, leave=False)
