"""DeBERTa-v2 and v3 encoders (NLI and zero-shot classifiers, mxbai-rerank-v1-style
cross-encoders, taggers) on packed tokens.

BERT's layer layout with disentangled attention: besides content to content (q k^T), each
query's content attends to the key's relative position (c2p) and each key's content to the
query's relative position (p2c), through projections of one table of relative-position
embeddings (`encoder.rel_embeddings`, log-bucketed past `position_buckets / 2` in v3). These
terms are a bias per (query, key) pair that depends on the pair's content, built per padded
attention group by layers.varlen_attention. v2's x-large models add a convolution after the
first layer (`encoder.conv`), run here per sequence on the packed rows.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from poolsvc.engine.backend import Backend
from poolsvc.engine.description import Kind
from poolsvc.engine.layers import activation, varlen_attention
from poolsvc.engine.models.bert import BertIntermediate, BertResidualOutput, num_labels_of
from poolsvc.engine.packing import PackedBatch
from poolsvc.engine.params import PoolingType

POSITION_ATTENTION = ("c2p", "p2c")


@dataclass(frozen=True)
class DebertaV2Config:
    """config.json's fields, with DebertaV2Config's defaults (config.json omits defaults)."""

    vocab_size: int = 128100
    hidden_size: int = 1536
    num_hidden_layers: int = 24
    num_attention_heads: int = 24
    intermediate_size: int = 6144
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 0
    layer_norm_eps: float = 1e-7
    relative_attention: bool = False
    max_relative_positions: int = -1
    position_buckets: int = -1
    position_biased_input: bool = True
    pos_att_type: tuple[str, ...] = ()
    share_att_key: bool = False
    norm_rel_ebd: str = "none"
    embedding_size: int | None = None
    attention_head_size: int | None = None
    pooler_hidden_size: int | None = None
    pooler_hidden_act: str = "gelu"
    conv_kernel_size: int = 0
    conv_groups: int = 1
    conv_act: str = "tanh"

    @classmethod
    def from_hf(cls, config: dict) -> DebertaV2Config:
        values = {k: config[k] for k in cls.__dataclass_fields__ if config.get(k) is not None}
        kinds = values.get("pos_att_type", ())
        if isinstance(kinds, str):  # older configs: "p2c|c2p"
            kinds = kinds.lower().split("|")
        values["pos_att_type"] = tuple(x.strip() for x in kinds)
        cfg = cls(**values)
        if cfg.attention_head_size is None and cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if cfg.pooler_hidden_size not in (None, cfg.hidden_size):
            raise ValueError(f"pooler_hidden_size {cfg.pooler_hidden_size} must equal "
                             f"hidden_size {cfg.hidden_size}")
        if cfg.conv_kernel_size > 0 and cfg.conv_kernel_size % 2 == 0:
            raise ValueError(f"conv_kernel_size {cfg.conv_kernel_size} is not supported (odd "
                             "sizes only)")
        activation(cfg.hidden_act)
        activation(cfg.pooler_hidden_act, "pooler_hidden_act")
        if cfg.conv_kernel_size > 0:
            activation(cfg.conv_act, "conv_act")
        return cfg

    @property
    def head_dim(self) -> int:
        return self.attention_head_size or self.hidden_size // self.num_attention_heads

    @property
    def max_relative(self) -> int:
        return self.max_relative_positions if self.max_relative_positions > 0 \
            else self.max_position_embeddings

    @property
    def span(self) -> int:
        """Half the rows of the relative-position table (HF's pos_ebd_size)."""
        return self.position_buckets if self.position_buckets > 0 else self.max_relative


def make_log_bucket_position(relative_pos: torch.Tensor, bucket_size: int,
                             max_position: int) -> torch.Tensor:
    """transformers' make_log_bucket_position, with the same float steps: distances under
    bucket_size / 2 exactly, longer ones on a log scale up to max_position."""
    sign = torch.sign(relative_pos)
    mid = bucket_size // 2
    abs_pos = torch.where((relative_pos < mid) & (relative_pos > -mid),
                          torch.tensor(mid - 1).type_as(relative_pos), torch.abs(relative_pos))
    log_pos = torch.ceil(torch.log(abs_pos / mid)
                         / torch.log(torch.tensor((max_position - 1) / mid)) * (mid - 1)) + mid
    return torch.where(abs_pos <= mid, relative_pos.type_as(log_pos), log_pos * sign)


@functools.lru_cache(maxsize=64)
def relative_index(width: int, span: int, buckets: int, max_position: int,
                   device: torch.device) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    """For sequences padded to `width`: the rows lo..hi of the relative-position table they
    use, and [width, width] indices into those rows: c2p's [query, key] and p2c's [key, query]
    (HF's clamp(±bucket(i - j) + span))."""
    position = torch.arange(width, device=device)
    relative = position[:, None] - position[None, :]  # query - key
    if buckets > 0:
        relative = make_log_bucket_position(relative, buckets, max_position).long()
    c2p = (relative + span).clamp(0, 2 * span - 1)
    p2c = (span - relative).clamp(0, 2 * span - 1)
    lo = int(torch.minimum(c2p.min(), p2c.min()))
    hi = int(torch.maximum(c2p.max(), p2c.max()))
    return lo, hi, c2p - lo, p2c - lo


class DebertaV2Embeddings(nn.Module):
    def __init__(self, cfg: DebertaV2Config):
        super().__init__()
        size = cfg.embedding_size or cfg.hidden_size
        self.word_embeddings = nn.Embedding(cfg.vocab_size, size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, size) \
            if cfg.position_biased_input else None
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, size) \
            if cfg.type_vocab_size > 0 else None
        self.embed_proj = nn.Linear(size, cfg.hidden_size, bias=False) \
            if size != cfg.hidden_size else None
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        x = self.word_embeddings(batch.input_ids)  # [num_tokens, embedding_size]
        if self.position_embeddings is not None:
            x = x + self.position_embeddings(batch.positions)
        if self.token_type_embeddings is not None:
            x = x + self.token_type_embeddings(batch.token_type_ids)
        if self.embed_proj is not None:
            x = self.embed_proj(x)
        return self.LayerNorm(x)  # [num_tokens, hidden]


