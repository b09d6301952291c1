"""Late interaction (ColBERT): how a multi-vector model's queries and documents become token ids,
which of their rows are scored, and MaxSim.

Each side gets its marker (e.g. "[Q] ") after the first token, as PyLate inserts it (a marker that
is not one token is prepended to the text instead, as Sentence-Transformers prepends prompts).
Queries are padded with the expansion token ([MASK]) to the model's query length; the expansion
tokens read the query but are not read by it, unless the model attends to them. Documents lose
their skip-list tokens (punctuation) from the output. Token-id inputs are used as given: no
marker, no expansion.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from poolsvc.engine.errors import InvalidInputError, ModelLoadError, Option
from poolsvc.engine.params import InputRole, LateInteraction


@dataclass(frozen=True)
class Side:
    """One side's encoding: its marker (a token id, or text to prepend), its token limit, its
    expansion (queries: pad to `expand_to` with `expansion_id`) and skip-list."""

    marker_id: int | None
    marker_text: str
    limit: int
    expand_to: int = 0
    expansion_id: int = 0
    attend_expansion: bool = False
    skip_ids: np.ndarray | None = None  # token ids dropped from the output


@dataclass(frozen=True)
class SideInputs:
    """Token ids per input, how many of their first tokens are attended to (None: all), the
    output rows each keeps (None: all), and each token's character offsets (when asked)."""

    token_ids: list[list[int]]
    attended: list[int | None]
    kept: list[np.ndarray | None]
    offsets: list[list[tuple[int, int]]] | None = None


class LateInteractionEncoder:
    """A multi-vector model's two sides, resolved against its tokenizer once at load."""

    def __init__(self, config: LateInteraction, tokenizer: Tokenizer, path: Path,
                 max_tokens: int):
        self.config = config
        self.mean = config.mean
        skip = sorted({i for w in config.skiplist if (i := tokenizer.token_to_id(w)) is not None})
        skip_ids = np.asarray(skip, dtype=np.int64) if skip else None
        expansion_id = 0
        if config.query_length is not None:
            name = config.expansion_token or _special_token(path, "mask_token") or \
                _special_token(path, "eos_token")
            expansion_id = tokenizer.token_to_id(name) if name else None
            if expansion_id is None:
                raise ModelLoadError(f"{path}: the query expansion token {name!r} is not in the "
                                     "vocabulary")
            if config.query_length > max_tokens:
                raise ModelLoadError(f"{path}: the query length {config.query_length} exceeds "
                                     f"the model's {max_tokens} positions")
        if config.query_length is None or config.expansion == "min":
            query_limit = min(config.query_max or max_tokens, max_tokens)
        else:
            query_limit = config.query_length
        self.sides = {
            InputRole.QUERY: Side(*_marker(tokenizer, config.query_marker), query_limit,
                                  config.query_length or 0, expansion_id, config.attend_expansion,
                                  skip_ids if config.skip_queries else None),
            InputRole.DOCUMENT: Side(*_marker(tokenizer, config.document_marker),
                                     min(config.document_length or max_tokens, max_tokens),
                                     skip_ids=skip_ids)}

    @property
    def max_tokens(self) -> int:
        """The longest input either side takes."""
        return max(side.limit for side in self.sides.values())

    def encode(self, tokenizer, inputs, role: InputRole, prefix: str, limit: int, cut: bool,
               side_of_cut, offsets: bool = False, first: int = 0) -> SideInputs:
        """Token ids of `inputs` (texts or token ids) as `role`: `prefix` (the request's prompt)
        before each text, cut to `limit` tokens (the side's own limit at most) when `cut`, else
        over-long inputs are rejected. `first` numbers the inputs in error messages."""
        side = self.sides[role]
        limit = min(limit, side.limit)
        extra = side.marker_id is not None  # the marker token, inserted after tokenizing
        text_prefix = side.marker_text + prefix
        ids: list[list[int]] = [[] for _ in inputs]
        spans = [[] for _ in inputs] if offsets else None
        texts = [(i, x) for i, x in enumerate(inputs) if isinstance(x, str)]
        for i, x in enumerate(inputs):
            if not isinstance(x, str):
                ids[i] = tokenizer.check_ids(x, first + i, limit, cut, side_of_cut)
        if texts:
            index = [first + i for i, _ in texts]
            if cut:
                encodings = tokenizer.encode([text_prefix + x for _, x in texts], limit - extra,
                                             True, side_of_cut, indices=index, offsets=offsets)
            else:
                encodings = tokenizer.encode([text_prefix + x for _, x in texts], 1 << 30, False,
                                             side_of_cut, indices=index, offsets=offsets)
                for (i, _), enc in zip(texts, encodings):
                    if len(enc.ids) + extra > limit:
                        raise InvalidInputError(
                            f"input {first + i} has {len(enc.ids) + extra} tokens as a "
                            f"{role.value}, more than the limit of {limit}: shorten it, or enable "
                            "truncation", option=Option.TRUNCATE)
            for (i, _), enc in zip(texts, encodings):
                row = list(enc.ids)
                span = _spans(enc, len(text_prefix)) if offsets else None
                if extra:
                    row.insert(1, side.marker_id)
                    if span is not None:
                        span.insert(1, (0, 0))
                ids[i] = row
                if spans is not None:
                    spans[i] = span
        attended: list[int | None] = [None] * len(inputs)
        if side.expand_to:
            for i, row in enumerate(ids):
                if isinstance(inputs[i], str) and len(row) < side.expand_to:
                    if not side.attend_expansion:
                        attended[i] = len(row)
                    missing = side.expand_to - len(row)
                    row.extend([side.expansion_id] * missing)
                    if spans is not None:
                        spans[i].extend([(0, 0)] * missing)
        kept: list[np.ndarray | None] = [None] * len(inputs)
        if side.skip_ids is not None:
            for i, row in enumerate(ids):
                skipped = np.isin(np.asarray(row, dtype=np.int64), side.skip_ids)
                if skipped.any():
                    kept[i] = np.flatnonzero(~skipped)
        return SideInputs(ids, attended, kept, spans)


