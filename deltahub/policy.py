"""Which codec each tensor gets: user rules first, then BitDelta's default policy.

Default (as in the BitDelta paper): matrices inside the repeated transformer blocks get the
main codec; embeddings, the LM head, norms and biases stay exact (``raw``).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidCodecParamsError

#: A dotted name segment that is a block index: ``model.layers.3.``, ``transformer.h.11.``.
_BLOCK = re.compile(r"\.\d+\.")
_NOT_A_BLOCK_MATRIX = re.compile(r"(embed|wte|wpe|lm_head|word_embeddings|position_embeddings|norm|ln_|layernorm|bias)", re.I)


def in_transformer_block_matrix(name: str, ndim: int) -> bool:
    """True for ``*.weight`` tensors of 2+ dims inside a numbered block that are not embeddings or norms."""
    if ndim < 2 or not _BLOCK.search(name):
        return False
    leaf = name.rsplit(".", 1)[-1]
    if "weight" not in leaf and not leaf.endswith("proj"):  # e.g. fused MoE "experts.gate_up_proj"
        return False
    return not _NOT_A_BLOCK_MATRIX.search(name)


def _matcher(pattern: str) -> re.Pattern[str]:
    """``re:<regex>`` is a regular expression; anything else a shell glob (``*``, ``?``, ``[...]``)."""
    if pattern.startswith("re:"):
        try:
            return re.compile(pattern[3:])
        except re.error as exc:
            raise InvalidCodecParamsError(f"bad regular expression {pattern[3:]!r}: {exc}") from None
    return re.compile(fnmatch.translate(pattern))


@dataclass
class Rule:
    """Tensors whose name matches ``pattern`` get ``codec`` with ``params``."""

    pattern: str
    codec: str
    params: dict[str, Any] = field(default_factory=dict)

    def matches(self, name: str) -> bool:
        m = _matcher(self.pattern)
        return bool(m.search(name) if self.pattern.startswith("re:") else m.fullmatch(name))

    @classmethod
    def parse(cls, text: str) -> Rule:
        """Parse ``PATTERN=CODEC[:key=value,key=value]`` (the CLI's ``--rule``)."""
        pattern, sep, rest = text.partition("=")
        if not sep or not pattern or not rest:
            raise InvalidCodecParamsError(f"rule {text!r} is not PATTERN=CODEC[:key=value,...]")
        codec, _, args = rest.partition(":")
        return cls(pattern, codec.strip(), parse_params(args))


def parse_value(v: str) -> Any:
    """CLI parameter values: ints, floats, true/false/none, else the string."""
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return v


def parse_params(text: str) -> dict[str, Any]:
    """``"k=v,k2=v2"`` -> dict, with values typed by :func:`parse_value`."""
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        k, sep, v = part.partition("=")
        if not sep or not k.strip():
            raise InvalidCodecParamsError(f"codec parameter {part!r} is not key=value")
        out[k.strip()] = parse_value(v.strip())
    return out


@dataclass
class Policy:
    """Decides ``(codec, params)`` for a tensor name.

    Order: the first matching ``rules`` entry; else ``exclude`` -> ``raw``; else, when
    ``include`` is given, matching names get the main codec and others ``raw``; else the
    default BitDelta policy (:func:`in_transformer_block_matrix`).
    """

    codec: str = "bitdelta"
    params: dict[str, Any] = field(default_factory=dict)
    rules: list[Rule] = field(default_factory=list)
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    raw_params: dict[str, Any] = field(default_factory=dict)

    def choose(self, name: str, ndim: int) -> tuple[str, dict[str, Any]]:
        for rule in self.rules:
            if rule.matches(name):
                return rule.codec, dict(rule.params)
        if any(Rule(p, "raw").matches(name) for p in self.exclude):
            return "raw", dict(self.raw_params)
        if self.include:
            hit = any(Rule(p, self.codec).matches(name) for p in self.include)
            return (self.codec, dict(self.params)) if hit else ("raw", dict(self.raw_params))
        if in_transformer_block_matrix(name, ndim):
            return self.codec, dict(self.params)
        return "raw", dict(self.raw_params)
