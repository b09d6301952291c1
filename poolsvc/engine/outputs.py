"""What the engine hands back (host arrays ready to be sent as packed bytes), and how a finished
request's pooled rows become it: chunk means finished, score pairs formed, numpy arrays made.
Runs on the finisher thread, while the device runs the next batch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from poolsvc.engine import bge_m3, compact
from poolsvc.engine.description import Kind, ModelDescription
from poolsvc.engine.late_interaction import maxsim
from poolsvc.engine.params import OutputDType, PoolingType, Task, Timing
from poolsvc.engine.pooler import finish_rows
from poolsvc.engine.request import now_ns
from poolsvc.engine.state import Request


def to_numpy(t: torch.Tensor, dtype: OutputDType) -> np.ndarray:
    """The array in its output dtype; bfloat16 as its raw bits in uint16 (numpy has no
    bfloat16); int8 / uint8 / packed bits as they were cast (engine/compact.py)."""
    if dtype is OutputDType.BFLOAT16:
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
    if dtype in compact.FLOATS:
        return t.to(compact.FLOATS[dtype]).contiguous().numpy()
    return t.contiguous().numpy()


@dataclass(frozen=True)
class Output:
    model: str                      # served name of the model that ran
    token_ids: list[list[int]]      # what the model saw, per input (per pair for cross-encoders)
    timing: Timing

    @property
    def prompt_lens(self) -> list[int]:
        return [len(t) for t in self.token_ids]


@dataclass(frozen=True)
class EmbedOutput(Output):
    embeddings: np.ndarray          # [num_inputs, dimensions] in `dtype`
    dtype: OutputDType
    is_sparse: ClassVar[bool] = False
    is_multi: ClassVar[bool] = False


@dataclass(frozen=True)
class SparseVector:
    """A sparse embedding: its non-zero weights, largest first, and their token ids (and the
    tokens' strings, when asked for)."""

    token_ids: np.ndarray           # [nnz] int32
    weights: np.ndarray             # [nnz] float32
    tokens: list[str] | None = None

    def dense(self, size: int) -> np.ndarray:
        """The full vector over a vocabulary of `size` tokens, float32."""
        out = np.zeros(size, dtype=np.float32)
        out[self.token_ids] = self.weights
        return out


@dataclass(frozen=True)
class SparseEmbedOutput(Output):
    """What Embed gives on a sparse model, in place of an EmbedOutput."""

    vectors: list[SparseVector]     # per input
    vocab_size: int
    is_sparse: ClassVar[bool] = True
    is_multi: ClassVar[bool] = False


@dataclass(frozen=True)
class MultiEmbedOutput(Output):
    """What Embed gives on a model with several embeddings (BGE-M3) asked for more than the
    dense one: each kind asked for, None for the others."""

    dense: np.ndarray | None                # [num_inputs, H] float32
    sparse: list[SparseVector] | None       # per input: its lexical weights
    multi_vector: list[np.ndarray] | None   # per input: [num_tokens - 1, D] float32
    vocab_size: int
    is_sparse: ClassVar[bool] = False
    is_multi: ClassVar[bool] = True


@dataclass(frozen=True)
class ClassifyOutput(Output):
    probs: np.ndarray               # [num_inputs, num_labels] in `dtype`
    dtype: OutputDType
    labels: list[str]


@dataclass(frozen=True)
class ScoreOutput(Output):
    scores: np.ndarray              # [num_pairs] float32


@dataclass(frozen=True)
class EncodeOutput(Output):
    task: Task
    outputs: list[np.ndarray]       # per input: [rows, D] (per-token tasks) or [D]
    dtype: OutputDType
    labels: list[str] = field(default_factory=list)  # classification tasks: the D columns
    offsets: list[list[tuple[int, int]]] | None = None  # per input, each row's characters


_OVERHEAD_PER_OUTPUT = 32  # a tensor's dtype, shape and framing, a usage entry


def response_bytes(req: Request, model: ModelDescription) -> int:
    """An upper bound of the output's size, known once the request is tokenized (before any of
    it is computed): per-token tasks give a row per token (STEP: at most one per token)."""
    options, task = req.options, req.call.task
    if task is Task.SCORE:
        return (4 + _OVERHEAD_PER_OUTPUT) * max(len(req.pairs), len(req.token_ids))
    if options.outputs is not None:  # BGE-M3: every token's vector and weight, a dense row
        per_token = 4 * model.multi_vector_dimensions + 8 + 24 * req.call.sparse.return_tokens
        return sum(map(len, req.token_ids)) * per_token + \
            len(req.token_ids) * (4 * model.hidden_size + _OVERHEAD_PER_OUTPUT)
    if options.method is PoolingType.SPLADE:  # (id, weight) pairs, and maybe the strings
        entries = min(req.call.sparse.top_k or model.vocab_size, model.vocab_size)
        per_entry = 8 + (24 if req.call.sparse.return_tokens else 0)
        return len(req.token_ids) * (entries * per_entry + _OVERHEAD_PER_OUTPUT)
    if task is Task.EMBED:
        width = options.dimensions or model.embed_dimensions
    elif task is Task.TOKEN_EMBED:
        width = model.embed_dimensions if model.kind is Kind.MULTI_VECTOR else model.hidden_size
    else:
        width = len(options.returned_token_ids or ()) or model.num_labels
    rows = sum(map(len, req.token_ids)) if options.method.per_token else len(req.token_ids)
    return rows * compact.row_bytes(options.out_dtype, width) + \
        _OVERHEAD_PER_OUTPUT * len(req.token_ids)


def build_output(req: Request) -> Output:
    """The finished request's output, by the form its caller asked for."""
    options, task = req.options, req.call.task
    rows = [finish_rows(row, options) if req.chunked(i) else row
            for i, row in enumerate(req.rows)]
    offsets = req.offsets
    if req.kept is not None:  # multi-vector: the rows scored (documents: no skip-list tokens)
        rows = [row if keep is None else row[torch.from_numpy(keep)]
                for row, keep in zip(rows, req.kept)]
        if offsets is not None:
            offsets = [spans if keep is None else [spans[k] for k in keep]
                       for spans, keep in zip(offsets, req.kept)]
    common = dict(model=req.model_name, token_ids=req.token_ids, timing=req.timing(now_ns()))
    if options.outputs is not None:
        return _m3(req, rows, common)
    if task is Task.SCORE:
        return _score(req, rows, common)
    if options.method is PoolingType.SPLADE:
        return SparseEmbedOutput(vectors=[_sparse(r, req) for r in rows],
                                 vocab_size=rows[0].shape[-1], **common)
    dtype = options.out_dtype
    if req.call.raw:
        classes = task in (Task.CLASSIFY, Task.TOKEN_CLASSIFY) and \
            options.returned_token_ids is None
        return EncodeOutput(task=task, outputs=[to_numpy(r, dtype) for r in rows], dtype=dtype,
                            labels=list(req.labels) if classes else [], offsets=offsets,
                            **common)
    stacked = to_numpy(torch.stack(rows), dtype)  # [num_inputs, D]
    if task is Task.EMBED:
        return EmbedOutput(embeddings=stacked, dtype=dtype, **common)
    if task is Task.CLASSIFY:
        return ClassifyOutput(probs=stacked, dtype=dtype, labels=list(req.labels), **common)
    raise ValueError(f"{task.value} has no output of its own; it is served through Encode")


def _sparse(row: torch.Tensor, req: Request) -> SparseVector:
    """A row of vocabulary weights as its non-zero entries, largest first (ties: lower id
    first), cut to the request's top_k."""
    weights = row.float().numpy()
    ids = np.flatnonzero(weights)
    ids = ids[np.argsort(-weights[ids], kind="stable")]
    if req.call.sparse.top_k:
        ids = ids[:req.call.sparse.top_k]
    tokens = req.token_strings(ids) if req.token_strings is not None else None
    return SparseVector(ids.astype(np.int32), weights[ids].astype(np.float32), tokens)


def _m3(req: Request, rows: list[torch.Tensor], common: dict) -> Output:
    """BGE-M3's embeddings of each input, or Score's hybrid mix of them per pair."""
    outputs = req.options.outputs
    embeds = [bge_m3.unpack(row, ids, outputs, req.m3) for row, ids in zip(rows, req.token_ids)]
    if req.call.task is Task.SCORE:
        common["token_ids"] = [req.token_ids[q] + req.token_ids[d] for q, d in req.pairs]
        scores = [bge_m3.hybrid_scores(embeds[q], embeds[d], req.call.hybrid)
                  for q, d in req.pairs]
        return ScoreOutput(scores=np.asarray(scores, dtype=np.float32), **common)
    sparse = None
    if bge_m3.EmbeddingType.SPARSE in outputs:
        sparse = []
        for e in embeds:
            ids, weights = bge_m3.sparse_arrays(e.lexical)
            if req.call.sparse.top_k:
                ids, weights = ids[:req.call.sparse.top_k], weights[:req.call.sparse.top_k]
            tokens = req.token_strings(ids) if req.token_strings is not None else None
            sparse.append(SparseVector(ids, weights, tokens))
    dense = torch.stack([e.dense for e in embeds]).numpy() \
        if bge_m3.EmbeddingType.DENSE in outputs else None
    vectors = [e.multi_vector.numpy() for e in embeds] \
        if bge_m3.EmbeddingType.MULTI_VECTOR in outputs else None
    return MultiEmbedOutput(dense=dense, sparse=sparse, multi_vector=vectors,
                            vocab_size=req.m3.vocab_size, **common)


def _score(req: Request, rows: list[torch.Tensor], common: dict) -> ScoreOutput:
    if not req.pairs:  # a cross-encoder: its activated logit per pair
        return ScoreOutput(scores=torch.stack(rows)[:, 0].float().numpy(), **common)
    common["token_ids"] = [req.token_ids[q] + req.token_ids[d] for q, d in req.pairs]
    if req.maxsim is not None:  # a multi-vector model: MaxSim of each pair's token vectors
        mean = req.maxsim == "mean"
        scores = torch.stack([maxsim(rows[q], rows[d], mean) for q, d in req.pairs])
        return ScoreOutput(scores=scores.numpy(), **common)
    # a bi-encoder: the cosine of each pair's two embeddings, in float32
    vectors = torch.stack(rows).float()
    queries, documents = zip(*req.pairs)
    scores = F.cosine_similarity(vectors[list(queries)], vectors[list(documents)], dim=-1)
    if req.logit is not None:  # CLIP / SigLIP logits: the cosine scaled and shifted
        scale, bias = req.logit
        scores = scores * scale + bias
    return ScoreOutput(scores=scores.numpy(), **common)
