"""Calibration activations: the inputs each ``nn.Linear`` of the base model sees on some text.

:func:`collect_activations` runs the base (float32, CPU) over calibration tokens with a forward
hook on every ``nn.Linear`` and keeps an even-stride subsample of at most ``max_rows`` input rows
per layer, keyed by the layer's weight name in the state dict (``<module>.weight``). Codecs that
need activations (DeltaDQ's ``group_size="auto"``) and ``--codec auto``'s output-error metric
read them through ``EncodeInput.calibration``. On disk it is one safetensors file (float32,
``[rows, in_features]`` per weight name) with ``{"format": "deltahub-calibration"}`` metadata.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import CorruptFileError, DeltaHubError, MissingFileError
from .format.io import SafetensorsFile, atomic_file, save_tensors

CALIBRATION_FORMAT = "deltahub-calibration"
#: Default cap of rows (tokens) kept per layer; DeltaDQ's group-size search uses at most 512 too.
DEFAULT_MAX_ROWS = 512
DEFAULT_MAX_TOKENS = 4096
DEFAULT_SEQ_LEN = 512

Tokens = Sequence[int] | Sequence[Sequence[int]] | torch.Tensor


def _token_stream(model_dir: str | Path, data: str | Sequence[str] | Tokens, tokenizer: Any) -> list[int]:
    """Texts (tokenized with the model's tokenizer) or token ids, concatenated into one stream."""
    if isinstance(data, torch.Tensor):
        return [int(t) for t in data.reshape(-1).tolist()]
    if isinstance(data, str):
        data = [data]
    items = list(data)
    if not items:
        return []
    if all(isinstance(t, int) for t in items):
        return [int(t) for t in items]
    if all(isinstance(t, (list, tuple)) for t in items):
        return [int(t) for seq in items for t in seq]
    if not all(isinstance(t, str) for t in items):
        raise DeltaHubError("calibration data must be texts or token ids")
    if tokenizer is None:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        except (OSError, ValueError) as exc:
            raise MissingFileError(f"cannot load a tokenizer to tokenize calibration text ({exc}); pass token ids",
                                   path=model_dir) from None
    out: list[int] = []
    for text in items:
        out.extend(tokenizer(text)["input_ids"])
    return out


def collect_activations(model_dir: str | Path, data: str | Sequence[str] | Tokens, *, max_tokens: int = DEFAULT_MAX_TOKENS,
                        max_rows: int = DEFAULT_MAX_ROWS, seq_len: int = DEFAULT_SEQ_LEN, tokenizer: Any = None,
                        ) -> dict[str, torch.Tensor]:
    """Inputs of every ``nn.Linear`` of the model at ``model_dir`` on ``data``: ``{"<module>.weight": [rows, in]}``.

    ``data`` is a text, a list of texts (tokenized with the model's tokenizer, or ``tokenizer``)
    or token ids (a list, a list of lists, or a tensor); everything is concatenated into one
    stream, cut to ``max_tokens`` and run in windows of ``seq_len`` tokens. Each layer keeps the
    input rows of ``min(tokens, max_rows)`` evenly spread token positions (``i * tokens // max_rows``).
    """
    from transformers import AutoModelForCausalLM

    for key, val in (("max_tokens", max_tokens), ("max_rows", max_rows), ("seq_len", seq_len)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise DeltaHubError(f"calibration: {key}={val!r} must be an integer >= 1")
    if not (Path(model_dir) / "config.json").is_file():
        raise MissingFileError("calibration needs a model directory with config.json (transformers loads it)", path=model_dir)
    stream = _token_stream(model_dir, data, tokenizer)[:max_tokens]
    if not stream:
        raise DeltaHubError("calibration: no tokens (empty text or token list)")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    limit = getattr(model.config, "max_position_embeddings", None)
    seq_len = min(seq_len, limit) if isinstance(limit, int) and limit > 0 else seq_len
    total = len(stream)
    keep = torch.arange(total) if total <= max_rows else (torch.arange(max_rows) * total) // max_rows  # evenly spread
    rows: dict[str, list[torch.Tensor]] = {}
    seen: dict[str, int] = {}

    def hook(name: str) -> Any:
        def fn(module: torch.nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
            start = seen.get(name, 0)
            seen[name] = start + x.shape[0]
            idx = keep[(keep >= start) & (keep < start + x.shape[0])] - start  # rows this call sees, by position
            if idx.numel():
                rows.setdefault(name, []).append(x[idx].to(torch.float32))
        return fn

    handles = [m.register_forward_hook(hook(f"{n}.weight")) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear)]
    try:
        with torch.no_grad():
            for i in range(0, len(stream), seq_len):
                ids = torch.tensor([stream[i:i + seq_len]], dtype=torch.long)
                model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {name: torch.cat(parts)[:max_rows].contiguous() for name, parts in rows.items()}


def save_calibration(activations: Mapping[str, torch.Tensor], path: str | Path, *, overwrite: bool = False,
                     metadata: Mapping[str, str] | None = None, inputs: Mapping[str, Any] | None = None) -> Path:
    """Write activations as one float32 safetensors file (via a temporary file and a no-replace rename).

    ``inputs`` (role -> path: the model, the texts) may not be, contain or hold ``path``; see
    :func:`~deltahub.format.io.atomic_directory` for the guarantees.
    """
    path = Path(path)
    tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in activations.items()}
    with atomic_file(path, overwrite=overwrite, inputs=inputs) as tmp:
        save_tensors(tmp, tensors, metadata={**(metadata or {}), "format": CALIBRATION_FORMAT})
    return path


def read_text_file(path: str | Path, what: str) -> str:
    """A calibration text file's contents; :class:`MissingFileError` / :class:`CorruptFileError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{what} not found", path=path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptFileError(f"{what} is not UTF-8 ({exc})", path=path) from None


class CalibrationFile(Mapping[str, torch.Tensor]):
    """A calibration safetensors file opened lazily: tensors are read when looked up."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise MissingFileError("calibration file not found", path=self.path)
        self._f = SafetensorsFile(self.path)  # header validated: CorruptFileError when not safetensors
        meta = self._f.metadata
        if meta.get("format") != CALIBRATION_FORMAT:
            raise CorruptFileError(f"not a deltahub calibration file (metadata format={meta.get('format')!r}, "
                                   f"expected {CALIBRATION_FORMAT!r}; make one with `deltahub calibrate`)", path=self.path)
        self.metadata = dict(meta)
        self._keys = self._f.keys()

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._keys:
            raise KeyError(name)
        return self._f.read(name)

    def __iter__(self) -> Any:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, name: object) -> bool:
        return name in self._keys


def load_calibration(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a calibration file written by :func:`save_calibration` into memory."""
    f = CalibrationFile(path)
    return {k: f[k] for k in f}
