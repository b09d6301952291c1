"""Text -> token ids the way the reference libraries do it, with our truncation rules."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Encoding, Tokenizer, normalizers

from poolsvc.engine.errors import InvalidInputError, ModelLoadError, Option, quoted
from poolsvc.engine.params import PromptOptions, TruncationSide

_SIDE = {TruncationSide.RIGHT: "right", TruncationSide.LEFT: "left"}


def load_hf_tokenizer(path: Path, lowercase: bool) -> Tokenizer:
    """The model's fast tokenizer as transformers builds it, with padding and truncation off.

    transformers, not tokenizer.json alone, is the reference: for known model types it rebuilds
    parts of the pipeline (Qwen2's pre-tokenizer, say) from its own class, and users compare
    against what AutoTokenizer does. tokenizer.json is read directly only when transformers
    cannot load the directory.
    """
    try:
        from transformers import AutoTokenizer
        hf = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        if not hf.is_fast:
            raise ValueError("no fast tokenizer")
        tok = Tokenizer.from_str(hf.backend_tokenizer.to_str())
    except Exception as exc:
        file = path / "tokenizer.json"
        if not file.is_file():
            raise ModelLoadError(f"{path} has no usable tokenizer (no tokenizer.json, and "
                                 f"transformers could not build a fast one: {exc})") from exc
        tok = Tokenizer.from_file(str(file))
    tok.no_padding()
    tok.no_truncation()
    if lowercase:  # Sentence-Transformers' do_lower_case, done as it does: in the normalizer
        tok.normalizer = normalizers.Sequence(
            [normalizers.Lowercase()] + ([tok.normalizer] if tok.normalizer else []))
    return tok


class TextTokenizer:
    """Thread-safe: encoding only reads; truncating variants are built once and cached."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, prompts: dict[str, str],
                 default_prompt_name: str | None):
        self._tok = tokenizer
        self.vocab_size = vocab_size
        self.prompts = prompts
        self.default_prompt_name = default_prompt_name
        self.num_special_tokens = tokenizer.num_special_tokens_to_add(is_pair=False)
        self._truncating: dict[tuple[int, str], Tokenizer] = {}
        self._lock = threading.Lock()

    def prompt_text(self, prompt: PromptOptions) -> str:
        if prompt.text:
            return prompt.text
        name = prompt.name or self.default_prompt_name
        if not name:
            return ""
        try:
            return self.prompts[name]
        except KeyError:
            known = ", ".join(sorted(self.prompts)) or "none"
            raise InvalidInputError(
                f"unknown prompt_name {quoted(name)}; this model's prompts: {known}") from None

    def _truncating_tokenizer(self, limit: int, side: TruncationSide) -> Tokenizer:
        key = (limit, _SIDE[side])
        with self._lock:
            tok = self._truncating.get(key)
            if tok is None:
                tok = Tokenizer.from_str(self._tok.to_str())
                # longest_first: for pairs, cut the longer text first (transformers' default)
                tok.enable_truncation(limit, strategy="longest_first", direction=key[1])
                self._truncating[key] = tok
                if len(self._truncating) > 64:  # per-request limits: keep the cache bounded
                    self._truncating.pop(next(iter(self._truncating)))
        return tok

    def encode(self, texts: Sequence[str], limit: int, cut: bool, side: TruncationSide,
               add_special_tokens: bool = True, indices: Sequence[int] | None = None,
               offsets: bool = False) -> list[Encoding]:
        """Encodings of `texts`; longer than `limit` is cut when `cut`, else InvalidInputError.

        `indices` numbers the texts in error messages (their positions in the request);
        `offsets` computes character offsets, which the model path does not need.
        """
        special = self.num_special_tokens if add_special_tokens else 0
        if cut and limit <= special:
            raise InvalidInputError(
                f"the truncation length {limit} leaves no room for text: the model adds "
                f"{special} special tokens", option=Option.TRUNCATE_LENGTH)
        tok = self._truncating_tokenizer(limit, side) if cut else self._tok
        encode = tok.encode_batch if offsets else tok.encode_batch_fast
        encodings = encode(list(texts), add_special_tokens=add_special_tokens)
        if not cut:
            for i, enc in enumerate(encodings):
                if len(enc.ids) > limit:
                    raise too_long(indices[i] if indices else i, len(enc.ids), limit)
        return encodings

    def encode_pairs(self, pairs: Sequence[tuple[str, str]], limit: int, cut: bool,
                     side: TruncationSide) -> list[Encoding]:
        """Pair encodings ([CLS] a [SEP] b [SEP] and the like, with token type ids) for
        cross-encoders; over-long pairs are cut longest-first, or rejected."""
        special = self._tok.num_special_tokens_to_add(is_pair=True)
        if cut and limit <= special + 1:
            raise InvalidInputError(
                f"the truncation length {limit} leaves no room for a pair: the model adds "
                f"{special} special tokens", option=Option.TRUNCATE_LENGTH)
        tok = self._truncating_tokenizer(limit, side) if cut else self._tok
        encodings = tok.encode_batch_fast(list(pairs))
        if not cut:
            for i, enc in enumerate(encodings):
                if len(enc.ids) > limit:
                    raise InvalidInputError(
                        f"pair {i} has {len(enc.ids)} tokens, more than the limit of {limit}: "
                        "shorten it, or enable truncation", option=Option.TRUNCATE)
        return encodings

    def token_strings(self, ids) -> list[str]:
        """The vocabulary's string of each token id."""
        return [self._tok.id_to_token(int(i)) for i in ids]

    def encode_template(self, pairs: Sequence[tuple[str, str]], template, limit: int,
                        cut: bool) -> list[list[int]]:
        """Token ids of each pair written into an LLM reranker's template: its pieces tokenized
        each on its own, no special tokens added. An over-long pair has its document's piece cut
        from its end, keeping the rest whole, or is rejected."""
        doc = template.document_piece
        texts = [template.texts(query, document) for query, document in pairs]
        columns = []  # per piece, the ids of every pair's; fixed pieces tokenized once
        for j, piece in enumerate(template.pieces):
            if "{query}" in piece or "{document}" in piece:
                columns.append([e.ids for e in self._tok.encode_batch_fast(
                    [t[j] for t in texts], add_special_tokens=False)])
            else:
                columns.append([self._tok.encode(piece.format(
                    instruction=template.instruction), add_special_tokens=False).ids] * len(pairs))
        out = []
        for i in range(len(pairs)):
            pieces = [column[i] for column in columns]
            total = sum(len(p) for p in pieces)
            if total > limit:
                if not cut:
                    raise InvalidInputError(
                        f"pair {i} has {total} tokens in the model's template, more than the "
                        f"limit of {limit}: shorten it, or enable truncation",
                        option=Option.TRUNCATE)
                keep = len(pieces[doc]) - (total - limit)
                if keep < 1:
                    raise InvalidInputError(
                        f"the truncation length {limit} leaves no room for pair {i}'s document: "
                        f"the template and the rest of the pair take {total - len(pieces[doc])} "
                        "tokens", option=Option.TRUNCATE_LENGTH)
                pieces[doc] = pieces[doc][:keep]
            out.append([t for p in pieces for t in p])
        return out

    def check_ids(self, ids: Sequence[int], index: int, limit: int, cut: bool,
                  side: TruncationSide) -> list[int]:
        """Validates pre-tokenized input; truncation cuts the ids as given."""
        if not ids:
            raise InvalidInputError(f"input {index} has no token ids")
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidInputError(
                f"input {index} has token id {bad}, outside the vocabulary (ids must be from 0 "
                f"to {self.vocab_size - 1})")
        if len(ids) > limit:
            if not cut:
                raise too_long(index, len(ids), limit)
            ids = ids[:limit] if side is TruncationSide.RIGHT else ids[len(ids) - limit:]
        return list(ids)


def too_long(index: int, length: int, limit: int) -> InvalidInputError:
    return InvalidInputError(
        f"input {index} has {length} tokens, more than the limit of {limit}: shorten it, or "
        "enable truncation", option=Option.TRUNCATE)
