"""A request's inputs as the model sees them: token ids per input (text with its prompt, token
ids checked against the vocabulary, pairs for cross-encoders) and pixels for images, within the
request-size limits. Runs on the caller's thread, before anything is queued."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from poolsvc.engine.config import Limits
from poolsvc.engine.errors import InvalidInputError
from poolsvc.engine.images import ImageInput, decode
from poolsvc.engine.params import InputRole, Task
from poolsvc.engine.request import PoolingRequest, Prompt
from poolsvc.engine.served import ServedModel


@dataclass(frozen=True)
class ModelInputs:
    """Per input (per pair for cross-encoders): token ids, token type ids for pair encodings,
    and an image's pixels (its token ids are empty)."""

    token_ids: list[list[int]]
    token_type_ids: list[list[int]] | None = None
    pixels: list[torch.Tensor | None] | None = None
    # With PoolingRequest.offsets: each token's (start, end) characters in its text input (after
    # any prompt; special tokens (0, 0)); empty for token-id inputs.
    offsets: list[list[tuple[int, int]]] | None = None
    # Multi-vector models: per input, the tokens attended to (None: all) and the output rows
    # kept (None: all); see engine/late_interaction.py.
    attended: list[int | None] | None = None
    kept: list | None = None


def model_inputs(model: ServedModel, request: PoolingRequest, limits: Limits,
                 auto_truncate: bool) -> ModelInputs:
    """What `model` sees for `request`: a cross-encoder's score encodes each pair together;
    every other task encodes each input (for score by cosine: the queries, then the documents)."""
    desc = model.description
    if model.late_interaction is not None:
        return _late_interaction(model, request, limits, auto_truncate)
    if request.task is Task.SCORE:
        pairs = request.pairs
        texts = [*request.inputs, *request.documents]
        limits.check_inputs(len(pairs))
        if desc.scores_by_cosine:
            return _encode_each(model, texts, request, limits, auto_truncate)
        limits.check_texts(texts)
        if not all(isinstance(t, str) for t in texts):
            raise InvalidInputError(f"cross-encoder {desc.name} scores text pairs: token-id "
                                    "inputs cannot be paired with the model's separators")
        limit, cut = request.truncation.limit(desc.max_input_tokens, auto_truncate)
        if desc.score_template is not None:  # an LLM reranker: the pair in its prompt
            return ModelInputs(model.tokenizer.encode_template(
                [(request.inputs[q], request.documents[d]) for q, d in pairs],
                desc.score_template, limit, cut))
        encodings = model.tokenizer.encode_pairs(
            [(request.inputs[q], request.documents[d]) for q, d in pairs], limit, cut,
            request.truncation.side)
        return ModelInputs([e.ids for e in encodings],
                           [e.type_ids for e in encodings] if desc.uses_token_types else None)
    if not request.inputs:
        raise InvalidInputError("the request has no inputs; send at least one")
    limits.check_inputs(len(request.inputs))
    return _encode_each(model, request.inputs, request, limits, auto_truncate)


def _encode_each(model: ServedModel, inputs: Seq[Prompt], request: PoolingRequest,
                 limits: Limits, auto_truncate: bool) -> ModelInputs:
    desc, tok, truncation = model.description, model.tokenizer, request.truncation
    limit, cut = truncation.limit(desc.max_input_tokens, auto_truncate)
    if desc.chunk_size is not None and request.task is Task.EMBED and not cut:
        limit = desc.max_chunked_tokens  # long inputs are split into chunks instead of rejected
    out: list[list[int]] = [[] for _ in inputs]
    texts = [(i, x) for i, x in enumerate(inputs) if isinstance(x, str)]
    images = [(i, x) for i, x in enumerate(inputs) if isinstance(x, ImageInput)]
    prompt = request.prompt
    prefix = tok.prompt_text(prompt)
    limits.check_texts(inputs, prefix)
    for i, x in enumerate(inputs):
        if not isinstance(x, (str, ImageInput)):
            if prompt.name or prompt.text:
                raise InvalidInputError("a prompt applies to text inputs only: token-id "
                                        "inputs must already contain it")
            out[i] = tok.check_ids(x, i, limit, cut, truncation.side)
    offsets = [[] for _ in inputs] if request.offsets else None
    if texts:
        index = [i for i, _ in texts]
        encodings = tok.encode([prefix + x for _, x in texts], limit, cut, truncation.side,
                               indices=index, offsets=request.offsets)
        for i, enc in zip(index, encodings):
            out[i] = enc.ids
            if offsets is not None:
                offsets[i] = _after_prompt(enc, len(prefix))
    if not images:
        return ModelInputs(out, offsets=offsets)
    if "image" not in desc.modalities:
        raise InvalidInputError(f"input {images[0][0]} is an image, but model {desc.name} "
                                "accepts text only; serve an image model (CLIP, SigLIP)")
    decoded = [decode(x, i, limits.max_image_bytes, limits.max_image_pixels) for i, x in images]
    pixels: list[torch.Tensor | None] = [None] * len(inputs)
    for (i, _), tensor in zip(images, model.preprocess(decoded)):
        pixels[i] = tensor
    return ModelInputs(out, pixels=pixels)


def _late_interaction(model: ServedModel, request: PoolingRequest, limits: Limits,
                      auto_truncate: bool) -> ModelInputs:
    """A multi-vector model's inputs: Score's queries and documents each as their side, other
    tasks' inputs as the request's role (documents unless it says queries)."""
    if request.task is Task.SCORE:
        limits.check_inputs(len(request.pairs))
        sides = [(request.inputs, InputRole.QUERY), (request.documents, InputRole.DOCUMENT)]
    else:
        if not request.inputs:
            raise InvalidInputError("the request has no inputs; send at least one")
        limits.check_inputs(len(request.inputs))
        sides = [(request.inputs, request.role or InputRole.DOCUMENT)]
    if any(not isinstance(x, (str, list, tuple)) for inputs, _ in sides for x in inputs):
        raise InvalidInputError(f"model {model.name} accepts text only")
    prefix = model.tokenizer.prompt_text(request.prompt)
    limits.check_texts([x for inputs, _ in sides for x in inputs], prefix)
    if prefix and any(not isinstance(x, str) for inputs, _ in sides for x in inputs):
        raise InvalidInputError("a prompt applies to text inputs only: token-id inputs must "
                                "already contain it")
    limit, cut = request.truncation.limit(model.description.max_input_tokens, auto_truncate)
    out = ModelInputs([], offsets=[] if request.offsets else None, attended=[], kept=[])
    for inputs, role in sides:
        encoded = model.late_interaction.encode(
            model.tokenizer, inputs, role, prefix, limit, cut, request.truncation.side,
            offsets=request.offsets, first=len(out.token_ids))
        out.token_ids.extend(encoded.token_ids)
        out.attended.extend(encoded.attended)
        out.kept.extend(encoded.kept)
        if out.offsets is not None:
            out.offsets.extend(encoded.offsets)
    return out


def _after_prompt(encoding, prompt_chars: int) -> list[tuple[int, int]]:
    """Token spans in the caller's text: the prompt's characters taken off, special tokens and
    the prompt's own tokens (0, 0)."""
    spans = []
    for special, (start, end) in zip(encoding.special_tokens_mask, encoding.offsets):
        if special or end <= prompt_chars:
            spans.append((0, 0))
        else:
            spans.append((max(start - prompt_chars, 0), end - prompt_chars))
    return spans
