"""ModernBERT encoders (gte-modernbert, modernbert-embed, gte-reranker-modernbert, ...) on packed
tokens: pre-norm layers without biases, rotary positions (one theta for the global layers,
another for the local ones), a GeGLU feed-forward, attention that alternates between global and
a sliding window of `local_attention // 2` tokens either side, and a final norm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from poolsvc.engine.backend import Backend
from poolsvc.engine.description import Kind
from poolsvc.engine.layers import activation, qkv_attention
from poolsvc.engine.models.bert import num_labels_of
from poolsvc.engine.models.llama import RopeConfig, RotaryEmbedding
from poolsvc.engine.packing import PackedBatch
from poolsvc.engine.params import PoolingType

if TYPE_CHECKING:
    from poolsvc.engine import native

GLOBAL, LOCAL = "full_attention", "sliding_attention"
# transformers' ModernBertConfig defaults, for hub configs written before layer_types and
# rope_parameters existed
_THETA = {GLOBAL: ("global_rope_theta", 160000.0), LOCAL: ("local_rope_theta", 10000.0)}
_POOLINGS = {"cls": PoolingType.CLS, "mean": PoolingType.MEAN}


@dataclass(frozen=True)
class ModernBertConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    layer_types: tuple[str, ...]
    rope: dict[str, RopeConfig]     # by layer type
    window: int                     # tokens either side in the local layers
    norm_eps: float = 1e-5
    norm_bias: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_activation: str = "gelu"
    classifier_pooling: str = "cls"
    classifier_bias: bool = False
    classifier_activation: str = "gelu"

    @classmethod
    def from_hf(cls, config: dict) -> ModernBertConfig:
        layers = config["num_hidden_layers"]
        every = config.get("global_attn_every_n_layers", 3)
        types = tuple(config.get("layer_types") or
                      (LOCAL if i % every else GLOBAL for i in range(layers)))
        if len(types) != layers or set(types) - {GLOBAL, LOCAL}:
            raise ValueError(f"layer_types must name {layers} layers, each {GLOBAL!r} or "
                             f"{LOCAL!r}; got {list(types)}")
        rope_parameters = config.get("rope_parameters") or {}
        rope = {}
        for kind, (old_name, theta) in _THETA.items():
            params = dict(rope_parameters.get(kind) or config.get("rope_scaling") or {})
            params.setdefault("rope_theta", config.get(old_name, theta))
            rope[kind] = RopeConfig.from_hf({**config, "rope_parameters": params,
                                             "rope_scaling": None})
        fields = {k: config[k] for k in cls.__dataclass_fields__ if k in config
                  and k not in ("layer_types", "rope", "window")}
        cfg = cls(layer_types=types, rope=rope, window=int(config.get("local_attention", 128))
                  // 2, **fields)
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if cfg.classifier_pooling not in _POOLINGS:
            raise ValueError(f"classifier_pooling {cfg.classifier_pooling!r} is not supported; "
                             f"supported: {', '.join(_POOLINGS)}")
        for option in ("hidden_activation", "classifier_activation"):
            activation(getattr(cfg, option), option)  # unknown names raise here, not later
        return cfg

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def _norm(cfg: ModernBertConfig) -> nn.LayerNorm:
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, bias=cfg.norm_bias)


class ModernBertEmbeddings(nn.Module):
    def __init__(self, cfg: ModernBertConfig):
        super().__init__()
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.norm = _norm(cfg)

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        return self.norm(self.tok_embeddings(batch.input_ids))  # [num_tokens, hidden]


class ModernBertAttention(nn.Module):
    def __init__(self, cfg: ModernBertConfig, layer_type: str):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.window = cfg.window if layer_type == LOCAL else None
        self.Wqkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.attention_bias)
        self.Wo = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.attention_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                batch: PackedBatch) -> torch.Tensor:
        return self.Wo(attend(self.Wqkv(x), self.head_dim, self.window, cos, sin, batch))


def attend(qkv: torch.Tensor, head_dim: int, window: int | None, cos: torch.Tensor,
           sin: torch.Tensor, batch: PackedBatch,
           kernel: native.Attention | None = None) -> torch.Tensor:
    """Attention over the joined projection qkv [num_tokens, 3 * hidden]; returns
    [num_tokens, hidden], before Wo. `kernel`: as qkv_attention's."""
    qkv = rotate_qk(qkv.view(qkv.shape[0], 3, -1, head_dim), cos, sin)
    return qkv_attention(qkv, batch, window=window, kernel=kernel).flatten(1)


