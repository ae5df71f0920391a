"""The checkpoint windows of the local temperature (numpy only: the CLI's check uses them
before anything is measured; ``estimators.displacement`` estimates on them)."""

from __future__ import annotations

import numpy as np


def checkpoint_windows(n: int, window: int, min_window: int | None = None):
    """(start, end) checkpoint indices of the window that estimates each checkpoint's value.

    ``min_window`` None: the trailing window ``[t - window, t]`` (start = -1 before the series
    has ``window`` intervals). Otherwise centred windows that shrink near the ends:
    ``[t - min(h, t), t + min(window - h, n - 1 - t)]`` with h = window // 2, widened on the
    open side to ``min_window`` intervals where an end cuts it shorter; start = -1 when the
    series has fewer than ``min_window + 1`` checkpoints. Near the ends the window has fewer
    intervals and lags, so its error is larger (honestly: the GLS error counts the pairs).
    Width never exceeds ``window`` intervals, so every pair is within the measured band.
    """
    t = np.arange(n)
    if min_window is None:
        start = np.where(t >= window, t - window, -1)
        return start, t.copy()
    half = window // 2
    start = t - np.minimum(half, t)
    end = t + np.minimum(window - half, n - 1 - t)
    short = np.maximum(min_window - (end - start), 0)
    end = np.minimum(end + short, n - 1)
    start = np.maximum(start - np.maximum(min_window - (end - start), 0), 0)
    few = (end - start) < min_window
    return np.where(few, -1, start), np.where(few, -1, end)


# the momentum offset may take at most this share of the smallest checkpoint spacing: beyond,
# the first lags carry too little diffusion for the offset correction to be stable
MAX_OFFSET_SHARE = 0.25


def spacing_refusal(steps, offset: float) -> str:
    """Why checkpoints at ``steps`` are too close for a momentum offset of ``offset`` steps
    ('' when they are not). Shared by the thermo relation and ``thermoscope check``'s forecast
    (METHODS.md 3b)."""
    gaps = np.diff(np.asarray(steps, dtype=np.int64))
    if gaps.size and offset > MAX_OFFSET_SHARE * gaps.min():
        return (
            f"checkpoints {int(gaps.min())} steps apart: momentum shortens the displacement by "
            f"{offset:.1f} steps, too much of the first lag (save at least every "
            f"{int(np.ceil(offset / MAX_OFFSET_SHARE))} steps)"
        )
    return ""
