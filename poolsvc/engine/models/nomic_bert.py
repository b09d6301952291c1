"""NomicBERT encoders (nomic-embed-text v1 / v1.5) on packed tokens: word and token-type
embeddings (no position table), rotary positions on every head dimension (default, linear, or
dynamic NTK past max_position_embeddings), post-norm layers without biases, one joined Wqkv
projection and a SwiGLU feed-forward.

Parameter names are the checkpoint's: transformers 5 renames nomic's layout (`emb_ln`,
`encoder.layers.N.attn.Wqkv`, `mlp.fc11` / `fc12` / `fc2`, `norm1` / `norm2`) to its own when it
loads (conversion_mapping.py) and back when it saves, so hub and transformers-saved checkpoints
alike hold these names. transformers reads only its own config keys; configs written for
nomic's remote code (`n_embd`, `rotary_emb_base`, ...) are read as their transformers
equivalents here, and their switches that transformers' NomicBERT has no code for (a rotary
fraction below 1, interleaved rotary, biases, pre-norm) are refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from poolsvc.engine.backend import Backend
from poolsvc.engine.description import Kind
from poolsvc.engine.layers import activation, qkv_attention
from poolsvc.engine.models.bert import BertPooler, num_labels_of
from poolsvc.engine.models.modernbert import rotate_qk
from poolsvc.engine.packing import PackedBatch
from poolsvc.engine.params import PoolingType

ROPE_TYPES = ("default", "linear", "dynamic")
# nomic's remote-code config key -> transformers' (n_positions is the served limit, below)
_REMOTE_KEYS = {"n_embd": "hidden_size", "n_head": "num_attention_heads",
                "n_layer": "num_hidden_layers", "n_inner": "intermediate_size",
                "layer_norm_epsilon": "layer_norm_eps", "max_trained_positions":
                "max_position_embeddings"}
_REMOTE_ACTIVATIONS = {"swiglu": "silu", "geglu": "gelu", "glu": "sigmoid"}
# remote-code switches whose non-default value transformers' NomicBERT cannot express
_REMOTE_DEFAULTS = {"rotary_emb_fraction": 1.0, "rotary_emb_interleaved": False,
                    "qkv_proj_bias": False, "mlp_fc1_bias": False, "mlp_fc2_bias": False,
                    "prenorm": False, "parallel_block": False, "use_rms_norm": False,
                    "causal": False, "rotary_emb_scale_base": None}


@dataclass(frozen=True)
class NomicRope:
    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    max_positions: int = 0  # dynamic: sequences longer than this get a larger theta

    @classmethod
    def from_hf(cls, config: dict, max_positions: int) -> NomicRope:
        params = config.get("rope_scaling") or config.get("rope_parameters") or {}
        if not params and config.get("rotary_scaling_factor"):  # the remote code's dynamic NTK
            params = {"rope_type": "dynamic", "factor": config["rotary_scaling_factor"]}
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type {rope_type!r} is not supported; supported: "
                             f"{', '.join(ROPE_TYPES)}")
        partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor"))
        if partial not in (None, 1, 1.0):
            raise ValueError(f"partial_rotary_factor {partial} is not supported: transformers' "
                             "NomicBERT rotates every head dimension")
        theta = float(params.get("rope_theta") or config.get("rope_theta")
                      or config.get("rotary_emb_base") or 1000.0)
        if rope_type == "default":
            return cls(theta)
        if "factor" not in params:
            raise ValueError(f"rope_type {rope_type!r} needs 'factor'")
        return cls(theta, rope_type, float(params["factor"]), max_positions)

    def inv_freq(self, head_dim: int, seq_lens: torch.Tensor) -> torch.Tensor:
        """[num_seqs, head_dim // 2] float32 for sequences of seq_lens [num_seqs] tokens, with
        transformers' formulas (modeling_rope_utils.py). Dynamic NTK is per sequence: what
        transformers computes for each sequence on its own, never the padded batch's length."""
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64,
                                 device=seq_lens.device).float() / head_dim
        base = torch.full(seq_lens.shape, self.theta, dtype=torch.float32,
                          device=seq_lens.device)
        if self.rope_type == "dynamic":
            seq_len = seq_lens.clamp(min=self.max_positions).float()
            scaled = base * ((self.factor * seq_len / self.max_positions) - (self.factor - 1)) \
                ** (head_dim / (head_dim - 2))
            base = torch.where(seq_lens > self.max_positions, scaled, base)
        inv_freq = 1.0 / (base[:, None] ** exponents)  # [num_seqs, head_dim // 2]
        return inv_freq / self.factor if self.rope_type == "linear" else inv_freq