@dataclass(frozen=True)
class RelativeTable:
    """One pass's relative-position embeddings: rows lo.. of the (normalized) table, as many
    as the batch's longest sequence uses."""

    embeddings: torch.Tensor  # [rows, hidden]
    lo: int
    cfg: DebertaV2Config

    def index(self, width: int):
        cfg = self.cfg
        lo, hi, c2p, p2c = relative_index(width, cfg.span, cfg.position_buckets,
                                          cfg.max_relative, self.embeddings.device)
        return slice(lo - self.lo, hi + 1 - self.lo), c2p, p2c


class DisentangledSelfAttention(nn.Module):
    def __init__(self, cfg: DebertaV2Config):
        super().__init__()
        self.cfg = cfg
        self.num_heads = cfg.num_attention_heads
        inner = cfg.num_attention_heads * cfg.head_dim
        self.query_proj = nn.Linear(cfg.hidden_size, inner)
        self.key_proj = nn.Linear(cfg.hidden_size, inner)
        self.value_proj = nn.Linear(cfg.hidden_size, inner)
        self.c2p = "c2p" in cfg.pos_att_type
        self.p2c = "p2c" in cfg.pos_att_type
        if cfg.relative_attention and not cfg.share_att_key:
            if self.c2p:
                self.pos_key_proj = nn.Linear(cfg.hidden_size, inner)
            if self.p2c:
                self.pos_query_proj = nn.Linear(cfg.hidden_size, inner)
        self.scale = 1.0 / math.sqrt(cfg.head_dim * (1 + self.c2p + self.p2c))

    def forward(self, x: torch.Tensor, batch: PackedBatch,
                table: RelativeTable | None) -> torch.Tensor:
        shape = (x.shape[0], self.num_heads, -1)  # [num_tokens, heads, head_dim]
        q, k, v = (proj(x).view(shape) for proj in (self.query_proj, self.key_proj,
                                                     self.value_proj))
        bias = None if table is None or not (self.c2p or self.p2c) else self._bias(table)
        return varlen_attention(q, k, v, batch, bias=bias, scale=self.scale).flatten(1)

    def _bias(self, table: RelativeTable):
        """The c2p and p2c scores of one padded group, scaled like q k^T."""
        share, rows = self.cfg.share_att_key, table.embeddings
        shape = (rows.shape[0], self.num_heads, -1)  # [rows, heads, head_dim]
        pos_key = (self.key_proj if share else self.pos_key_proj)(rows).view(shape) \
            if self.c2p else None
        pos_query = (self.query_proj if share else self.pos_query_proj)(rows).view(shape) \
            if self.p2c else None

        def bias(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            num_seqs, heads, width, _ = q.shape  # [num_seqs, heads, width, head_dim]
            used, c2p_index, p2c_index = table.index(width)
            expand = (num_seqs, heads, width, width)
            scores = 0
            if pos_key is not None:  # query content . key's position relative to it
                c2p = torch.matmul(q, pos_key[used].permute(1, 2, 0))  # [.., width, rows]
                scores = c2p.gather(-1, c2p_index.expand(expand))
            if pos_query is not None:  # key content . query's position relative to it
                p2c = torch.matmul(k, pos_query[used].permute(1, 2, 0))  # [.., width, rows]
                scores = scores + p2c.gather(-1, p2c_index.expand(expand)).transpose(-1, -2)
            return scores * self.scale  # [num_seqs, heads, width, width]

        return bias


# BERT's dense -> add -> LayerNorm and dense -> activation blocks, under the same names
class DebertaV2Attention(nn.Module):
    def __init__(self, cfg: DebertaV2Config):
        super().__init__()
        self.self = DisentangledSelfAttention(cfg)
        self.output = BertResidualOutput(cfg.num_attention_heads * cfg.head_dim, cfg)

    def forward(self, x, batch, table) -> torch.Tensor:
        return self.output(self.self(x, batch, table), x)


class DebertaV2Layer(nn.Module):
    def __init__(self, cfg: DebertaV2Config):
        super().__init__()
        self.attention = DebertaV2Attention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertResidualOutput(cfg.intermediate_size, cfg)

    def forward(self, x, batch, table) -> torch.Tensor:
        x = self.attention(x, batch, table)
        return self.output(self.intermediate(x), x)


class ConvLayer(nn.Module):
    """v2 x-large's convolution of the embeddings over each sequence (zeros past its ends),
    added to the first layer's output."""

    def __init__(self, cfg: DebertaV2Config):
        super().__init__()
        self.conv = nn.Conv1d(cfg.hidden_size, cfg.hidden_size, cfg.conv_kernel_size,
                              groups=cfg.conv_groups)
        self.act = activation(cfg.conv_act, "conv_act")
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, embedded: torch.Tensor, residual: torch.Tensor,
                batch: PackedBatch) -> torch.Tensor:
        # rows laid out with `pad` zero rows between sequences, so a window never crosses two
        pad = (self.conv.kernel_size[0] - 1) // 2
        lens = torch.diff(batch.cu_seqlens).long()
        seq = torch.repeat_interleave(torch.arange(len(lens), device=lens.device), lens)
        where = torch.arange(embedded.shape[0], device=lens.device) + (seq + 1) * pad
        gapped = embedded.new_zeros(embedded.shape[0] + (len(lens) + 1) * pad, embedded.shape[1])
        gapped[where] = embedded
        out = F.conv1d(gapped.T[None], self.conv.weight, self.conv.bias,
                       groups=self.conv.groups)[0].T  # [rows - 2 pad, hidden]
        return self.LayerNorm(residual + self.act(out[where - pad]))


