"""Progress reported by the sampler itself: progress(done, total) after each model call, in image positions
fixed so far (per sampling batch: a position counts when every sequence of the batch has its code there)."""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[int, int], None]


def progress_part(progress: Progress | None, before: int, total: int) -> Progress | None:
    """The progress of one part of a larger call (a sampling batch, a window): the part's own (done, _) is
    reported as (before + done, total), `before` the positions the parts before it fixed."""
    if progress is None:
        return None
    return lambda done, _: progress(before + done, total)