@dataclass(frozen=True)
class NomicBertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    head_dim: int
    max_position_embeddings: int
    max_positions: int              # the longest input served
    rope: NomicRope
    type_vocab_size: int = 2
    hidden_act: str = "silu"
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_hf(cls, config: dict) -> NomicBertConfig:
        for remote, key in _REMOTE_KEYS.items():
            if key not in config and remote in config:
                config = {**config, key: config[remote]}
        for key, default in _REMOTE_DEFAULTS.items():
            if config.get(key, default) != default:
                raise ValueError(f"{key}={config[key]!r} is not supported: transformers' "
                                 f"NomicBERT has no code for it (only {default!r})")
        hidden_act = config.get("hidden_act") or _REMOTE_ACTIVATIONS.get(
            config.get("activation_function", "swiglu"))
        if hidden_act is None:
            raise ValueError(f"activation_function {config['activation_function']!r} is not "
                             f"supported; supported: {', '.join(_REMOTE_ACTIVATIONS)}")
        activation(hidden_act)  # unknown names raise here, not at the first forward
        hidden, heads = config.get("hidden_size", 768), config.get("num_attention_heads", 12)
        head_dim = config.get("head_dim") or hidden // heads
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary positions, got {head_dim}")
        max_pos = int(config.get("max_position_embeddings", 2048))
        rope = NomicRope.from_hf(config, max_pos)
        # dynamic NTK exists to serve inputs past the trained length: nomic's n_positions, or
        # `factor` times the trained length
        longest = config.get("n_positions") or (
            int(max_pos * rope.factor) if rope.rope_type == "dynamic" else max_pos)
        return cls(vocab_size=config.get("vocab_size", 30528), hidden_size=hidden,
                   num_hidden_layers=config.get("num_hidden_layers", 12),
                   num_attention_heads=heads,
                   intermediate_size=config.get("intermediate_size", 3072), head_dim=head_dim,
                   max_position_embeddings=max_pos, max_positions=int(longest), rope=rope,
                   type_vocab_size=config.get("type_vocab_size", 2), hidden_act=hidden_act,
                   layer_norm_eps=config.get("layer_norm_eps", 1e-12))


class NomicBertEmbeddings(nn.Module):
    def __init__(self, cfg: NomicBertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        return self.word_embeddings(batch.input_ids) + \
            self.token_type_embeddings(batch.token_type_ids)  # [num_tokens, hidden]


class NomicBertAttention(nn.Module):
    attention_kernel = None  # engine/native.py's attention, set by the CPU path (cpu.optimize)

    def __init__(self, cfg: NomicBertConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        width = cfg.num_attention_heads * cfg.head_dim
        self.Wqkv = nn.Linear(cfg.hidden_size, 3 * width, bias=False)
        self.out_proj = nn.Linear(width, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                batch: PackedBatch) -> torch.Tensor:
        qkv = self.Wqkv(x).view(x.shape[0], 3, -1, self.head_dim)  # [num_tokens, 3, heads, d]
        return self.out_proj(qkv_attention(rotate_qk(qkv, cos, sin), batch,
                                           kernel=self.attention_kernel).flatten(1))


class NomicBertMLP(nn.Module):
    """SwiGLU: the activated fc12 (transformers' gate_proj) scales fc11 (its up_proj)."""

    def __init__(self, cfg: NomicBertConfig):
        super().__init__()
        self.fc11 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.fc12 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc12(x)) * self.fc11(x))


