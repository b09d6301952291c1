"""Request messages from Python values. Options are spelled as the client's keyword arguments;
a value the client does not know raises ValueError listing the accepted ones, before any call.

Inputs: a `str` is a text, `bytes` an encoded image (PNG, JPEG or WebP), a sequence of ints the
token ids of one input (from `tokenize`, special tokens included). Where a method takes several
inputs, one such value alone means one input.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from poolsvc_client.gen.v1 import (
    classify_pb2,
    common_pb2,
    embed_pb2,
    encode_pb2,
    model_pb2,
    score_pb2,
    tensor_pb2,
)

Text = str | bytes | Sequence[int]  # a text, an encoded image, or token ids

DTYPES = {"float32": tensor_pb2.DATA_TYPE_FLOAT32, "float16": tensor_pb2.DATA_TYPE_FLOAT16,
          "bfloat16": tensor_pb2.DATA_TYPE_BFLOAT16, "int8": tensor_pb2.DATA_TYPE_INT8,
          "uint8": tensor_pb2.DATA_TYPE_UINT8, "binary": tensor_pb2.DATA_TYPE_BINARY,
          "ubinary": tensor_pb2.DATA_TYPE_UBINARY}
SIDES = {"right": common_pb2.TRUNCATION_SIDE_RIGHT, "left": common_pb2.TRUNCATION_SIDE_LEFT}
EMBEDDING_TYPES = {"dense": common_pb2.EMBEDDING_TYPE_DENSE,
                   "sparse": common_pb2.EMBEDDING_TYPE_SPARSE,
                   "multi_vector": common_pb2.EMBEDDING_TYPE_MULTI_VECTOR}
ROLES = {"query": common_pb2.INPUT_ROLE_QUERY, "document": common_pb2.INPUT_ROLE_DOCUMENT}
TASKS = {"token_embed": common_pb2.TASK_TOKEN_EMBED,
         "token_classify": common_pb2.TASK_TOKEN_CLASSIFY, "reward": common_pb2.TASK_REWARD,
         "embed": common_pb2.TASK_EMBED, "classify": common_pb2.TASK_CLASSIFY}


def _choice(option: str, value, choices: dict):
    if isinstance(value, str) and value in choices:
        return choices[value]
    accepted = ", ".join(repr(c) for c in choices)
    raise ValueError(f"unknown {option}={value!r}; use one of {accepted}")


def _is_one_input(value) -> bool:
    if isinstance(value, (str, bytes, bytearray, memoryview)):
        return True
    if isinstance(value, np.ndarray):
        return value.ndim == 1 and value.dtype.kind in "iu"
    return (isinstance(value, Sequence) and len(value) > 0
            and all(isinstance(i, (int, np.integer)) for i in value))


def to_input(item: Text) -> common_pb2.Input:
    if isinstance(item, str):
        return common_pb2.Input(text=item)
    if isinstance(item, (bytes, bytearray, memoryview)):
        return common_pb2.Input(image=common_pb2.Image(data=bytes(item)))
    if _is_one_input(item):
        return common_pb2.Input(tokens=common_pb2.TokenIds(ids=[int(i) for i in item]))
    raise TypeError("an input is a str (text), bytes (an encoded PNG, JPEG or WebP image) or a "
                    f"sequence of token ids; got {type(item).__name__}")


def to_inputs(items: Text | Sequence[Text]) -> list[common_pb2.Input]:
    return [to_input(items)] if _is_one_input(items) else [to_input(i) for i in items]


def _truncation(message, truncate: bool | int | None, side: str) -> None:
    """`truncate`: None = the server's --auto-truncate, False = reject over-long inputs, True = cut
    at the model's limit, an int = cut at that many tokens."""
    side_value = _choice("truncation_side", side, SIDES)
    if truncate is None and side == "right":
        return
    if not isinstance(truncate, (bool, int, type(None))):
        raise ValueError(f"truncate={truncate!r}: use None, True, False or a number of tokens")
    message.truncation.side = side_value
    if isinstance(truncate, bool):
        message.truncation.enabled = truncate
    elif truncate is not None:
        message.truncation.max_tokens = truncate


def embed_request(texts: Text | Sequence[Text], *, model: str = "", adapter: str = "",
                  normalize: bool | None = None, dimensions: int | None = None,
                  truncate: bool | int | None = None, truncation_side: str = "right",
                  dtype: str = "float32", prompt_name: str = "",
                  prompt: str = "", sparse_top_k: int = 0,
                  return_tokens: bool = False,
                  embedding_types: Sequence[str] = ()) -> embed_pb2.EmbedRequest:
    """Embed options: `normalize` (None: the model's default), `dimensions` (Matryoshka),
    `truncate`, `truncation_side` ("right", "left"), `dtype` ("float32", "float16", "bfloat16"),
    `prompt_name` (a prompt of the model's config) or `prompt` (a literal prefix); for sparse
    models `sparse_top_k` (the k largest weights; 0: all) and `return_tokens`;
    `embedding_types` ("dense", "sparse", "multi_vector"; models with several, BGE-M3);
    `adapter`: a LoRA adapter served with the model (every request builder takes it; "": the
    base model)."""
    request = embed_pb2.EmbedRequest(
        model=model, adapter=adapter, inputs=to_inputs(texts), prompt_name=prompt_name,
        prompt=prompt,
        output_dtype=_choice("dtype", dtype, DTYPES), sparse_top_k=sparse_top_k,
        return_tokens=return_tokens,
        embedding_types=[_choice("embedding_types", t, EMBEDDING_TYPES)
                         for t in embedding_types])
    if normalize is not None:
        request.normalize = normalize
    if dimensions is not None:
        request.dimensions = dimensions
    _truncation(request, truncate, truncation_side)
    return request


