"""The pooling step, as vLLM structures it: method -> head -> activation, then the embedding
options (Matryoshka truncation, normalization) and the output dtype. Runs on the device after
the forward pass, on packed hidden states [num_tokens, hidden] with cu_seqlens, for only the
sequences a set of options applies to.

`options_for` decides, once, which of a request's options apply to its task on its model, and
fills the rest from the model's defaults; `pool` then computes with exactly those options.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import nn

from poolsvc.engine import compact
from poolsvc.engine.description import Kind, ModelDescription
from poolsvc.engine.errors import InvalidInputError
from poolsvc.engine.fused import kernels
from poolsvc.engine.packing import PackedBatch
from poolsvc.engine.params import (
    Activation,
    EmbeddingType,
    OutputDType,
    PoolingType,
    Splade,
    Task,
)
from poolsvc.engine.request import PoolingRequest

# Sequence methods the Triton pooling kernel implements (with dimensions, normalize, dtype).
_KERNEL_METHODS = (PoolingType.CLS, PoolingType.LAST, PoolingType.MEAN)


class Head(enum.Enum):
    NONE = "none"      # the pooled hidden states themselves
    DENSE = "dense"    # Sentence-Transformers Dense modules
    MODEL = "model"    # the checkpoint's classification / reward head (a dual encoder's towers)
    M3 = "m3"          # BGE-M3's heads: several embeddings of the same hidden states


@dataclass(frozen=True)
class PoolerOptions:
    """Every option of the pooling step for one request on one model. Hashable: a batch pools
    each distinct set of options once, over the sequences that share it."""

    method: PoolingType
    head: Head
    activation: Activation = Activation.IDENTITY
    normalize: bool = False
    dimensions: int | None = None
    out_dtype: OutputDType = OutputDType.FLOAT32
    int8_range: float | None = None  # int8 / uint8 outputs: quantized over [-r, r]
    step_tag_id: int | None = None
    returned_token_ids: tuple[int, ...] | None = None
    splade: Splade | None = None  # SPLADE: its strategy and activation
    # BGE-M3: the embeddings each sequence gives (engine/bge_m3.py); None: one output
    outputs: frozenset[EmbeddingType] | None = None

    def for_chunks(self) -> PoolerOptions:
        """What each chunk of a chunked input is pooled with: raw float32 rows, so their
        token-weighted mean can be finished (`finish_rows`) once the last chunk is in."""
        return PoolerOptions(self.method, self.head)


# --- which options apply, decided once -----------------------------------------------------------

# The request options each task takes; any other option set on a request is an error.
_TASK_OPTIONS = {
    Task.EMBED: {"normalize", "dimensions"},
    Task.TOKEN_EMBED: {"normalize"},
    Task.CLASSIFY: {"activation"},
    Task.SCORE: {"activation"},
    Task.REWARD: {"activation"},
    Task.TOKEN_CLASSIFY: {"activation"},
}


def options_for(request: PoolingRequest, model: ModelDescription) -> PoolerOptions:
    """The pooling of `request` on `model`: the request's options where it sets them, else the
    server's --pooler-config, else the model's files and defaults. Options that mean nothing for
    the task (or this model's way of computing it) are errors, never silently ignored."""
    task, params = request.task, request.params
    model.check_task(task)
    allowed = set(_TASK_OPTIONS[task])
    if task is Task.SCORE and (model.scores_by_cosine or model.kind is Kind.MULTI_VECTOR) and \
            model.kind is not Kind.DUAL_ENCODER:
        allowed.discard("activation")  # a bi-encoder's score is the cosine, nothing to activate
    if request.raw and params.dimensions is not None:  # Encode returns the task's raw output
        raise InvalidInputError("dimensions does not apply to encode; leave it unset")
    for name in ("normalize", "dimensions", "activation"):
        if getattr(params, name) is not None and name not in allowed:
            raise InvalidInputError(f"{name} does not apply to {_what(request, model)}; leave it "
                                    "unset")
    vectors = task in (Task.EMBED, Task.TOKEN_EMBED)
    if params.out_dtype.compact and not vectors:
        raise InvalidInputError(f"output_dtype {params.out_dtype.value} applies to embeddings "
                                f"(embed, token_embed), not to {_what(request, model)}")
    if request.offsets and not (request.raw and task.per_token and
                                model.token_pooling is PoolingType.ALL):
        raise InvalidInputError("return_offsets applies to Encode's per-token outputs (a row "
                                "per token: token_classify, token_embed); leave it unset")
    if request.role is not None and model.kind is not Kind.MULTI_VECTOR:
        raise InvalidInputError(f"input_role applies to late-interaction (multi-vector) models; "
                                f"{model.name} is {model.kind.value}: leave it unset")
    if request.hybrid is not None and not model.bge_m3:
        raise InvalidInputError(f"hybrid_weights applies to models with several embeddings "
                                f"(BGE-M3); {model.name} is {model.kind.value}: leave it unset")
    types = request.embedding_types
    if types and not types <= model.embedding_types:
        wrong = sorted(t.name for t in types - model.embedding_types)
        raise InvalidInputError(f"embedding_types {', '.join(wrong)}: {model.name} gives "
                                f"{', '.join(t.name for t in model.embedding_types) or 'none'}")
    if model.bge_m3 and (request.hybrid is not None or types - {EmbeddingType.DENSE}):
        return _m3_options(request, model)
    if model.kind is Kind.SPARSE:
        return _sparse_options(request, model)
    if request.sparse.requested:
        field = "sparse_top_k" if request.sparse.top_k else "return_tokens"
        if model.bge_m3:
            raise InvalidInputError(f"{field} applies to sparse embeddings: add SPARSE to "
                                    "embedding_types, or leave it unset")
        raise InvalidInputError(f"{field} applies to sparse models (SPLADE); {model.name} is "
                                f"{model.kind.value}: leave it unset")
    if model.kind is Kind.MULTI_VECTOR:
        return _multi_vector_options(request, model)
    if task is Task.EMBED or (task is Task.SCORE and model.scores_by_cosine):
        model.check_dimensions(params.dimensions)
        normalize = True if task is Task.SCORE else \
            _pick(params.normalize, model.normalize_default)
        width = params.dimensions or model.embed_dimensions
        return PoolerOptions(model.pooling_type, _embed_head(model), normalize=normalize,
                             dimensions=params.dimensions, out_dtype=params.out_dtype,
                             int8_range=_int8_range(params.out_dtype, normalize, width, model))
    if task is Task.TOKEN_EMBED:
        normalize = _pick(params.normalize, model.normalize_default)
        return PoolerOptions(PoolingType.ALL, Head.NONE, normalize=normalize,
                             out_dtype=params.out_dtype,
                             int8_range=_int8_range(params.out_dtype, normalize,
                                                    model.hidden_size, model))
    activation = model.activation(task, params.activation)
    if task.per_token:
        return PoolerOptions(model.token_pooling, Head.MODEL, activation,
                             out_dtype=params.out_dtype, step_tag_id=model.step_tag_id,
                             returned_token_ids=model.returned_token_ids)
    return PoolerOptions(model.pooling_type, Head.MODEL, activation, out_dtype=params.out_dtype)


def _sparse_options(request: PoolingRequest, model: ModelDescription) -> PoolerOptions:
    """A sparse model's embedding: the non-zero weights over its vocabulary, in float32."""
    params = request.params
    for name in ("normalize", "dimensions"):
        if getattr(params, name) is not None:
            raise InvalidInputError(f"{name} does not apply to sparse model {model.name} (its "
                                    "vectors are weights over the vocabulary); leave it unset")
    if params.out_dtype is not OutputDType.FLOAT32:
        raise InvalidInputError(f"output_dtype {params.out_dtype.value} does not apply to sparse "
                                f"model {model.name}: its weights are float32; leave it unset")
    return PoolerOptions(PoolingType.SPLADE, Head.MODEL, splade=model.splade)


def _m3_options(request: PoolingRequest, model: ModelDescription) -> PoolerOptions:
    """BGE-M3's embeddings from one forward pass: those Embed asks for, or those a hybrid
    score weighs above 0; in float32, the dense one normalized as the model is."""
    params = request.params
    if request.hybrid is not None:
        return PoolerOptions(PoolingType.CLS, Head.M3, normalize=True,
                             outputs=request.hybrid.types)
    if params.dimensions is not None or params.out_dtype is not OutputDType.FLOAT32:
        field = "dimensions" if params.dimensions is not None else "output_dtype"
        raise InvalidInputError(f"{field} applies to dense embeddings alone; with sparse or "
                                "multi-vector embedding_types leave it unset")
    if request.sparse.requested and EmbeddingType.SPARSE not in request.embedding_types:
        field = "sparse_top_k" if request.sparse.top_k else "return_tokens"
        raise InvalidInputError(f"{field} applies to sparse embeddings: add SPARSE to "
                                "embedding_types, or leave it unset")
    if model.chunk_size is not None:
        raise InvalidInputError("sparse and multi-vector embedding_types are not computed in "
                                "chunks: serve the model without enable_chunked_processing")
    return PoolerOptions(PoolingType.CLS, Head.M3,
                         normalize=_pick(params.normalize, model.normalize_default),
                         outputs=frozenset(request.embedding_types))


def _multi_vector_options(request: PoolingRequest, model: ModelDescription) -> PoolerOptions:
    """A multi-vector model's token vectors: every token through the Dense projection, then
    normalized (as the model's files say, unless the request says otherwise). Score's MaxSim
    takes them in float32, normalized as the model is."""
    params = request.params
    if request.task is Task.SCORE:
        return PoolerOptions(PoolingType.ALL, Head.DENSE, normalize=model.normalize_default)
    normalize = _pick(params.normalize, model.normalize_default)
    return PoolerOptions(PoolingType.ALL, Head.DENSE, normalize=normalize,
                         out_dtype=params.out_dtype,
                         int8_range=_int8_range(params.out_dtype, normalize,
                                                model.embed_dimensions, model))


def _int8_range(dtype: OutputDType, normalize: bool, width: int,
                model: ModelDescription) -> float | None:
    """The range int8 / uint8 outputs are quantized over: the model's configured one, else the
    one of L2-normalized vectors (an unnormalized output has no scale to assume)."""
    if dtype not in compact.INTEGERS:
        return None
    configured = model.pooler_config.quantization_range
    if configured is not None:
        return float(configured)
    if not normalize:
        raise InvalidInputError(
            f"output_dtype {dtype.value} quantizes normalized embeddings; with normalize=false "
            "the model needs a range: --pooler-config '{\"quantization_range\": R}'")
    return compact.default_range(width)


def _embed_head(model: ModelDescription) -> Head:
    if model.kind is Kind.DUAL_ENCODER:
        return Head.MODEL  # the towers' own projections
    return Head.DENSE if model.has_dense else Head.NONE


def _what(request: PoolingRequest, model: ModelDescription) -> str:
    if request.task is Task.SCORE and model.scores_by_cosine:
        return f"score with embedding model {model.name} (the score is a cosine)"
    if request.task is Task.SCORE and model.kind is Kind.MULTI_VECTOR:
        return f"score with multi-vector model {model.name} (the score is MaxSim)"
    return request.task.value


def _pick(requested: bool | None, default: bool) -> bool:
    return default if requested is None else requested


# --- the step itself, on the device --------------------------------------------------------------

def pool(hidden: torch.Tensor, batch: PackedBatch, index: torch.Tensor | None,
         options: PoolerOptions, head: Callable[[torch.Tensor], torch.Tensor] | None,
         use_kernel: bool = False) -> tuple[torch.Tensor, list[int] | None]:
    """The sequences `index` of the batch (None: all), pooled with `options`: rows [n, D] in the
    output dtype, one per sequence, or for per-token methods the rows of every kept token and
    how many belong to each sequence."""
    if options.outputs is not None:  # BGE-M3: a flat row of several embeddings per sequence
        lengths = list(batch.prompt_lens)
        if index is not None:
            hidden, _ = _select(hidden, batch.cu_seqlens, index)
            lengths = [lengths[i] for i in index.tolist()]
        return head(hidden, lengths, options.outputs, options.normalize)
    if options.method is PoolingType.SPLADE:
        return splade_rows(hidden, batch, index, head, options.splade), None
    if options.method.per_token:
        rows, counts = token_rows(options.method, hidden, batch, index, options.step_tag_id)
    elif use_kernel and options.method in _KERNEL_METHODS and head is None:
        pooled = kernels().pool(hidden, batch.cu_seqlens, options.method, options.dimensions,
                                options.normalize,
                                compact.FLOATS.get(options.out_dtype, torch.float32),
                                seq_index=index)
        return compact.cast(pooled.float(), options.out_dtype, options.int8_range) \
            if options.out_dtype.compact else pooled, None
    elif use_kernel and options.method in _KERNEL_METHODS:
        rows, counts = kernels().pool(hidden, batch.cu_seqlens, options.method,
                                      seq_index=index), None
    else:
        rows, counts = sequence_rows(options.method, hidden, batch.cu_seqlens, index), None
    if head is not None:
        rows = head(rows)  # [n, out_features]
    return finish_rows(rows, options), counts


def finish_rows(rows: torch.Tensor, options: PoolerOptions) -> torch.Tensor:
    """activation -> returned columns -> Matryoshka truncation -> L2 normalization -> output
    dtype (engine/compact.py), in float32. Normalizing after truncation gives the kept prefix
    norm 1 (TEI's order)."""
    rows = rows.float()
    if options.returned_token_ids is not None:
        rows = rows[..., list(options.returned_token_ids)]
    rows = activate(rows, options.activation)
    if options.dimensions is not None:
        rows = rows[..., :options.dimensions]
    if options.normalize:
        rows = F.normalize(rows, p=2.0, dim=-1)
    return compact.cast(rows, options.out_dtype, options.int8_range)


def activate(x: torch.Tensor, activation: Activation) -> torch.Tensor:
    if activation is Activation.SIGMOID:
        return torch.sigmoid(x)
    if activation is Activation.SOFTMAX:
        return torch.softmax(x, dim=-1)
    if activation is Activation.TANH:
        return torch.tanh(x)
    return x


# --- methods: packed tokens -> rows --------------------------------------------------------------

def sequence_rows(method: PoolingType, hidden: torch.Tensor, cu_seqlens: torch.Tensor,
                  index: torch.Tensor | None) -> torch.Tensor:
    """One float32 row per sequence of `index` (None: every sequence): [n, hidden]."""
    if method is PoolingType.CLS:
        starts = cu_seqlens[:-1].long()
        return hidden[starts if index is None else starts[index]].float()
    if method is PoolingType.LAST:
        ends = cu_seqlens[1:].long() - 1
        return hidden[ends if index is None else ends[index]].float()
    if index is not None:
        hidden, cu_seqlens = _select(hidden, cu_seqlens, index)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).float()[:, None]  # [n, 1]
    if method is PoolingType.MAX:
        out = hidden.new_full((lengths.shape[0], hidden.shape[1]), float("-inf"),
                              dtype=torch.float32)
        seq = _seq_of_token(cu_seqlens, hidden.shape[0])[:, None].expand(-1, hidden.shape[1])
        return out.scatter_reduce_(0, seq, hidden.float(), reduce="amax")
    if method is PoolingType.MEAN:
        return _segment_sum(hidden, cu_seqlens) / lengths
    if method is PoolingType.MEAN_SQRT_LEN:
        return _segment_sum(hidden, cu_seqlens) / lengths.sqrt()
    if method is PoolingType.WEIGHTED_MEAN:  # Sentence-Transformers: token i weighs i + 1
        seq = _seq_of_token(cu_seqlens, hidden.shape[0])
        weights = torch.arange(1, hidden.shape[0] + 1, device=hidden.device) - \
            cu_seqlens[:-1].long()[seq]  # [num_tokens] 1-based position in its sequence
        return _segment_sum(hidden, cu_seqlens, weights.float()) / (lengths * (lengths + 1) / 2)
    raise ValueError(f"{method} is not a sequence pooling method")