def maxsim(query: torch.Tensor, document: torch.Tensor, mean: bool) -> torch.Tensor:
    """Each query vector's best match among the document's, summed (or averaged), in float32:
    query [q, D], document [d, D]."""
    best = (query.float() @ document.float().T).amax(dim=1)  # [q]
    return best.mean() if mean else best.sum()


def _marker(tokenizer: Tokenizer, marker: str) -> tuple[int | None, str]:
    """(the marker's token id, "") when it is one token, else (None, the marker as text)."""
    if not marker:
        return None, ""
    token_id = tokenizer.token_to_id(marker)
    return (token_id, "") if token_id is not None else (None, marker)


def _spans(encoding, prompt_chars: int) -> list[tuple[int, int]]:
    """Token spans in the caller's text (the prefix's characters taken off; special and
    prefix tokens (0, 0))."""
    out = []
    for special, (start, end) in zip(encoding.special_tokens_mask, encoding.offsets):
        if special or end <= prompt_chars:
            out.append((0, 0))
        else:
            out.append((max(start - prompt_chars, 0), end - prompt_chars))
    return out


def _special_token(path: Path, name: str) -> str | None:
    """A special token's string from the tokenizer's config files, if it names one."""
    for file in ("tokenizer_config.json", "special_tokens_map.json"):
        try:
            value = json.loads((path / file).read_text(encoding="utf-8")).get(name)
        except (OSError, ValueError):
            continue
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str) and value:
            return value
    return None


def special_token_ids(tokenizer: Tokenizer, path: Path, names: tuple[str, ...]) -> frozenset[int]:
    """The ids of the special tokens `names` ("cls_token", ...) the tokenizer's files name."""
    ids = set()
    for name in names:
        token = _special_token(path, name)
        if token is not None and (token_id := tokenizer.token_to_id(token)) is not None:
            ids.add(token_id)
    return frozenset(ids)
