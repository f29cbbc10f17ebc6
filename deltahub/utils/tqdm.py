"""Progress bars: huggingface_hub's ``tqdm``, so one switch turns off the Hub's bars and deltahub's alike.

deltahub's bars belong to the group ``"deltahub"`` (:data:`PROGRESS_GROUP`). They are off when

* ``HF_HUB_DISABLE_PROGRESS_BARS=1`` is set (huggingface_hub's switch; it has priority), or
* ``DELTAHUB_DISABLE_PROGRESS_BARS`` is set (deltahub's own switch), or
* :func:`disable_progress_bars` was called, globally (``name=None``, as ``deltahub -q`` does for
  the duration of a command) or for the ``"deltahub"`` group.
"""

from __future__ import annotations

import os

from huggingface_hub.utils import are_progress_bars_disabled as _hf_disabled
from huggingface_hub.utils import disable_progress_bars, enable_progress_bars, tqdm

__all__ = ["PROGRESS_GROUP", "are_progress_bars_disabled", "disable_progress_bars", "enable_progress_bars", "tqdm"]

#: The huggingface_hub progress-bar group of deltahub's own bars.
PROGRESS_GROUP = "deltahub"
#: deltahub's own environment switch (any non-empty value other than 0/false/no disables the bars).
ENV_VAR = "DELTAHUB_DISABLE_PROGRESS_BARS"


def are_progress_bars_disabled(name: str | None = PROGRESS_GROUP) -> bool:
    """True when deltahub's bars (or the group ``name``) should not be shown."""
    env = os.environ.get(ENV_VAR, "").strip().lower()
    if env and env not in ("0", "false", "no", "off"):
        return True
    return _hf_disabled(name)
