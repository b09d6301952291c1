"""Gemma, Gemma2 and Gemma3 text decoders on packed tokens, causal (bge-reranker-v2-gemma bodies,
Gemma2 classifiers) or bidirectional (EmbeddingGemma: Gemma3 text with
`use_bidirectional_attention`).

What sets them apart from Llama: RMSNorm scales by (1 + weight), the embeddings are multiplied
by sqrt(hidden_size) (rounded to the model's dtype, as transformers does), a GeGLU feed-forward,
and an explicit head_dim. Gemma2 adds norms after attention and after the feed-forward, a
query_pre_attn_scalar for the attention scale, soft-capped attention scores and sliding-window
layers; Gemma3 drops the soft-capping, adds RMSNorm on q and k, and gives its sliding layers their
own rotary base (rope_local_base_freq). Bidirectional, a sliding layer sees the tokens at most
sliding_window // 2 positions away on either side (transformers' EmbeddingGemma mask).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from poolsvc.engine.backend import Backend
from poolsvc.engine.layers import activation, varlen_attention
from poolsvc.engine.models.llama import (
    RopeConfig,
    RotaryEmbedding,
    SequenceClassifier,
    TokenClassifier,
    apply_rotary,
)
from poolsvc.engine.packing import PackedBatch
from poolsvc.engine.params import PoolingType

GLOBAL, LOCAL = "full_attention", "sliding_attention"


@dataclass(frozen=True)
class GemmaConfig:
    version: int                    # 1, 2 or 3: which Gemma
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    hidden_activation: str
    layer_types: tuple[str, ...]
    rope: dict[str, RopeConfig]     # by layer type
    window: int | None              # the tokens a sliding layer sees before (and after) each
    scale: float                    # of the attention scores
    attn_logit_softcapping: float | None = None
    attention_bias: bool = False
    bidirectional: bool = False
    num_labels: int | None = None   # task heads only; None: the head's default
    token_classification_bias: bool = True

    @classmethod
    def from_hf(cls, config: dict, version: int) -> GemmaConfig:
        heads = config["num_attention_heads"]
        kv_heads = config.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise ValueError(f"num_attention_heads ({heads}) must be a multiple of "
                             f"num_key_value_heads ({kv_heads})")
        head_dim = config.get("head_dim") or 256  # transformers' default for all three
        layers = config["num_hidden_layers"]
        bidirectional = bool(config.get("use_bidirectional_attention"))
        if bidirectional and version != 3:
            raise ValueError("use_bidirectional_attention is supported for Gemma3 text "
                             "(EmbeddingGemma) only")
        if version == 1:  # transformers reads hidden_act, and takes "gelu" for the tanh form
            act = config.get("hidden_act") or "gelu_pytorch_tanh"
            act = "gelu_pytorch_tanh" if act == "gelu" else act
            types, window = (GLOBAL,) * layers, None
            rope = {GLOBAL: RopeConfig.from_hf(config)}
            scale = head_dim ** -0.5
        else:
            act = config.get("hidden_activation") or "gelu_pytorch_tanh"
            every = 2 if version == 2 else config.get("sliding_window_pattern", 6)
            types = tuple(config.get("layer_types") or
                          (LOCAL if (i + 1) % every else GLOBAL for i in range(layers)))
            if len(types) != layers or set(types) - {GLOBAL, LOCAL}:
                raise ValueError(f"layer_types must name {layers} layers, each {GLOBAL!r} or "
                                 f"{LOCAL!r}; got {list(types)}")
            window = _window(config.get("sliding_window", 4096), bidirectional)
            rope = _rope(config, version)
            scale = float(config.get("query_pre_attn_scalar", 256)) ** -0.5
        softcap = config.get("attn_logit_softcapping", 50.0) if version == 2 else None
        labels = config.get("num_labels") or len(config.get("id2label") or {}) or None
        if labels is not None and labels < 1:
            raise ValueError(f"num_labels must be at least 1, got {labels}")
        cfg = cls(version=version, vocab_size=config["vocab_size"],
                  hidden_size=config["hidden_size"],
                  intermediate_size=config["intermediate_size"], num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                  max_position_embeddings=config.get("max_position_embeddings", 8192),
                  rms_norm_eps=config.get("rms_norm_eps", 1e-6), hidden_activation=act,
                  layer_types=types, rope=rope, window=window, scale=scale,
                  attn_logit_softcapping=softcap,
                  attention_bias=bool(config.get("attention_bias", False)),
                  bidirectional=bidirectional, num_labels=labels,
                  token_classification_bias=bool(config.get("token_classification_bias", True)))
        activation(cfg.hidden_activation, "hidden_activation")  # unknown names raise here
        return cfg


def _window(sliding_window: int | None, bidirectional: bool) -> int | None:
    """In varlen_attention's terms (the distance still seen). Causal, transformers' window of
    `sliding_window` tokens holds the token and the sliding_window - 1 before it; bidirectional,
    Gemma3TextConfig keeps sliding_window // 2 + 1 as an exclusive bound on |q - k|."""
    if sliding_window is None:
        return None
    if sliding_window < 1:
        raise ValueError(f"sliding_window must be at least 1, got {sliding_window}")
    return sliding_window // 2 if bidirectional else sliding_window - 1


