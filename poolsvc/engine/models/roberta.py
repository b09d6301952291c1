"""RoBERTa and XLM-RoBERTa encoders (bge-m3, multilingual-e5, bge-reranker, ...) on packed tokens.

The layers are BERT's, under the same Hugging Face names; what differs is the checkpoint prefix,
positions that count from padding_idx + 1, and the classification head.
"""

from __future__ import annotations

import torch
from torch import nn

from poolsvc.engine.description import Kind
from poolsvc.engine.models.bert import (
    BertConfig,
    BertForTokenClassification,
    BertModel,
    num_labels_of,
)
from poolsvc.engine.params import PoolingType


class RobertaModel(BertModel):
    """Returns the last hidden states, [num_tokens, hidden], of a packed batch."""

    weight_prefix = "roberta."
    # fairseq numbers positions from padding_idx + 1 (pad_token_id 1), so the position table has
    # two rows more than the longest input.
    position_offset = 2

    @classmethod
    def parse_config(cls, config: dict) -> BertConfig:
        pad_token_id = config.get("pad_token_id", 1)
        if pad_token_id != cls.position_offset - 1:
            raise ValueError(f"pad_token_id {pad_token_id} is not supported: positions are "
                             f"numbered from {cls.position_offset} (pad_token_id 1)")
        cfg = super().parse_config(config)
        if cfg.max_position_embeddings <= cls.position_offset:
            raise ValueError(f"max_position_embeddings {cfg.max_position_embeddings} leaves no "
                             f"positions after the offset of {cls.position_offset}")
        return cfg


class XLMRobertaModel(RobertaModel):
    """The same network as RoBERTa with a larger, multilingual vocabulary."""


class RobertaClassificationHead(nn.Module):
    def __init__(self, cfg: BertConfig, num_labels: int):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, num_labels)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.out_proj(torch.tanh(self.dense(pooled)))


class RobertaForSequenceClassification(RobertaModel):
    """The body's forward; `head` turns pooled <s> states into logits. No pooler, unlike BERT."""

    kind = Kind.CLASSIFIER
    head_pooling = PoolingType.CLS

    def __init__(self, cfg: BertConfig, num_labels: int):
        super().__init__(cfg)
        self.classifier = RobertaClassificationHead(cfg, num_labels)

    @classmethod
    def from_hf_config(cls, config: dict) -> RobertaForSequenceClassification:
        return cls(cls.parse_config(config), num_labels_of(config))

    @property
    def num_labels(self) -> int:
        return self.classifier.out_proj.out_features

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(pooled)  # [rows, num_labels]


class XLMRobertaForSequenceClassification(RobertaForSequenceClassification):
    pass


class RobertaForTokenClassification(BertForTokenClassification, RobertaModel):
    """The same per-token classifier on a RoBERTa body (positions after padding_idx)."""


class XLMRobertaForTokenClassification(RobertaForTokenClassification):
    pass
