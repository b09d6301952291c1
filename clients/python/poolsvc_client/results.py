"""Responses as Python values: numpy arrays, and small records where an array is not enough."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from poolsvc_client.tensors import decode_tensor


@dataclass(frozen=True)
class Classification:
    """`probs[i, j]`: input i's probability (or logit, with activation=False) of `labels[j]`."""

    probs: np.ndarray  # [N, num_labels]
    labels: list[str]

    @property
    def predicted(self) -> list[str]:
        """The most likely label of each input."""
        return [self.labels[j] for j in self.probs.argmax(axis=1)]


@dataclass(frozen=True)
class RerankResult:
    """One document of a ranking: its position in the request, its score, and its text when
    return_documents was asked for."""

    index: int
    score: float
    document: str = ""


@dataclass(frozen=True)
class SparseVector:
    """A sparse model's embedding of one input: its non-zero weights, largest first, their
    vocabulary ids, and the tokens' strings when return_tokens was asked for."""

    token_ids: np.ndarray  # [nnz] int32
    weights: np.ndarray    # [nnz] float32
    tokens: list[str]
    dimensions: int        # the vocabulary size

    def to_dict(self) -> dict[int, float]:
        """{token id: weight}."""
        return dict(zip(self.token_ids.tolist(), self.weights.tolist()))

    def dense(self) -> np.ndarray:
        """The full vector over the vocabulary, [dimensions] float32."""
        out = np.zeros(self.dimensions, dtype=np.float32)
        out[self.token_ids] = self.weights
        return out


@dataclass(frozen=True)
class TokenLabels:
    """A token classifier's output for one text: `probs[t, j]`, token t's probability of
    `labels[j]`, and `offsets[t]`, token t's (start, end) characters in the text ((0, 0) for
    special tokens)."""

    probs: np.ndarray  # [num_tokens, num_labels]
    labels: list[str]
    offsets: list[tuple[int, int]]

    @property
    def predicted(self) -> list[str]:
        """The most likely label of each token."""
        return [self.labels[j] for j in self.probs.argmax(axis=1)]

    def spans(self, text: str) -> list[tuple[str, str]]:
        """(token text, predicted label) of each non-special token."""
        return [(text[a:b], label) for (a, b), label in zip(self.offsets, self.predicted)
                if b > a]


def embeddings(response) -> np.ndarray:
    if response.sparse_embeddings:
        raise ValueError(f"{response.model} is a sparse model: use embed_sparse")
    return decode_tensor(response.embeddings)  # [N, D]


def sparse_embeddings(response) -> list[SparseVector]:
    if not response.sparse_embeddings:
        raise ValueError(f"{response.model} is not a sparse model: use embed")
    return [SparseVector(np.frombuffer(v.token_ids, dtype="<i4"),
                         np.frombuffer(v.weights, dtype="<f4"), list(v.tokens),
                         response.sparse_dimensions) for v in response.sparse_embeddings]


@dataclass(frozen=True)
class MultiEmbedding:
    """A model's several embeddings of each input (BGE-M3), None where not asked for: `dense`
    [N, D], `sparse` (per input a SparseVector), `multi_vector` (per input [num_tokens, D])."""

    dense: np.ndarray | None
    sparse: list[SparseVector] | None
    multi_vector: list[np.ndarray] | None


def multi_embedding(response) -> MultiEmbedding:
    return MultiEmbedding(
        decode_tensor(response.embeddings) if response.HasField("embeddings") else None,
        sparse_embeddings(response) if response.sparse_embeddings else None,
        [decode_tensor(t) for t in response.multi_vector_embeddings]
        if response.multi_vector_embeddings else None)


def dense_or_sparse(response) -> np.ndarray | list[SparseVector]:
    return sparse_embeddings(response) if response.sparse_embeddings else embeddings(response)


def classification(response) -> Classification:
    return Classification(decode_tensor(response.probs), list(response.labels))


def scores(response) -> np.ndarray:
    return decode_tensor(response.scores)  # [N]


def ranking(response) -> list[RerankResult]:
    return [RerankResult(r.index, r.score, r.document) for r in response.results]


def encodings(response) -> list[np.ndarray]:
    return [decode_tensor(t) for t in response.outputs]  # one per input, e.g. [num_tokens, D]


def token_labels(response) -> list[TokenLabels]:
    return [TokenLabels(decode_tensor(t), list(response.labels),
                        [(o.start, o.end) for o in spans.offsets])
            for t, spans in zip(response.outputs, response.offsets)]


def token_ids(response) -> list[list[int]]:
    return [list(r.ids) for r in response.results]


def model_info(response):
    return response.info