def rotate_qk(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary positions on the query and key of qkv [num_tokens, 3, heads, head_dim], written
    with the value into one new tensor of that shape (what attention reads), each half of
    head_dim in two passes: transformers' x * cos + rotate_half(x) * sin without its copies.
    cos, sin: [num_tokens, 1, head_dim] with equal halves."""
    half = qkv.shape[-1] // 2
    cos, sin = cos[:, None, :, :half], sin[:, None, :, :half]  # [num_tokens, 1, 1, half]
    qk, out = qkv[:, :2], torch.empty_like(qkv)
    x1, x2 = qk[..., :half], qk[..., half:]
    out1, out2 = out[:, :2, :, :half], out[:, :2, :, half:]
    torch.mul(x1, cos, out=out1).addcmul_(x2, sin, value=-1)  # x1 cos - x2 sin
    torch.mul(x2, cos, out=out2).addcmul_(x1, sin)            # x2 cos + x1 sin
    out[:, 2] = qkv[:, 2]
    return out


class ModernBertMLP(nn.Module):
    """GeGLU: the first half of Wi's output, activated, gates the second."""

    def __init__(self, cfg: ModernBertConfig):
        super().__init__()
        self.Wi = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.act = activation(cfg.hidden_activation)
        self.Wo = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inputs, gate = self.Wi(x).chunk(2, dim=-1)  # [num_tokens, intermediate] each
        return self.Wo(self.act(inputs) * gate)


class ModernBertEncoderLayer(nn.Module):
    def __init__(self, cfg: ModernBertConfig, index: int):
        super().__init__()
        self.attention_type = cfg.layer_types[index]
        # the embeddings' norm is the first layer's
        self.attn_norm = nn.Identity() if index == 0 else _norm(cfg)
        self.attn = ModernBertAttention(cfg, self.attention_type)
        self.mlp_norm = _norm(cfg)
        self.mlp = ModernBertMLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                batch: PackedBatch) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, batch)
        return x + self.mlp(self.mlp_norm(x))


class ModernBertModel(Backend):
    """Returns the final-norm hidden states, [num_tokens, hidden], of a packed batch."""

    weight_prefix = "model."
    position_offset = 0
    default_pooling = PoolingType.CLS

    def __init__(self, cfg: ModernBertConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = ModernBertEmbeddings(cfg)
        self.layers = nn.ModuleList(ModernBertEncoderLayer(cfg, i)
                                    for i in range(cfg.num_hidden_layers))
        self.final_norm = _norm(cfg)
        self.rotary = {kind: RotaryEmbedding(rope, cfg.head_dim)
                       for kind, rope in cfg.rope.items()}

    @classmethod
    def from_hf_config(cls, config: dict) -> ModernBertModel:
        return cls(ModernBertConfig.from_hf(config))

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def max_positions(self) -> int:
        return self.config.max_position_embeddings

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        x = self.embeddings(batch)
        # cos / sin of each position once (not of each token), then gathered per token
        positions = torch.arange(batch.max_seqlen, device=x.device)
        rotary = {kind: [t[batch.positions] for t in emb(positions, x.dtype)]
                  for kind, emb in self.rotary.items()}  # [num_tokens, 1, head_dim] each
        for layer in self.layers:
            x = layer(x, *rotary[layer.attention_type], batch)
        return self.final_norm(x)


class ModernBertPredictionHead(nn.Module):
    def __init__(self, cfg: ModernBertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.classifier_bias)
        self.act = activation(cfg.classifier_activation)
        self.norm = _norm(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.dense(x)))


class _Classifier(ModernBertModel):
    """transformers' `head` (dense, activation, norm) then `classifier`. The checkpoint's
    `head.*` module is registered under that name for the loader, while `self.head` stays the
    backend's method (a method on the class wins over a submodule of the same name)."""

    kind = Kind.CLASSIFIER

    def __init__(self, cfg: ModernBertConfig, num_labels: int):
        super().__init__(cfg)
        self.head = ModernBertPredictionHead(cfg)
        self.classifier = nn.Linear(cfg.hidden_size, num_labels)

    @classmethod
    def from_hf_config(cls, config: dict) -> _Classifier:
        return cls(ModernBertConfig.from_hf(config), num_labels_of(config))

    @property
    def num_labels(self) -> int:
        return self.classifier.out_features

    def head(self, rows: torch.Tensor) -> torch.Tensor:
        return self.classifier(self._modules["head"](rows))  # [rows, num_labels]


class ModernBertForSequenceClassification(_Classifier):
    """Pools the [CLS] state or the mean of the tokens, as classifier_pooling says."""

    def __init__(self, cfg: ModernBertConfig, num_labels: int):
        super().__init__(cfg, num_labels)
        self.head_pooling = _POOLINGS[cfg.classifier_pooling]


class ModernBertForTokenClassification(_Classifier):
    head_pooling = PoolingType.ALL
