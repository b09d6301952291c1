"""BERT encoders (MiniLM, bge, e5, ...) on packed tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from poolsvc.engine.backend import Backend
from poolsvc.engine.description import Kind
from poolsvc.engine.fused import kernels
from poolsvc.engine.layers import FUSED_GELU, activation, varlen_attention
from poolsvc.engine.packing import PackedBatch
from poolsvc.engine.params import PoolingType


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    position_embedding_type: str = "absolute"
    is_decoder: bool = False

    @classmethod
    def from_hf(cls, config: dict) -> BertConfig:
        fields = cls.__dataclass_fields__
        cfg = cls(**{k: config[k] for k in fields if k in config})
        if cfg.position_embedding_type != "absolute":
            raise ValueError(f"position_embedding_type {cfg.position_embedding_type!r} is not "
                             "supported (absolute only)")
        if cfg.is_decoder:
            raise ValueError("is_decoder=true (causal attention) is not supported for encoders")
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        return cfg


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        x = (self.word_embeddings(batch.input_ids) + self.position_embeddings(batch.positions)
             + self.token_type_embeddings(batch.token_type_ids))  # [num_tokens, hidden]
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        shape = (x.shape[0], self.num_heads, -1)  # [num_tokens, heads, head_dim]
        q, k, v = (proj(x).view(shape) for proj in (self.query, self.key, self.value))
        return varlen_attention(q, k, v, batch).flatten(1)


class BertResidualOutput(nn.Module):
    """dense -> add residual -> LayerNorm (HF's BertSelfOutput and BertOutput)."""

    fused = False  # the add and the norm in one kernel (engine/fused.py)

    def __init__(self, d_in: int, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(d_in, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        if self.fused:
            norm = self.LayerNorm
            return kernels().add_layer_norm(self.dense(x), residual, norm.weight, norm.bias,
                                            norm.eps)
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(cfg)
        self.output = BertResidualOutput(cfg.hidden_size, cfg)

    def forward(self, x: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        return self.output(self.self(x, batch), x)


class BertIntermediate(nn.Module):
    fused = False  # bias + GELU in one kernel after the matrix product (engine/fused.py)
    fused_reads = ("dense",)  # the fused form reads dense's weight instead of calling it

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = activation(cfg.hidden_act)
        self.gelu = FUSED_GELU.get(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and self.gelu is not None:
            return kernels().bias_gelu(F.linear(x, self.dense.weight), self.dense.bias,
                                       approximate=self.gelu)
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertResidualOutput(cfg.intermediate_size, cfg)

    def forward(self, x: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        x = self.attention(x, batch)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))


class BertModel(Backend):
    """Returns the last hidden states, [num_tokens, hidden], of a packed batch."""

    # Checkpoints of task models (BertForSequenceClassification, ...) nest the body under "bert.".
    weight_prefix = "bert."
    position_offset = 0
    default_pooling = PoolingType.CLS

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)

    @classmethod
    def from_hf_config(cls, config: dict) -> BertModel:
        return cls(cls.parse_config(config))

    @classmethod
    def parse_config(cls, config: dict) -> BertConfig:
        return BertConfig.from_hf(config)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def max_positions(self) -> int:
        return self.config.max_position_embeddings - self.position_offset

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        x = self.embeddings(batch)
        for layer in self.encoder.layer:
            x = layer(x, batch)
        return x


def num_labels_of(config: dict) -> int:
    """config.json keeps `id2label`, rarely `num_labels`; transformers defaults to 2 labels."""
    if "num_labels" in config:
        num_labels = int(config["num_labels"])
    else:
        num_labels = len(config.get("id2label") or {}) or 2
    if num_labels < 1:
        raise ValueError(f"num_labels must be at least 1, got {num_labels}")
    return num_labels


class BertPooler(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(pooled))


class BertForSequenceClassification(BertModel):
    """The body's forward; `head` turns pooled [CLS] states into logits."""

    kind = Kind.CLASSIFIER
    head_pooling = PoolingType.CLS

    def __init__(self, cfg: BertConfig, num_labels: int):
        super().__init__(cfg)
        # HF stores these as bert.pooler.dense.* (the body prefix is stripped) and classifier.*
        self.pooler = BertPooler(cfg)
        self.classifier = nn.Linear(cfg.hidden_size, num_labels)

    @classmethod
    def from_hf_config(cls, config: dict) -> BertForSequenceClassification:
        return cls(cls.parse_config(config), num_labels_of(config))

    @property
    def num_labels(self) -> int:
        return self.classifier.out_features

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pooler(pooled))  # [rows, num_labels]


class BertForTokenClassification(BertModel):
    """NER-style taggers: `head` turns every token's state into label logits."""

    kind = Kind.CLASSIFIER
    head_pooling = PoolingType.ALL

    def __init__(self, cfg: BertConfig, num_labels: int):
        super().__init__(cfg)
        self.classifier = nn.Linear(cfg.hidden_size, num_labels)

    @classmethod
    def from_hf_config(cls, config: dict) -> BertForTokenClassification:
        return cls(cls.parse_config(config), num_labels_of(config))

    @property
    def num_labels(self) -> int:
        return self.classifier.out_features

    def head(self, rows: torch.Tensor) -> torch.Tensor:
        return self.classifier(rows)  # [tokens, num_labels]


class BertLMPredictionTransform(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.act = activation(cfg.hidden_act)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.act(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    """HF's cls.predictions: transform, then the vocabulary projection. The projection's weight
    is the word embeddings' (tie_word_embeddings, BERT's default) unless the checkpoint has its
    own `cls.predictions.decoder.weight`."""

    def __init__(self, cfg: BertConfig, tied: bool):
        super().__init__()
        self.transform = BertLMPredictionTransform(cfg)
        self.decoder = None if tied else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.empty(cfg.vocab_size))
        self.vocab = None  # the projection with its bias, where a device path has its own

    def forward(self, x: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        if self.vocab is not None:
            return self.vocab(self.transform(x))
        weight = word_embeddings if self.decoder is None else self.decoder.weight
        return F.linear(self.transform(x), weight, self.bias)


class BertOnlyMLMHead(nn.Module):
    def __init__(self, cfg: BertConfig, tied: bool):
        super().__init__()
        self.predictions = BertLMPredictionHead(cfg, tied)


class BertForMaskedLM(BertModel):
    """A masked LM served as a SPLADE sparse encoder: `head` gives each token's vocabulary
    logits, which the pooler turns into log(1 + relu) and pools over the tokens."""

    kind = Kind.SPARSE
    head_pooling = PoolingType.SPLADE
    default_pooling = PoolingType.SPLADE

    def __init__(self, cfg: BertConfig, tied: bool = True):
        super().__init__(cfg)
        self.cls = BertOnlyMLMHead(cfg, tied)

    @classmethod
    def from_hf_config(cls, config: dict) -> BertForMaskedLM:
        return cls(cls.parse_config(config), bool(config.get("tie_word_embeddings", True)))

    def head(self, rows: torch.Tensor) -> torch.Tensor:
        return self.cls.predictions(rows, self.embeddings.word_embeddings.weight)  # [rows, vocab]