# Tokens whose vocabulary logits are computed at once: 256 x 30,522 float32 logits are 31 MiB.
SPLADE_TOKENS = 256


def splade_rows(hidden: torch.Tensor, batch: PackedBatch, index: torch.Tensor | None,
                head: Callable[[torch.Tensor], torch.Tensor], splade: Splade) -> torch.Tensor:
    """SPLADE: log(1 + relu(logits)) of every token (log1p once more for "log1p_relu"), max or
    summed over each sequence's tokens: [n, vocab] float32. The logits are made SPLADE_TOKENS
    tokens at a time, so a batch never holds [num_tokens, vocab] at once, and each sequence's
    part of a block is reduced as one contiguous slice."""
    lengths = list(batch.prompt_lens)
    if index is not None:
        hidden, _ = _select(hidden, batch.cu_seqlens, index)
        lengths = [lengths[i] for i in index.tolist()]
    bounds = list(accumulate(lengths, initial=0))  # sequence s is rows bounds[s]:bounds[s + 1]
    out, seq = None, 0
    for start in range(0, hidden.shape[0], SPLADE_TOKENS):
        stop = min(start + SPLADE_TOKENS, hidden.shape[0])
        weights = head(hidden[start:stop]).float().relu_().log1p_()
        if splade.activation == "log1p_relu":
            weights.log1p_()
        if out is None:  # every weight is >= 0, so 0 is the identity of both reductions
            out = weights.new_zeros(len(lengths), weights.shape[1])
        while seq < len(lengths) and bounds[seq] < stop:
            part = weights[max(bounds[seq], start) - start:min(bounds[seq + 1], stop) - start]
            if splade.strategy == "max":
                torch.maximum(out[seq], part.amax(0), out=out[seq])
            else:
                out[seq] += part.sum(0)
            if bounds[seq + 1] > stop:
                break  # the sequence goes on in the next block
            seq += 1
    return out


