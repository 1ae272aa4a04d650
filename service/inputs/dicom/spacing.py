"""Whether the slices of a series make one regular volume: a pure check on their positions along the normal.

A series is stacked into one volume and segmented slice by slice, with a volume consistency check and a NIfTI or
SEG output that assume evenly spaced slices. Positions that repeat (several phases, echoes or acquisitions at one
place: a 4D series), a step that jumps (a missing slice) or wanders (irregular spacing) would be stacked as if
they were regular and silently misplace every slice after the fault, so each is refused with what was found.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from service.errors import InvalidImage

# Positions closer than this (mm) are the same position.
SAME_POSITION_MM = 1e-3


def check_positions(along: Sequence[float], tolerance: float) -> float | None:
    """The median step of sorted positions ``along`` the normal (mm), after refusing a series that is not one
    regular volume; ``tolerance``: how far (relative) a step may stray from the median. None for one slice."""
    values = np.sort(np.asarray(along, dtype=np.float64))
    if len(values) < 2:
        return None
    steps = np.diff(values)
    distinct = int((steps > SAME_POSITION_MM).sum()) + 1
    if distinct < len(values):
        per = len(values) / distinct
        detail = f"{per:g} per position" if float(per).is_integer() else "some positions repeated"
        raise InvalidImage(
            f"the series has {len(values)} slices at {distinct} positions ({detail}): several phases, echoes or "
            "acquisitions in one series (4D); send each as its own series"
        )
    median = float(np.median(steps))
    worst = int(np.argmax(np.abs(steps - median)))
    if abs(steps[worst] - median) > tolerance * median:
        where = f"between slices {worst + 1} and {worst + 2} of {len(values)} (at {values[worst]:.2f} and "
        where += f"{values[worst + 1]:.2f} mm along the normal)"
        ratio = steps[worst] / median
        if ratio > 1.5 and abs(ratio - round(ratio)) <= tolerance:
            missing = round(ratio) - 1
            raise InvalidImage(
                f"the series is missing {missing} slice{'s' if missing > 1 else ''}: a {steps[worst]:.2f} mm gap "
                f"{where} where it steps {median:.2f} mm"
            )
        raise InvalidImage(
            f"the series is irregularly spaced: a {steps[worst]:.2f} mm step {where} where it steps "
            f"{median:.2f} mm (more than {tolerance:.0%} apart)"
        )
    return median