def _rope(config: dict, version: int) -> dict[str, RopeConfig]:
    """Gemma2: one rotary for every layer. Gemma3: rope_parameters by layer type, or the older
    rope_theta (global, 1e6 by default), rope_local_base_freq (sliding, 1e4) and rope_scaling
    (global layers only), as Gemma3TextConfig reads them."""
    if version == 2:
        rope = RopeConfig.from_hf(config)
        return {GLOBAL: rope, LOCAL: rope}
    given = config.get("rope_parameters") or {}
    defaults = {GLOBAL: ("rope_theta", 1_000_000.0), LOCAL: ("rope_local_base_freq", 10_000.0)}
    rope = {}
    for kind, (old_name, theta) in defaults.items():
        params = dict(given.get(kind) or {"rope_type": "default"})
        if kind == GLOBAL and config.get("rope_scaling"):
            params.update(config["rope_scaling"])
        params.setdefault("rope_theta", config.get(old_name) or theta)
        rope[kind] = RopeConfig.from_hf({**config, "rope_parameters": params,
                                         "rope_scaling": None})
    return rope


class GemmaRMSNorm(nn.Module):
    """x / rms(x) * (1 + weight), in float32, cast back after the weight (unlike Llama's)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).to(x.dtype)


class GemmaAttention(nn.Module):
    def __init__(self, cfg: GemmaConfig, layer_type: str):
        super().__init__()
        self.cfg, self.head_dim = cfg, cfg.head_dim
        self.window = cfg.window if layer_type == LOCAL else None
        q_dim = cfg.num_attention_heads * cfg.head_dim
        kv_dim = cfg.num_key_value_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, q_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(q_dim, cfg.hidden_size, bias=cfg.attention_bias)
        norm = (lambda: GemmaRMSNorm(cfg.head_dim, cfg.rms_norm_eps)) if cfg.version == 3 \
            else nn.Identity
        self.q_norm, self.k_norm = norm(), norm()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                batch: PackedBatch) -> torch.Tensor:
        shape = (x.shape[0], -1, self.head_dim)  # [num_tokens, heads, head_dim]
        q = apply_rotary(self.q_norm(self.q_proj(x).view(shape)), cos, sin)
        k = apply_rotary(self.k_norm(self.k_proj(x).view(shape)), cos, sin)
        v = self.v_proj(x).view(shape)
        out = varlen_attention(q, k, v, batch, causal=not self.cfg.bidirectional,
                               window=self.window, scale=self.cfg.scale,
                               softcap=self.cfg.attn_logit_softcapping)
        return self.o_proj(out.flatten(1))


class GemmaMLP(nn.Module):
    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = activation(cfg.hidden_activation, "hidden_activation")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class GemmaDecoderLayer(nn.Module):
    """Gemma: pre-norm, as Llama. Gemma2/3: each sublayer's output is normed too before the
    residual add (post_attention_layernorm then normalizes the attention's output, and
    pre_feedforward_layernorm the MLP's input)."""

    def __init__(self, cfg: GemmaConfig, index: int):
        super().__init__()
        self.layer_type = cfg.layer_types[index]
        norm = lambda: GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)  # noqa: E731
        self.input_layernorm = norm()
        self.self_attn = GemmaAttention(cfg, self.layer_type)
        self.post_attention_layernorm = norm()
        self.mlp = GemmaMLP(cfg)
        self.sandwich = cfg.version > 1
        if self.sandwich:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                batch: PackedBatch) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), cos, sin, batch)
        if not self.sandwich:
            x = x + h
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(h)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class GemmaModel(Backend):
    """Returns the final-norm hidden states, [num_tokens, hidden], of a packed batch."""

    weight_prefix = "model."
    position_offset = 0
    default_pooling = PoolingType.LAST
    version = 1

    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(GemmaDecoderLayer(cfg, i)
                                    for i in range(cfg.num_hidden_layers))
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = {kind: RotaryEmbedding(cfg.rope[kind], cfg.head_dim)
                       for kind in sorted(set(cfg.layer_types))}
        if cfg.bidirectional:  # EmbeddingGemma: an encoder, mean-pooled
            self.default_pooling = PoolingType.MEAN

    @classmethod
    def from_hf_config(cls, config: dict) -> GemmaModel:
        return cls(GemmaConfig.from_hf(config, cls.version))

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def max_positions(self) -> int:
        return self.config.max_position_embeddings

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        x = self.embed_tokens(batch.input_ids)  # [num_tokens, hidden]
        # sqrt(hidden) rounded to float32, then to the weights' dtype, as transformers does
        scale = torch.tensor(self.config.hidden_size ** 0.5, device=x.device).to(x.dtype)
        x = x * scale
        rotary = {kind: emb(batch.positions, x.dtype)  # cos, sin: [num_tokens, 1, head_dim]
                  for kind, emb in self.rotary.items()}
        for layer in self.layers:
            x = layer(x, *rotary[layer.layer_type], batch)
        return self.norm(x)


class Gemma2Model(GemmaModel):
    version = 2


class Gemma3TextModel(GemmaModel):
    version = 3


class GemmaForSequenceClassification(SequenceClassifier, GemmaModel):
    pass


class GemmaForTokenClassification(TokenClassifier, GemmaModel):
    pass


class Gemma2ForSequenceClassification(SequenceClassifier, Gemma2Model):
    pass


class Gemma2ForTokenClassification(TokenClassifier, Gemma2Model):
    pass


class Gemma3TextForSequenceClassification(SequenceClassifier, Gemma3TextModel):
    pass
