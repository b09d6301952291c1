"""Llama-style decoders (Llama, Mistral; Qwen2 and Qwen3 subclass them) on packed tokens.

Decoder embedders and classifiers read the last token; attention is causal within each sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from poolsvc.engine.backend import Backend
from poolsvc.engine.description import Kind
from poolsvc.engine.fused import kernels
from poolsvc.engine.layers import activation, varlen_attention
from poolsvc.engine.packing import PackedBatch
from poolsvc.engine.params import PoolingType

ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    # llama3 only (Llama 3.1): frequencies between these wavelengths are interpolated
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 0

    @classmethod
    def from_hf(cls, config: dict) -> RopeConfig:
        # transformers 5 writes `rope_parameters`; older configs `rope_theta` + `rope_scaling`,
        # and transformers lets `rope_scaling` win when both are there.
        params = config.get("rope_scaling") or config.get("rope_parameters") or {}
        if any(isinstance(v, dict) for v in params.values()):
            raise ValueError("per-layer-type rope_parameters are not supported")
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type {rope_type!r} is not supported; supported: "
                             f"{', '.join(ROPE_TYPES)}")
        partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor"))
        if partial not in (None, 1, 1.0):
            raise ValueError(f"partial_rotary_factor {partial} is not supported (1.0 only)")
        theta = float(params.get("rope_theta") or config.get("rope_theta") or 10000.0)
        if rope_type == "default":
            return cls(theta)
        try:
            if rope_type == "linear":
                return cls(theta, rope_type, factor=float(params["factor"]))
            return cls(theta, rope_type, factor=float(params["factor"]),
                       low_freq_factor=float(params["low_freq_factor"]),
                       high_freq_factor=float(params["high_freq_factor"]),
                       original_max_positions=int(params.get(
                           "original_max_position_embeddings",
                           config["max_position_embeddings"])))
        except KeyError as exc:
            raise ValueError(f"rope_type {rope_type!r} needs {exc.args[0]!r}") from None

    def inv_freq(self, head_dim: int, device: torch.device) -> torch.Tensor:
        """[head_dim // 2] float32, with transformers' formulas (modeling_rope_utils.py)."""
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
        inv_freq = 1.0 / (self.theta ** exponents)
        if self.rope_type == "linear":
            return inv_freq / self.factor
        if self.rope_type == "llama3":
            low_wavelen = self.original_max_positions / self.low_freq_factor
            high_wavelen = self.original_max_positions / self.high_freq_factor
            wavelen = 2 * math.pi / inv_freq
            scaled = torch.where(wavelen > low_wavelen, inv_freq / self.factor, inv_freq)
            smooth = ((self.original_max_positions / wavelen - self.low_freq_factor)
                      / (self.high_freq_factor - self.low_freq_factor))
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            return torch.where(medium, smoothed, scaled)
        return inv_freq


@dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    hidden_act: str
    rope: RopeConfig
    # the switches that tell the family's members apart
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False           # Qwen3: RMSNorm over head_dim on q and k before rotary
    sliding_window: int | None = None
    num_labels: int | None = None   # task heads only; None: the head's default
    token_classification_bias: bool = True  # *ForTokenClassification's score bias

    @classmethod
    def from_hf(cls, config: dict, **switches) -> DecoderConfig:
        heads = config["num_attention_heads"]
        kv_heads = config.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise ValueError(f"num_attention_heads ({heads}) must be a multiple of "
                             f"num_key_value_heads ({kv_heads})")
        switches.setdefault("head_dim", config.get("head_dim") or config["hidden_size"] // heads)
        labels = config.get("num_labels") or len(config.get("id2label") or {}) or None
        if labels is not None and labels < 1:
            raise ValueError(f"num_labels must be at least 1, got {labels}")
        cfg = cls(vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
                  intermediate_size=config["intermediate_size"],
                  num_hidden_layers=config["num_hidden_layers"], num_attention_heads=heads,
                  num_key_value_heads=kv_heads,
                  max_position_embeddings=config["max_position_embeddings"],
                  rms_norm_eps=config.get("rms_norm_eps", 1e-6),
                  hidden_act=config.get("hidden_act", "silu"), rope=RopeConfig.from_hf(config),
                  num_labels=labels,
                  token_classification_bias=bool(config.get("token_classification_bias", True)),
                  **switches)
        activation(cfg.hidden_act)  # unknown names raise here, not at the first forward
        return cfg


class RMSNorm(nn.Module):
    """Normalizes in float32 and casts back before the weight, as transformers does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class RotaryEmbedding:
    """cos / sin per token. Not a module: inv_freq is derived from the config, never loaded, and
    computed on first use on each device (so the model can be built on the meta device)."""

    def __init__(self, rope: RopeConfig, head_dim: int):
        self.rope, self.head_dim = rope, head_dim
        self._inv_freq: torch.Tensor | None = None

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype):
        self._inv_freq_on(positions.device)
        freqs = positions[:, None].float() * self._inv_freq  # [num_tokens, head_dim // 2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [num_tokens, 1, head_dim]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def _inv_freq_on(self, device: torch.device) -> torch.Tensor:
        if self._inv_freq is None or self._inv_freq.device != device:
            self._inv_freq = self.rope.inv_freq(self.head_dim, device)
            self._tables = None
        return self._inv_freq

    def tables(self, device: torch.device, max_positions: int):
        """cos / sin tables [max_positions, head_dim // 2] for the fused rotary kernel."""
        inv_freq = self._inv_freq_on(device)
        if getattr(self, "_tables", None) is None:
            self._tables = kernels().rotary_tables(inv_freq, max_positions)
        return self._tables


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class LlamaAttention(nn.Module):
    fused = False  # rotary in place by a kernel (engine/fused.py)

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        q_dim = cfg.num_attention_heads * cfg.head_dim
        kv_dim = cfg.num_key_value_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, q_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q_dim, cfg.hidden_size, bias=cfg.o_bias)
        norm = (lambda: RMSNorm(cfg.head_dim, cfg.rms_norm_eps)) if cfg.qk_norm else nn.Identity
        self.q_norm, self.k_norm = norm(), norm()

    def forward(self, x: torch.Tensor, cos, sin, batch: PackedBatch) -> torch.Tensor:
        """cos, sin: [num_tokens, 1, head_dim] per token; fused: the [positions, head_dim // 2]
        tables, indexed by the kernel."""
        shape = (x.shape[0], -1, self.head_dim)  # [num_tokens, heads, head_dim]
        q = self.q_norm(self.q_proj(x).view(shape))
        k = self.k_norm(self.k_proj(x).view(shape))
        if self.fused:
            q, k = kernels().apply_rotary_(q.contiguous(), k.contiguous(), batch.positions, cos,
                                           sin)
        else:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        v = self.v_proj(x).view(shape)
        return self.o_proj(varlen_attention(q, k, v, batch, causal=True).flatten(1))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                batch: PackedBatch) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, batch)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_fused(self, h: torch.Tensor, residual: torch.Tensor | None, tables,
                      batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The same layer with each residual add fused into the norm after it; returns the
        MLP output and the residual stream, which the next norm adds (vLLM's layout)."""
        add_rms_norm = kernels().add_rms_norm
        norm = self.input_layernorm
        normed, residual = add_rms_norm(h, residual, norm.weight, norm.eps)
        h = self.self_attn(normed, *tables, batch)
        norm = self.post_attention_layernorm
        normed, residual = add_rms_norm(h, residual, norm.weight, norm.eps)
        return self.mlp(normed), residual


class LlamaModel(Backend):
    """Returns the final-norm hidden states, [num_tokens, hidden], of a packed batch."""

    # Checkpoints of *ForCausalLM / *ForSequenceClassification nest the body under "model.".
    weight_prefix = "model."
    position_offset = 0
    default_pooling = PoolingType.LAST

    fused = False  # residual adds fused into the norms (engine/fused.py)

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.rope, cfg.head_dim)

    @classmethod
    def switches(cls, config: dict) -> dict:
        """How this family member reads the DecoderConfig switches from its config.json."""
        bias = bool(config.get("attention_bias", False))
        return dict(qkv_bias=bias, o_bias=bias, mlp_bias=bool(config.get("mlp_bias", False)))

    @classmethod
    def from_hf_config(cls, config: dict) -> LlamaModel:
        return cls(DecoderConfig.from_hf(config, **cls.switches(config)))

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def max_positions(self) -> int:
        # Inputs no longer than the window see every earlier token, so full causal attention is
        # exact for them; longer ones would need a windowed mask.
        window = self.config.sliding_window
        return min(self.config.max_position_embeddings, window or math.inf)

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        x = self.embed_tokens(batch.input_ids)  # [num_tokens, hidden]
        if self.fused:
            tables = self.rotary.tables(x.device, self.config.max_position_embeddings)
            residual = None
            for layer in self.layers:
                x, residual = layer.forward_fused(x, residual, tables, batch)
            return kernels().add_rms_norm(x, residual, self.norm.weight, self.norm.eps)[0]
        cos, sin = self.rotary(batch.positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, batch)
        return self.norm(x)


class MistralModel(LlamaModel):
    @classmethod
    def switches(cls, config: dict) -> dict:
        # transformers' default window applies when config.json does not name one
        return dict(sliding_window=config.get("sliding_window", 4096))


class TaskHead:
    """Mixed into a body class before it: adds `score` and the head the pooler runs."""

    kind = Kind.CLASSIFIER
    head_pooling = PoolingType.LAST
    default_num_labels = 2  # transformers' default when a config has no labels

    @property
    def num_labels(self) -> int:
        return self.config.num_labels or self.default_num_labels

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.score(pooled)  # [rows, num_labels] logits


class SequenceClassifier(TaskHead):
    """transformers' GenericForSequenceClassification: a bias-free Linear on the last token."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__(cfg)
        self.score = nn.Linear(cfg.hidden_size, self.num_labels, bias=False)


class TokenClassifier(TaskHead):
    """transformers' GenericForTokenClassification: dropout (off at inference), then a Linear on
    every token (NER-style taggers), with a bias unless `token_classification_bias` is off."""

    head_pooling = PoolingType.ALL

    def __init__(self, cfg: DecoderConfig):
        super().__init__(cfg)
        self.score = nn.Linear(cfg.hidden_size, self.num_labels,
                               bias=cfg.token_classification_bias)


class LlamaForSequenceClassification(SequenceClassifier, LlamaModel):
    pass


class LlamaForTokenClassification(TokenClassifier, LlamaModel):
    pass


class MistralForSequenceClassification(SequenceClassifier, MistralModel):
    pass


class MistralForTokenClassification(TokenClassifier, MistralModel):
    pass
