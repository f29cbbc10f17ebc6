"""Rich progress bars for long loops, on stderr, off when ``enabled`` is False or output is not wanted."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

_console = Console(stderr=True)


def progress_enabled(enabled: bool | None) -> bool:
    """``None`` means: on unless ``DELTAHUB_DISABLE_PROGRESS_BARS`` is set (like huggingface_hub's switch)."""
    if enabled is None:
        return not os.environ.get("DELTAHUB_DISABLE_PROGRESS_BARS")
    return enabled


@contextlib.contextmanager
def progress_bar(description: str, total: int, *, enabled: bool | None = None, unit: str = "bytes") -> Iterator[Callable[..., None]]:
    """Yield ``advance(n, description=None)``; ``unit='bytes'`` shows sizes and throughput."""
    if not progress_enabled(enabled):
        yield lambda n=1, description=None: None
        return
    if unit == "bytes":
        columns = [TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    else:
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=_console, transient=False) as prog:
        task = prog.add_task(description, total=total)

        def advance(n: int = 1, description: str | None = None) -> None:
            prog.update(task, advance=n, **({"description": description} if description else {}))

        yield advance
