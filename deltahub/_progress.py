"""Progress bars for long loops, on stderr (huggingface_hub's ``tqdm``, see :mod:`deltahub.utils.tqdm`).

They are off when ``enabled`` is False, or, with ``enabled=None``, when ``HF_HUB_DISABLE_PROGRESS_BARS``
or ``DELTAHUB_DISABLE_PROGRESS_BARS`` is set or ``huggingface_hub.utils.disable_progress_bars()`` was called.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator


def progress_enabled(enabled: bool | None) -> bool:
    """``None`` means: on unless progress bars were switched off (environment or ``disable_progress_bars``)."""
    if enabled is None:
        from .utils.tqdm import are_progress_bars_disabled

        return not are_progress_bars_disabled()
    return enabled


@contextlib.contextmanager
def progress_bar(description: str, total: int, *, enabled: bool | None = None, unit: str = "bytes") -> Iterator[Callable[..., None]]:
    """Yield ``advance(n, description=None)``; ``unit='bytes'`` shows sizes and throughput."""
    if not progress_enabled(enabled):
        yield lambda n=1, description=None: None
        return
    from .utils.tqdm import PROGRESS_GROUP, tqdm

    kwargs = {"unit": "B", "unit_scale": True, "unit_divisor": 1000} if unit == "bytes" else {"unit": unit if unit != "items" else "it"}
    # enabled=True is explicit: show the bar even where the group is switched off.
    bar = tqdm(total=total, desc=description, name=None if enabled else PROGRESS_GROUP, dynamic_ncols=True, **kwargs)
    try:
        def advance(n: int = 1, description: str | None = None) -> None:
            if description:
                bar.set_description_str(description, refresh=False)
            bar.update(n)

        yield advance
    finally:
        bar.close()
