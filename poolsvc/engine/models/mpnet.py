"""MPNet encoders (all-mpnet-base-v2, multi-qa-mpnet, ...) on packed tokens.

BERT's layers under MPNet's names, with no token types, positions counted from padding_idx + 1
as in RoBERTa, and a relative-position bias added to every layer's attention scores: one
[heads] row of `encoder.relative_attention_bias` per bucket of the distance between two tokens.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn

from poolsvc.engine.backend import Backend
from poolsvc.engine.description import Kind
from poolsvc.engine.layers import varlen_attention
from poolsvc.engine.models.bert import (
    BertConfig,
    BertIntermediate,
    BertResidualOutput,
    num_labels_of,
)
from poolsvc.engine.models.roberta import RobertaClassificationHead
from poolsvc.engine.packing import PackedBatch
from poolsvc.engine.params import PoolingType

# transformers' MPNetEncoder.compute_position_bias always buckets with these, whatever the
# config's relative_attention_num_buckets (which sizes the table).
NUM_BUCKETS = 32
MAX_DISTANCE = 128


@dataclass(frozen=True)
class MPNetConfig(BertConfig):
    relative_attention_num_buckets: int = NUM_BUCKETS

    @classmethod
    def from_hf(cls, config: dict) -> MPNetConfig:
        cfg = super().from_hf(config)
        if cfg.relative_attention_num_buckets < NUM_BUCKETS:
            raise ValueError(f"relative_attention_num_buckets {cfg.relative_attention_num_buckets}"
                             f" is too small: transformers computes {NUM_BUCKETS} buckets")
        return cfg


def relative_position_bucket(relative_position: torch.Tensor) -> torch.Tensor:
    """transformers' MPNetEncoder.relative_position_bucket (T5's, bidirectional), same
    float steps so the buckets are the same."""
    num_buckets = NUM_BUCKETS // 2
    n = -relative_position
    ret = (n < 0).to(torch.long) * num_buckets
    n = n.abs()
    max_exact = num_buckets // 2
    large = max_exact + (torch.log(n.float() / max_exact) / math.log(MAX_DISTANCE / max_exact)
                         * (num_buckets - max_exact)).to(torch.long)
    large = large.clamp(max=num_buckets - 1)
    return ret + torch.where(n < max_exact, n, large)


class MPNetEmbeddings(nn.Module):
    def __init__(self, cfg: MPNetConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        x = self.word_embeddings(batch.input_ids) + self.position_embeddings(batch.positions)
        return self.LayerNorm(x)  # [num_tokens, hidden]


class MPNetSelfAttention(nn.Module):
    def __init__(self, cfg: MPNetConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.q = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.k = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.v = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.o = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, batch: PackedBatch, bias) -> torch.Tensor:
        shape = (x.shape[0], self.num_heads, -1)  # [num_tokens, heads, head_dim]
        q, k, v = (proj(x).view(shape) for proj in (self.q, self.k, self.v))
        return self.o(varlen_attention(q, k, v, batch, bias=bias).flatten(1))


class MPNetAttention(nn.Module):
    def __init__(self, cfg: MPNetConfig):
        super().__init__()
        self.attn = MPNetSelfAttention(cfg)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, batch: PackedBatch, bias) -> torch.Tensor:
        return self.LayerNorm(self.attn(x, batch, bias) + x)


class MPNetLayer(nn.Module):
    def __init__(self, cfg: MPNetConfig):
        super().__init__()
        self.attention = MPNetAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertResidualOutput(cfg.intermediate_size, cfg)

    def forward(self, x: torch.Tensor, batch: PackedBatch, bias) -> torch.Tensor:
        x = self.attention(x, batch, bias)
        return self.output(self.intermediate(x), x)


class MPNetEncoder(nn.Module):
    def __init__(self, cfg: MPNetConfig):
        super().__init__()
        self.layer = nn.ModuleList(MPNetLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets,
                                                    cfg.num_attention_heads)

    def position_bias(self, width: int) -> torch.Tensor:
        """[heads, width, width]: the bias of query i on key j, for a sequence padded to
        `width` (it depends on j - i only, so every sequence shares it)."""
        position = torch.arange(width, device=self.relative_attention_bias.weight.device)
        relative = position[None, :] - position[:, None]  # [width, width], key - query
        return self.relative_attention_bias(relative_position_bucket(relative)).permute(2, 0, 1)


class MPNetModel(Backend):
    """Returns the last hidden states, [num_tokens, hidden], of a packed batch."""

    weight_prefix = "mpnet."
    # transformers' MPNetEmbeddings fixes padding_idx at 1: positions start at 2
    position_offset = 2
    default_pooling = PoolingType.CLS

    def __init__(self, cfg: MPNetConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = MPNetEmbeddings(cfg)
        self.encoder = MPNetEncoder(cfg)

    @classmethod
    def from_hf_config(cls, config: dict) -> MPNetModel:
        return cls(cls.parse_config(config))

    @classmethod
    def parse_config(cls, config: dict) -> MPNetConfig:
        cfg = MPNetConfig.from_hf(config)
        if cfg.max_position_embeddings <= cls.position_offset:
            raise ValueError(f"max_position_embeddings {cfg.max_position_embeddings} leaves no "
                             f"positions after the offset of {cls.position_offset}")
        return cfg

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def max_positions(self) -> int:
        return self.config.max_position_embeddings - self.position_offset

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        # one bias per bucket width, shared by every layer of this pass
        cached = functools.lru_cache(maxsize=None)(self.encoder.position_bias)

        def bias(q, k):  # [heads, width, width] for q, k [num_seqs, heads, width, head_dim]
            return cached(q.shape[-2])

        x = self.embeddings(batch)
        for layer in self.encoder.layer:
            x = layer(x, batch, bias)
        return x


class MPNetForSequenceClassification(MPNetModel):
    """The body's forward; `head` turns pooled <s> states into logits (RoBERTa's head)."""

    kind = Kind.CLASSIFIER
    head_pooling = PoolingType.CLS

    def __init__(self, cfg: MPNetConfig, num_labels: int):
        super().__init__(cfg)
        self.classifier = RobertaClassificationHead(cfg, num_labels)

    @classmethod
    def from_hf_config(cls, config: dict) -> MPNetForSequenceClassification:
        return cls(cls.parse_config(config), num_labels_of(config))

    @property
    def num_labels(self) -> int:
        return self.classifier.out_proj.out_features

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(pooled)  # [rows, num_labels]


class MPNetForTokenClassification(MPNetModel):
    """Per-token labels: `head` turns every token's state into label logits."""

    kind = Kind.CLASSIFIER
    head_pooling = PoolingType.ALL

    def __init__(self, cfg: MPNetConfig, num_labels: int):
        super().__init__(cfg)
        self.classifier = nn.Linear(cfg.hidden_size, num_labels)

    @classmethod
    def from_hf_config(cls, config: dict) -> MPNetForTokenClassification:
        return cls(cls.parse_config(config), num_labels_of(config))

    @property
    def num_labels(self) -> int:
        return self.classifier.out_features

    def head(self, rows: torch.Tensor) -> torch.Tensor:
        return self.classifier(rows)  # [tokens, num_labels]
