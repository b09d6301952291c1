"""DistilBERT encoders (msmarco-distilbert, distilbert NLI and sentiment classifiers, ...) on
packed tokens: BERT's post-norm layers under DistilBERT's names, no token types, and its
config's own spellings (dim, n_layers, n_heads, hidden_dim, activation)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from poolsvc.engine.backend import Backend
from poolsvc.engine.description import Kind
from poolsvc.engine.layers import activation, varlen_attention
from poolsvc.engine.models.bert import num_labels_of
from poolsvc.engine.packing import PackedBatch
from poolsvc.engine.params import PoolingType

LAYER_NORM_EPS = 1e-12  # fixed in transformers' DistilBERT


@dataclass(frozen=True)
class DistilBertConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    hidden_dim: int
    max_position_embeddings: int
    activation: str = "gelu"

    @classmethod
    def from_hf(cls, config: dict) -> DistilBertConfig:
        cfg = cls(**{k: config[k] for k in cls.__dataclass_fields__ if k in config})
        if cfg.dim % cfg.n_heads:
            raise ValueError("dim must be a multiple of n_heads")
        activation(cfg.activation, "activation")  # unknown names raise here, not later
        return cfg


class Embeddings(nn.Module):
    def __init__(self, cfg: DistilBertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        # sinusoidal_pos_embds checkpoints store the fixed table under the same name
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.dim)
        self.LayerNorm = nn.LayerNorm(cfg.dim, eps=LAYER_NORM_EPS)

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        x = self.word_embeddings(batch.input_ids) + self.position_embeddings(batch.positions)
        return self.LayerNorm(x)  # [num_tokens, dim]


class DistilBertSelfAttention(nn.Module):
    def __init__(self, cfg: DistilBertConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.q_lin = nn.Linear(cfg.dim, cfg.dim)
        self.k_lin = nn.Linear(cfg.dim, cfg.dim)
        self.v_lin = nn.Linear(cfg.dim, cfg.dim)
        self.out_lin = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        shape = (x.shape[0], self.n_heads, -1)  # [num_tokens, heads, head_dim]
        q, k, v = (proj(x).view(shape) for proj in (self.q_lin, self.k_lin, self.v_lin))
        return self.out_lin(varlen_attention(q, k, v, batch).flatten(1))


class FFN(nn.Module):
    def __init__(self, cfg: DistilBertConfig):
        super().__init__()
        self.lin1 = nn.Linear(cfg.dim, cfg.hidden_dim)
        self.lin2 = nn.Linear(cfg.hidden_dim, cfg.dim)
        self.activation = activation(cfg.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.activation(self.lin1(x)))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: DistilBertConfig):
        super().__init__()
        self.attention = DistilBertSelfAttention(cfg)
        self.sa_layer_norm = nn.LayerNorm(cfg.dim, eps=LAYER_NORM_EPS)
        self.ffn = FFN(cfg)
        self.output_layer_norm = nn.LayerNorm(cfg.dim, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        x = self.sa_layer_norm(self.attention(x, batch) + x)
        return self.output_layer_norm(self.ffn(x) + x)


class Transformer(nn.Module):
    def __init__(self, cfg: DistilBertConfig):
        super().__init__()
        self.layer = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))


class DistilBertModel(Backend):
    """Returns the last hidden states, [num_tokens, dim], of a packed batch."""

    weight_prefix = "distilbert."
    position_offset = 0
    default_pooling = PoolingType.CLS

    def __init__(self, cfg: DistilBertConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.transformer = Transformer(cfg)

    @classmethod
    def from_hf_config(cls, config: dict) -> DistilBertModel:
        return cls(DistilBertConfig.from_hf(config))

    @property
    def hidden_size(self) -> int:
        return self.config.dim

    @property
    def max_positions(self) -> int:
        return self.config.max_position_embeddings

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        x = self.embeddings(batch)
        for layer in self.transformer.layer:
            x = layer(x, batch)
        return x


class DistilBertForSequenceClassification(DistilBertModel):
    """The body's forward; `head`: pre_classifier, ReLU, classifier on the [CLS] state."""

    kind = Kind.CLASSIFIER
    head_pooling = PoolingType.CLS

    def __init__(self, cfg: DistilBertConfig, num_labels: int):
        super().__init__(cfg)
        self.pre_classifier = nn.Linear(cfg.dim, cfg.dim)
        self.classifier = nn.Linear(cfg.dim, num_labels)

    @classmethod
    def from_hf_config(cls, config: dict) -> DistilBertForSequenceClassification:
        return cls(DistilBertConfig.from_hf(config), num_labels_of(config))

    @property
    def num_labels(self) -> int:
        return self.classifier.out_features

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.relu(self.pre_classifier(pooled)))  # [rows, num_labels]


class DistilBertForTokenClassification(DistilBertModel):
    """Per-token labels: `head` turns every token's state into label logits."""

    kind = Kind.CLASSIFIER
    head_pooling = PoolingType.ALL

    def __init__(self, cfg: DistilBertConfig, num_labels: int):
        super().__init__(cfg)
        self.classifier = nn.Linear(cfg.dim, num_labels)

    @classmethod
    def from_hf_config(cls, config: dict) -> DistilBertForTokenClassification:
        return cls(DistilBertConfig.from_hf(config), num_labels_of(config))

    @property
    def num_labels(self) -> int:
        return self.classifier.out_features

    def head(self, rows: torch.Tensor) -> torch.Tensor:
        return self.classifier(rows)  # [tokens, num_labels]