def token_rows(method: PoolingType, hidden: torch.Tensor, batch: PackedBatch,
               index: torch.Tensor | None, step_tag_id: int | None
               ) -> tuple[torch.Tensor, list[int]]:
    """ALL: every token's row. STEP: the rows at step-tag tokens (every token when no tag is
    configured). Returns the rows [rows, hidden] of the sequences `index` and each one's count."""
    input_ids, cu_seqlens = batch.input_ids, batch.cu_seqlens
    if index is not None:
        rows = _token_index(cu_seqlens, index)
        hidden, input_ids = hidden[rows], input_ids[rows]
        cu_seqlens = _sub_cu_seqlens(cu_seqlens, index)
    if method is PoolingType.ALL or step_tag_id is None:
        return hidden, (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    keep = input_ids == step_tag_id  # [num_tokens]
    counts = torch.zeros(cu_seqlens.numel() - 1, dtype=torch.long, device=hidden.device)
    counts.index_add_(0, _seq_of_token(cu_seqlens, hidden.shape[0]), keep.long())
    return hidden[keep], counts.tolist()


def _seq_of_token(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device),
                                   lengths, output_size=num_tokens)  # [num_tokens]


def _segment_sum(hidden: torch.Tensor, cu_seqlens: torch.Tensor,
                 weights: torch.Tensor | None = None) -> torch.Tensor:
    values = hidden.float() if weights is None else hidden.float() * weights[:, None]
    # One sequence (a lone query): a plain sum. Building the token-to-sequence index cost a
    # one-text call 0.10 ms against the sum's 0.03 ms (MiniLM, measured inside the call).
    if cu_seqlens.numel() == 2:
        return values.sum(0, keepdim=True)
    sums = hidden.new_zeros(cu_seqlens.numel() - 1, hidden.shape[1], dtype=torch.float32)
    return sums.index_add_(0, _seq_of_token(cu_seqlens, hidden.shape[0]), values)