class DebertaV2Encoder(nn.Module):
    def __init__(self, cfg: DebertaV2Config):
        super().__init__()
        self.layer = nn.ModuleList(DebertaV2Layer(cfg) for _ in range(cfg.num_hidden_layers))
        if cfg.relative_attention:
            self.rel_embeddings = nn.Embedding(2 * cfg.span, cfg.hidden_size)
        norms = [x.strip() for x in cfg.norm_rel_ebd.lower().split("|")]
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps) \
            if "layer_norm" in norms else None
        self.conv = ConvLayer(cfg) if cfg.conv_kernel_size > 0 else None

    def relative_table(self, cfg: DebertaV2Config, width: int) -> RelativeTable | None:
        if not cfg.relative_attention:
            return None
        weight = self.rel_embeddings.weight
        lo, hi, _, _ = relative_index(width, cfg.span, cfg.position_buckets, cfg.max_relative,
                                      weight.device)
        rows = weight[lo:hi + 1]  # the norm is per row: normalize only the rows used
        if self.LayerNorm is not None:
            rows = self.LayerNorm(rows)
        return RelativeTable(rows, lo, cfg)


class DebertaV2Model(Backend):
    """Returns the last hidden states, [num_tokens, hidden], of a packed batch."""

    weight_prefix = "deberta."
    default_pooling = PoolingType.CLS

    def __init__(self, cfg: DebertaV2Config):
        super().__init__()
        self.config = cfg
        self.embeddings = DebertaV2Embeddings(cfg)
        self.encoder = DebertaV2Encoder(cfg)

    @classmethod
    def from_hf_config(cls, config: dict) -> DebertaV2Model:
        return cls(DebertaV2Config.from_hf(config))

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def max_positions(self) -> int:
        return self.config.max_position_embeddings

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        table = self.encoder.relative_table(self.config, batch.max_seqlen)
        embedded = x = self.embeddings(batch)
        for i, layer in enumerate(self.encoder.layer):
            x = layer(x, batch, table)
            if i == 0 and self.encoder.conv is not None:
                x = self.encoder.conv(embedded, x, batch)
        return x