def classify_request(texts: Text | Sequence[Text], *, model: str = "", adapter: str = "",
                     activation: bool | None = None, truncate: bool | int | None = None,
                     truncation_side: str = "right", dtype: str = "float32",
                     prompt_name: str = "", prompt: str = "") -> classify_pb2.ClassifyRequest:
    """Classify options: `activation` (False: raw logits), and truncation, dtype and prompts as
    embed_request."""
    request = classify_pb2.ClassifyRequest(
        model=model, adapter=adapter, inputs=to_inputs(texts), prompt_name=prompt_name,
        prompt=prompt,
        output_dtype=_choice("dtype", dtype, DTYPES))
    if activation is not None:
        request.activation = activation
    _truncation(request, truncate, truncation_side)
    return request


def score_request(queries: Text | Sequence[Text], documents: Text | Sequence[Text], *,
                  model: str = "", adapter: str = "", activation: bool | None = None,
                  truncate: bool | int | None = None, truncation_side: str = "right",
                  hybrid_weights: dict[str, float] | None = None) -> score_pb2.ScoreRequest:
    """Pairs 1:N, N:1 or N:N (zipped). `activation` False: a cross-encoder's raw logit, a
    CLIP/SigLIP model's logits. `hybrid_weights` {"dense", "sparse", "multi_vector"}: BGE-M3's
    weighted mix of its three scores."""
    request = score_pb2.ScoreRequest(model=model, adapter=adapter, queries=to_inputs(queries),
                                     documents=to_inputs(documents))
    _hybrid(request, hybrid_weights)
    if activation is not None:
        request.activation = activation
    _truncation(request, truncate, truncation_side)
    return request


def rerank_request(query: Text, documents: Text | Sequence[Text], *, model: str = "",
                   adapter: str = "", top_n: int = 0, return_documents: bool = False,
                   activation: bool | None = None, truncate: bool | int | None = None,
                   truncation_side: str = "right",
                   hybrid_weights: dict[str, float] | None = None) -> score_pb2.RerankRequest:
    """`top_n`: keep the best n (0: all); `return_documents`: send each document's text back;
    `hybrid_weights` as score_request."""
    request = score_pb2.RerankRequest(model=model, adapter=adapter, query=to_input(query),
                                      documents=to_inputs(documents), top_n=top_n,
                                      return_documents=return_documents)
    _hybrid(request, hybrid_weights)
    if activation is not None:
        request.activation = activation
    _truncation(request, truncate, truncation_side)
    return request


def _hybrid(request, weights: dict[str, float] | None) -> None:
    if weights is None:
        return
    if unknown := sorted(set(weights) - {"dense", "sparse", "multi_vector"}):
        raise ValueError(f"hybrid_weights has unknown keys {unknown}; accepted: 'dense', "
                         "'sparse', 'multi_vector'")
    request.hybrid_weights.CopyFrom(score_pb2.HybridWeights(**weights))


def encode_request(texts: Text | Sequence[Text], *, model: str = "", adapter: str = "",
                   task: str | None = None,
                   normalize: bool | None = None, activation: bool | None = None,
                   truncate: bool | int | None = None, truncation_side: str = "right",
                   dtype: str = "float32", prompt_name: str = "",
                   prompt: str = "", return_offsets: bool = False,
                   input_role: str | None = None) -> encode_pb2.EncodeRequest:
    """`task`: "token_embed", "token_classify", "reward", "embed" or "classify" (None: the
    model's default task); `return_offsets`: each row's character span (per-token tasks);
    `input_role`: "query" or "document" (multi-vector models); other options as embed_request
    and classify_request."""
    request = encode_pb2.EncodeRequest(
        model=model, adapter=adapter, inputs=to_inputs(texts), prompt_name=prompt_name,
        prompt=prompt,
        return_offsets=return_offsets,
        input_role=common_pb2.INPUT_ROLE_UNSPECIFIED if input_role is None
        else _choice("input_role", input_role, ROLES),
        output_dtype=_choice("dtype", dtype, DTYPES),
        task=common_pb2.TASK_UNSPECIFIED if task is None else _choice("task", task, TASKS))
    if normalize is not None:
        request.normalize = normalize
    if activation is not None:
        request.activation = activation
    _truncation(request, truncate, truncation_side)
    return request


def tokenize_request(texts: str | Sequence[str], *, model: str = "",
                     add_special_tokens: bool | None = None, prompt_name: str = "",
                     prompt: str = "", truncate: bool | int | None = None,
                     truncation_side: str = "right") -> model_pb2.TokenizeRequest:
    """The ids a model would see for each text (the prompt and truncation applied)."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("tokenize takes texts (str)")
    request = model_pb2.TokenizeRequest(model=model, texts=texts, prompt_name=prompt_name,
                                        prompt=prompt)
    if add_special_tokens is not None:
        request.add_special_tokens = add_special_tokens
    _truncation(request, truncate, truncation_side)
    return request