def _sub_cu_seqlens(cu_seqlens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1])[index]
    return F.pad(lengths.cumsum(0), (1, 0)).to(cu_seqlens.dtype)  # [n + 1]


def _token_index(cu_seqlens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The packed rows of the sequences `index`, in that order: [their tokens]."""
    starts, sub = cu_seqlens[:-1].long()[index], _sub_cu_seqlens(cu_seqlens, index).long()
    lengths = sub[1:] - sub[:-1]
    total = int(sub[-1])
    return torch.repeat_interleave(starts - sub[:-1], lengths, output_size=total) + \
        torch.arange(total, device=cu_seqlens.device)


def _select(hidden: torch.Tensor, cu_seqlens: torch.Tensor,
            index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return hidden[_token_index(cu_seqlens, index)], _sub_cu_seqlens(cu_seqlens, index)


class DenseHead(nn.Module):
    """Sentence-Transformers Dense modules, chained in order after pooling."""

    def __init__(self, layers: list[tuple[nn.Linear, Activation]]):
        super().__init__()
        self.linears = nn.ModuleList(linear for linear, _ in layers)
        self.activations = [act for _, act in layers]

    @property
    def out_features(self) -> int:
        return self.linears[-1].out_features

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        for linear, act in zip(self.linears, self.activations):
            rows = activate(linear(rows.to(linear.weight.dtype)), act)
        return rows