class ContextPooler(nn.Module):
    def __init__(self, cfg: DebertaV2Config):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.act = activation(cfg.pooler_hidden_act, "pooler_hidden_act")

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(pooled))


class DebertaV2ForSequenceClassification(DebertaV2Model):
    """The body's forward; `head` turns pooled [CLS] states into logits (one label: a
    cross-encoder's score)."""

    kind = Kind.CLASSIFIER
    head_pooling = PoolingType.CLS

    def __init__(self, cfg: DebertaV2Config, num_labels: int):
        super().__init__(cfg)
        self.pooler = ContextPooler(cfg)
        self.classifier = nn.Linear(cfg.hidden_size, num_labels)

    @classmethod
    def from_hf_config(cls, config: dict) -> DebertaV2ForSequenceClassification:
        return cls(DebertaV2Config.from_hf(config), num_labels_of(config))

    @property
    def num_labels(self) -> int:
        return self.classifier.out_features

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pooler(pooled))  # [rows, num_labels]


class DebertaV2ForTokenClassification(DebertaV2Model):
    """Per-token labels: `head` turns every token's state into label logits."""

    kind = Kind.CLASSIFIER
    head_pooling = PoolingType.ALL

    def __init__(self, cfg: DebertaV2Config, num_labels: int):
        super().__init__(cfg)
        self.classifier = nn.Linear(cfg.hidden_size, num_labels)

    @classmethod
    def from_hf_config(cls, config: dict) -> DebertaV2ForTokenClassification:
        return cls(DebertaV2Config.from_hf(config), num_labels_of(config))

    @property
    def num_labels(self) -> int:
        return self.classifier.out_features

    def head(self, rows: torch.Tensor) -> torch.Tensor:
        return self.classifier(rows)  # [tokens, num_labels]
