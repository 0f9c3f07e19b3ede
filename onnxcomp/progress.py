"""Progress bars for long steps (calibration, layer statistics, sensitivity sweeps, training epochs).

tqdm on stderr, shown only when stderr is a terminal and the user did not ask for quiet (`onnxcomp -q`), so logs,
pipes and CI stay clean. A caller that knows better passes `show=True / False`.
"""

from __future__ import annotations

import sys

from tqdm import tqdm

QUIET = {"value": False}  # set by the CLI's -q; a dict so that importers see the change


def bar(total: int, description: str, *, show: bool | None = None, unit: str = "it") -> tqdm:
    """A tqdm bar of `total` steps; update it with `.update(n)` and close it (or use it as a context manager)."""
    visible = (sys.stderr.isatty() and not QUIET["value"]) if show is None else show
    return tqdm(total=total, desc=description, unit=unit, file=sys.stderr, disable=not visible, leave=False,
                dynamic_ncols=True)


def each(items, description: str, *, show: bool | None = None, unit: str = "it"):
    """Iterate over `items` (a sized collection) with a bar."""
    with bar(len(items), description, show=show, unit=unit) as shown:
        for item in items:
            yield item
            shown.update(1)
