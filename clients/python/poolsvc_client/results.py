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


def embeddings(response) -> np.ndarray:
    return decode_tensor(response.embeddings)  # [N, D]


def classification(response) -> Classification:
    return Classification(decode_tensor(response.probs), list(response.labels))


def scores(response) -> np.ndarray:
    return decode_tensor(response.scores)  # [N]


def ranking(response) -> list[RerankResult]:
    return [RerankResult(r.index, r.score, r.document) for r in response.results]


def encodings(response) -> list[np.ndarray]:
    return [decode_tensor(t) for t in response.outputs]  # one per input, e.g. [num_tokens, D]


def token_ids(response) -> list[list[int]]:
    return [list(r.ids) for r in response.results]


def model_info(response):
    return response.info