class NomicBertLayer(nn.Module):
    """Post-norm: each block's output is added to its input, then normalized."""

    def __init__(self, cfg: NomicBertConfig):
        super().__init__()
        self.attn = NomicBertAttention(cfg)
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = NomicBertMLP(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                batch: PackedBatch) -> torch.Tensor:
        x = self.norm1(x + self.attn(x, cos, sin, batch))
        return self.norm2(x + self.mlp(x))


class NomicBertEncoder(nn.Module):
    def __init__(self, cfg: NomicBertConfig):
        super().__init__()
        self.layers = nn.ModuleList(NomicBertLayer(cfg) for _ in range(cfg.num_hidden_layers))


class NomicBertModel(Backend):
    """Returns the last layer's hidden states, [num_tokens, hidden], of a packed batch."""

    weight_prefix = "nomic_bert."
    position_offset = 0
    default_pooling = PoolingType.MEAN  # nomic-embed-text is mean-pooled

    def __init__(self, cfg: NomicBertConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = NomicBertEmbeddings(cfg)
        self.emb_ln = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = NomicBertEncoder(cfg)

    @classmethod
    def from_hf_config(cls, config: dict) -> NomicBertModel:
        return cls(NomicBertConfig.from_hf(config))

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def max_positions(self) -> int:
        return self.config.max_positions

    def rotary(self, batch: PackedBatch, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [num_tokens, 1, head_dim] of each token's position in its sequence."""
        lens = torch.tensor(batch.prompt_lens, device=batch.input_ids.device)
        inv_freq = self.config.rope.inv_freq(self.config.head_dim, lens)  # [num_seqs, half]
        if self.config.rope.rope_type == "dynamic":  # each sequence its own frequencies
            inv_freq = torch.repeat_interleave(  # [num_tokens, half]; no device sync
                inv_freq, lens, dim=0, output_size=batch.input_ids.shape[0])
        else:
            inv_freq = inv_freq[:1]
        freqs = batch.positions[:, None].float() * inv_freq  # [num_tokens, half]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [num_tokens, 1, head_dim]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        x = self.emb_ln(self.embeddings(batch))
        cos, sin = self.rotary(batch, x.dtype)
        for layer in self.encoder.layers:
            x = layer(x, cos, sin, batch)
        return x


class NomicBertForSequenceClassification(NomicBertModel):
    """The [CLS] state through the pooler (dense, tanh), then the classifier."""

    kind = Kind.CLASSIFIER
    head_pooling = PoolingType.CLS

    def __init__(self, cfg: NomicBertConfig, num_labels: int):
        super().__init__(cfg)
        self.pooler = BertPooler(cfg)
        self.classifier = nn.Linear(cfg.hidden_size, num_labels)

    @classmethod
    def from_hf_config(cls, config: dict) -> NomicBertForSequenceClassification:
        return cls(NomicBertConfig.from_hf(config), num_labels_of(config))

    @property
    def num_labels(self) -> int:
        return self.classifier.out_features

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pooler(pooled))  # [rows, num_labels]


class NomicBertForTokenClassification(NomicBertModel):
    kind = Kind.CLASSIFIER
    head_pooling = PoolingType.ALL

    def __init__(self, cfg: NomicBertConfig, num_labels: int):
        super().__init__(cfg)
        self.classifier = nn.Linear(cfg.hidden_size, num_labels)

    @classmethod
    def from_hf_config(cls, config: dict) -> NomicBertForTokenClassification:
        return cls(NomicBertConfig.from_hf(config), num_labels_of(config))

    @property
    def num_labels(self) -> int:
        return self.classifier.out_features

    def head(self, rows: torch.Tensor) -> torch.Tensor:
        return self.classifier(rows)  # [tokens, num_labels]
