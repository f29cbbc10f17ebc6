"""Which codec each tensor gets: user rules first, then the main codec's policy.

With a named codec (``bitdelta``, ``deltadq``, ...), as in the BitDelta paper: matrices inside
the repeated transformer blocks get the main codec; embeddings, the LM head, norms and biases
stay exact (``raw``). deltahub's default, ``auto`` over the whole model, gives every tensor to
the byte allocator (:mod:`deltahub.allocation`).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidCodecParamsError

#: Pseudo-codec name: pick, per tensor, the best codec setting within a byte budget (see :mod:`deltahub.autoselect`).
AUTO = "auto"

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


_VOCABULARY = re.compile(r"(embed|wte|lm_head|word_embeddings|(^|\.)shared\.|(^|\.)output\.weight$)", re.I)


def is_vocabulary_matrix(name: str) -> bool:
    """True for token embeddings and LM heads (one row per vocabulary entry), by name."""
    return bool(_VOCABULARY.search(name))


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
    """CLI parameter values: ints, floats, ``true``/``false``, ``null`` (-> ``None``), else the string.

    Only ``null`` means "no value": ``none`` stays the string ``"none"``, a value codecs use
    (deltadq's ``entropy=none``), like ``auto`` (``group_size=auto``) and preset names (``16x``).
    """
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "null":
        return None
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return v


def parse_params(text: str) -> dict[str, Any]:
    """``"k=v,k2=v2"`` -> dict, with values typed by :func:`parse_value` (``entropy=none`` stays ``"none"``)."""
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
    ``include`` is given, matching names get the main codec and others ``raw``; else, with
    ``whole_model``, every tensor gets the main codec; else the BitDelta paper's policy
    (:func:`in_transformer_block_matrix`: block matrices coded, the rest exact). ``preset`` (a named setting
    of the main codec, e.g. DeltaDQ's ``"16x"``) is added to the main codec's params. A codec
    of ``"auto"`` (main or in a rule) means "choose per tensor within the budget"
    (:func:`deltahub.compression.compress`'s ``target_ratio`` / ``max_bytes``).
    """

    codec: str = "bitdelta"
    params: dict[str, Any] = field(default_factory=dict)
    rules: list[Rule] = field(default_factory=list)
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    raw_params: dict[str, Any] = field(default_factory=dict)
    preset: str | None = None
    #: The main codec covers every tensor (embeddings, LM head, norms too), not only block matrices:
    #: the whole-model policy of ``codec="auto"`` (:mod:`deltahub.allocation`).
    whole_model: bool = False

    def main_params(self) -> dict[str, Any]:
        """The main codec's params, with ``preset`` added when given."""
        return {**self.params, "preset": self.preset} if self.preset is not None else dict(self.params)

    def uses_auto(self) -> bool:
        """True when the main codec or any rule is ``"auto"``."""
        return self.codec == AUTO or any(r.codec == AUTO for r in self.rules)

    def choose(self, name: str, ndim: int) -> tuple[str, dict[str, Any]]:
        for rule in self.rules:
            if rule.matches(name):
                return rule.codec, dict(rule.params)
        if any(Rule(p, "raw").matches(name) for p in self.exclude):
            return "raw", dict(self.raw_params)
        if self.include:
            hit = any(Rule(p, self.codec).matches(name) for p in self.include)
            return (self.codec, self.main_params()) if hit else ("raw", dict(self.raw_params))
        if self.whole_model or in_transformer_block_matrix(name, ndim):
            return self.codec, self.main_params()
        return "raw", dict(self.raw_params)


def check_preset(codec: str, preset: str) -> None:
    """Raise :class:`InvalidCodecParamsError` unless ``codec`` has a preset called ``preset`` (the error lists them)."""
    from .codecs import available_codecs, get_codec

    having = [f"{n} ({', '.join(get_codec(n).presets)})" for n in available_codecs() if get_codec(n).presets]
    if codec == AUTO:
        raise InvalidCodecParamsError(f"preset {preset!r} needs a named codec (codec 'auto', the default, chooses among its "
                                      f"candidates); codecs with presets: " + ("; ".join(having) or "none"))
    presets = get_codec(codec).presets
    if not presets:
        raise InvalidCodecParamsError(f"codec {codec!r} has no presets (preset {preset!r} given); codecs with presets: "
                                      + ("; ".join(having) or "none"))
    if preset not in presets:
        raise InvalidCodecParamsError(f"codec {codec!r} has no preset {preset!r}; its presets: {', '.join(presets)}")
