"""Prompts as token ids: "A photo of {category}, in the background of {D}", its token spans, the identifier's
position, and the category vocabulary. NumPy and a tokenizer only: the PyTorch pipeline builds its prompts here too.

Spans come from the tokenizer's character offsets, so they are right for categories of
several words, for non-ASCII names (one character, several byte tokens) and after
truncation to the text encoder's 77 positions.

SDXL has two tokenizers (CLIP's vocabulary in both; the second pads with "!") whose encoders' outputs are
concatenated position by position, so token i of both is one key of the cross-attention: the builder
tokenizes with both, checks that they split the prompt alike (else the spans would name different words
in the two halves of a key) and keeps one pair of spans and one identifier position.
"""

from __future__ import annotations

import dataclasses
import logging
import re

import numpy as np

from bgjax.method.config import MethodConfig

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Prompt:
    text: str
    input_ids: np.ndarray  # (L,) int32, padded to the encoder length
    fg_tokens: np.ndarray  # (L,) float32, 1 on P_fg
    bg_tokens: np.ndarray  # (L,) float32, 1 on P_bg
    identifier_index: int  # position of {D}'s token, -1 if truncated away or absent
    input_ids_2: np.ndarray | None = None  # (L,) int32: SDXL's second tokenizer, padded with its own pad id


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


class PromptBuilder:
    """Builds token ids and span masks for categories with a CLIP tokenizer (two for SDXL: `tokenizer_2`)."""

    def __init__(self, tokenizer, config: MethodConfig, max_length: int = 77, tokenizer_2=None):
        self.tokenizer, self.config, self.max_length, self.tokenizer_2 = tokenizer, config, max_length, tokenizer_2
        self.pad_id = _pad_id(tokenizer)
        self.special_ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, self.pad_id}
        for i, tok in enumerate(t for t in (tokenizer, tokenizer_2) if t is not None):
            n = len(tok(config.identifier_placeholder, add_special_tokens=False).input_ids)
            if n != 1:
                raise ValueError(f"identifier_placeholder {config.identifier_placeholder!r} is {n} tokens for "
                                 f"{'the second' if i else 'this'} tokenizer; it must be exactly one")

    def text(self, category: str) -> tuple[str, int, tuple[int, int]]:
        """The prompt, where P_bg starts, and the placeholder's character range."""
        cfg = self.config
        fg = cfg.foreground_template.format(category=category)
        head, tail = cfg.background_template.split("{identifier}")
        start = len(fg) + len(cfg.joiner)
        ident = start + len(head)
        text = fg + cfg.joiner + head + cfg.identifier_placeholder + tail
        return text, start, (ident, ident + len(cfg.identifier_placeholder))

    def __call__(self, category: str, *, empty: bool = False) -> Prompt:
        """The prompt for `category`; `empty=True` gives the unconditional (empty) prompt,
        whose BOS/EOS/padding tokens keep both spans non-empty."""
        if not empty and not (isinstance(category, str) and category.strip()):
            raise ValueError(f"category: must be a non-empty name, got {category!r}")
        if empty:
            return self.encode("", None, (-1, -1))
        text, bg_start, ident = self.text(category.strip())
        return self.encode(text, (0, bg_start), ident)

    def custom(self, template: str, category: str = "") -> Prompt:
        """A prompt of the caller's words: `{category}` becomes the category (the span P_fg; the rest is
        P_bg) and `{identifier}` the identifier placeholder. Without `{category}` every token is in both
        spans, so mask-guided attention lets the whole prompt attend everywhere."""
        text, product, ident = "", None, (-1, -1)
        for piece in re.split(r"(\{category\}|\{identifier\})", template):
            if piece == "{category}":
                product = (len(text), len(text) + len(category))
                piece = category
            elif piece == "{identifier}":
                ident = (len(text), len(text) + len(self.config.identifier_placeholder))
                piece = self.config.identifier_placeholder
            text += piece
        return self.encode(text, product, ident)

    def encode(self, text: str, product: tuple[int, int] | None, ident: tuple[int, int]) -> Prompt:
        """Token ids and spans of `text`: tokens within the character range `product` are P_fg, the others
        P_bg (all tokens both when `product` is None); `ident` is the placeholder's character range."""
        ids, offsets, length = self._tokenize(self.tokenizer, text)
        if length > self.max_length:
            _log.warning("prompt %r is %d tokens; truncated to %d (spans kept)", text, length, self.max_length)
        ids_2 = None
        if self.tokenizer_2 is not None:
            ids_2, offsets_2, length_2 = self._tokenize(self.tokenizer_2, text)
            if offsets_2 != offsets or length_2 != length:
                raise ValueError(f"prompt {text!r}: SDXL's two tokenizers split it differently ({length} and "
                                 f"{length_2} tokens); their outputs are joined token by token, so they must "
                                 f"agree (both are CLIP's vocabulary in SDXL)")
            ids_2 = np.asarray(ids_2 + [_pad_id(self.tokenizer_2)] * (self.max_length - len(ids_2)), np.int32)
        n = len(ids)
        ids = ids + [self.pad_id] * (self.max_length - n)
        fg, bg = np.zeros(self.max_length, np.float32), np.zeros(self.max_length, np.float32)
        ident_index = -1
        for i in range(self.max_length):
            if i >= n or ids[i] in self.special_ids:
                if self.config.special_tokens_in_both_spans or product is None:
                    fg[i] = bg[i] = 1.0
                continue
            start, end = offsets[i]
            if product is None:
                fg[i] = bg[i] = 1.0
            else:
                (fg if product[0] <= start < product[1] else bg)[i] = 1.0
            if start < ident[1] and end > ident[0]:
                ident_index = i
        return Prompt(text, np.asarray(ids, np.int32), fg, bg, ident_index, ids_2)

    def _tokenize(self, tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]], int]:
        """Ids and character offsets truncated to `max_length` (the last token, EOS, kept), and the length before."""
        enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
        ids, offsets = list(enc.input_ids), [tuple(o) for o in enc.offset_mapping]
        length = len(ids)
        if length > self.max_length:
            ids, offsets = ids[: self.max_length - 1] + ids[-1:], offsets[: self.max_length - 1] + offsets[-1:]
        return ids, offsets, length

    def batch(self, categories: list[str], *, empty: bool = False) -> dict[str, np.ndarray]:
        prompts = [self(c, empty=empty) for c in categories]
        out = {
            "input_ids": np.stack([p.input_ids for p in prompts]),
            "fg_tokens": np.stack([p.fg_tokens for p in prompts]),
            "bg_tokens": np.stack([p.bg_tokens for p in prompts]),
            "identifier_index": np.asarray([p.identifier_index for p in prompts], np.int32),
        }
        if self.tokenizer_2 is not None:
            out["input_ids_2"] = np.stack([p.input_ids_2 for p in prompts])
        return out


class CategoryVocabulary:
    """Category names <-> ids, saved with the model (names are matched after strip + casefold)."""

    def __init__(self, names: list[str]):
        self.names = list(names)
        self._ids = {}
        for i, name in enumerate(self.names):
            key = name.strip().casefold()
            if not key:
                raise ValueError(f"category vocabulary: entry {i} is empty")
            if key in self._ids:
                raise ValueError(f"category vocabulary: {name!r} appears twice")
            self._ids[key] = i

    def __len__(self) -> int:
        return len(self.names)

    def id(self, name: str) -> int:
        key = name.strip().casefold() if isinstance(name, str) else ""
        if key not in self._ids:
            raise KeyError(f"unknown category {name!r}; the model knows: {', '.join(self.names)}")
        return self._ids[key]
