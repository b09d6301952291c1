"""The CPU fast path, as a transform of a built model: `optimize(module, kernels)`.

For one short text, MKL's sgemm (F.linear) spends twice as long in a small model's matrix
products as oneDNN does with weights reordered once (5.0 against 2.6 ms for MiniLM's 24
products at 11 rows), and poolsvc's own kernel (engine/linear.cpp) 0.7x of oneDNN's time
again (1.7 against 2.4 ms, bench/products.py); for a batch each bias, GELU and residual add
is one more pass over the activations (docs/benchmarks.md has the profiles). So:

- every linear layer of the body holds its weight packed once, at load: in linear.cpp's panels
  where the native kernels are built and the CPU fits them (AVX-512; AVX512-BF16 without AMX
  for bfloat16), else in oneDNN's blocked layout, run through
  `torch.ops.mkldnn._linear_pointwise` (the op inductor's CPU freezing pass emits);
- the bias, the GELU and the residual add run inside the matrix product (oneDNN: as post-ops);
- the query, key and value of BERT-style layers (BERT, RoBERTa, MPNet, DistilBERT) are one
  matrix product, gathered once per attention bucket;
- ModernBERT's GeGLU as two products, the gate's multiply inside the second;
- attention without a score bias (BERT, RoBERTa, XLM-R, DistilBERT, NomicBERT, ModernBERT where
  no sequence outgrows its window) runs poolsvc's own kernel (engine/attention.cpp: within each
  sequence, nothing padded, no scores across sequences) where it builds, else PyTorch's ops;
- a batch runs in slices of whole sequences of about SLICE_TOKENS tokens (see _in_slices).

The results are the same computation up to float rounding (the tests compare every family with
its reference with the transform on). The packed weights are for inference only: a transformed
module cannot be saved, copied or moved.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from poolsvc.engine import native
from poolsvc.engine.layers import FUSED_GELU, activation, qkv_attention
from poolsvc.engine.lora import adapted
from poolsvc.engine.models.bert import BertForMaskedLM, BertLayer, BertModel
from poolsvc.engine.models.distilbert import DistilBertModel, TransformerBlock
from poolsvc.engine.models.modernbert import ModernBertEncoderLayer, ModernBertModel, attend
from poolsvc.engine.models.mpnet import MPNetLayer, MPNetModel
from poolsvc.engine.models.nomic_bert import NomicBertAttention, NomicBertModel
from poolsvc.engine.packing import PackedBatch

# Task heads stay as they are: a few rows per batch, and their outputs are the answers.
_KEEP = ("classifier", "pre_classifier", "score", "pooler")

_linear = torch.ops.mkldnn._linear_pointwise

# oneDNN builds (about 1 ms) and caches a kernel for each number of rows it sees. Products run on
# blocks of at most ROW_BLOCK rows (a slice longer than that is one sequence: a decoder's long
# input); blocks of more than EXACT_ROWS rows are padded to a multiple of ROW_MULTIPLE. That
# bounds the shapes however the batches vary, so the caches stop growing (memory stays flat)
# and nearly every call finds its kernel built; small blocks are not padded, since 16 rows cost
# 18% more than 11 (one short text).
ROW_BLOCK = 1024
EXACT_ROWS = 64
ROW_MULTIPLE = 16
# Slices of ~1,024 tokens: +5% on queries and +10% on passages against whole batches of ~11,000
# and ~15,000 tokens (512: -2% and +5%; 2,048: +3% and +7%).
SLICE_TOKENS = 1024


def by_blocks(fn, *inputs: torch.Tensor, pad: bool = True) -> torch.Tensor:
    """fn applied to the same blocks of rows of `inputs` ([rows, ...] each), concatenated;
    `pad`: blocks padded as oneDNN's kernels want them (not for linear.cpp's)."""
    rows = inputs[0].shape[0]
    if rows > ROW_BLOCK:
        return torch.cat([by_blocks(fn, *(t[start:start + ROW_BLOCK] for t in inputs), pad=pad)
                          for start in range(0, rows, ROW_BLOCK)])
    padding = -rows % ROW_MULTIPLE if rows > EXACT_ROWS and pad else 0
    if not padding:
        return fn(*inputs)
    return fn(*(F.pad(t, (0, 0, 0, padding)) for t in inputs))[:rows]


def supports(dtype: torch.dtype) -> bool:
    """Whether this torch build and CPU run oneDNN linear layers in `dtype`."""
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype is torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return dtype is torch.float32


_POST = {"none": "gelu", "tanh": "gelu_tanh"}  # a oneDNN GELU algorithm -> linear.cpp's post


class PackedLinear(nn.Module):
    """nn.Linear with its weight packed once, and what follows the product in the same kernel:
    `gelu` ("none": erf, "tanh") after the bias, or `binary` ("add", "mul") with a second input
    of the output's shape. Called as layer(x), or layer(x, other) with `binary`. `linear`:
    linear.cpp's kernel, which runs the product where it fits the weight's dtype; else oneDNN."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, gelu: str | None = None,
                 binary: str | None = None, linear: native.Linear | None = None):
        super().__init__()
        if gelu is not None and binary is not None:
            raise ValueError("a GELU and a binary post-op cannot both follow the product")
        self.out_features, self.in_features = weight.shape
        self.attr, self.algorithm = ("gelu", gelu) if gelu is not None else ("none", "")
        self.binary = binary
        # Attributes, not buffers: the packed weights are not state_dict tensors to save or copy.
        self.native = None  # linear.cpp's product, where it fits
        if linear is not None and linear.fits(weight.dtype):
            self.native = linear.product(weight, bias, binary or _POST.get(gelu))
            self.register_buffer("bias", self.native.bias)  # float32, what the kernel adds
        else:
            # The row count only picks the layout, any number of rows runs; reordered without
            # one, each new number of rows cost ~0.6 MiB more (a second copy of the weight).
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), ROW_MULTIPLE)
            self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @property
    def pads(self) -> bool:
        """Whether blocks of rows are padded for this layer (oneDNN's, see by_blocks)."""
        return self.native is None

    @classmethod
    def of(cls, *linears: nn.Linear, gelu: str | None = None, binary: str | None = None,
           linear: native.Linear | None = None) -> PackedLinear:
        """One layer for `linears` of the same input, outputs side by side."""
        weight = torch.cat([lin.weight for lin in linears])  # [sum of out, in]
        biases = [lin.bias for lin in linears]
        if all(b is None for b in biases):
            bias = None
        else:
            bias = torch.cat([b if b is not None else weight.new_zeros(lin.out_features)
                              for b, lin in zip(biases, linears)])
        return cls(weight, bias, gelu, binary, linear)

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        """[rows, in] -> [rows, out]; with `binary`, then added to or multiplied by `other`
        ([rows, out])."""
        if (other is None) != (self.binary is None):
            raise TypeError(f"this product's binary post-op is {self.binary!r}: pass `other` "
                            "exactly when it has one")
        if self.native is not None:
            return self.native(x, other)
        if other is None:
            return by_blocks(self._forward, x)
        return by_blocks(self._binary, x, other)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return _linear(x, self.packed, self.bias, self.attr, [], self.algorithm)

    def _binary(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        return _linear.binary(x, other, self.packed, self.bias, self.binary)

    @property
    def onednn_key(self) -> tuple:
        """What oneDNN builds and caches a kernel for, besides the number of rows and threads:
        layers with the same key share their kernels."""
        return (self.in_features, self.out_features, self.bias is None, self.attr,
                self.algorithm, self.binary, self.packed.dtype)

    def warm(self, rows: int) -> None:
        """Runs the layer once on `rows` zero rows, so oneDNN builds its kernel for them."""
        x = torch.zeros(rows, self.in_features, dtype=self.packed.dtype)
        self(x, None if self.binary is None else x.new_zeros(rows, self.out_features))

    def extra_repr(self) -> str:
        fused = f", gelu={self.algorithm!r}" if self.attr == "gelu" else ""
        if self.binary is not None:
            fused += f", binary={self.binary!r}"
        by = "linear.cpp" if self.native is not None else "oneDNN"
        return f"in_features={self.in_features}, out_features={self.out_features}{fused}, by {by}"


class FusedBertLayer(nn.Module):
    """A post-norm encoder layer (BERT's; MPNet's and DistilBERT's under their names): one
    [3 * hidden, hidden] product for query, key and value, then attention, then the rest of the
    layer (output product + residual + LayerNorm, FFN) one block of rows at a time, so a block's
    [rows, intermediate] activations stay in cache between its products. `kernels`: the native
    ones, for the products and for qkv_attention to use where they fit (the attention not with
    MPNet's bias)."""

    def __init__(self, query: nn.Linear, key: nn.Linear, value: nn.Linear, num_heads: int,
                 attention_output: nn.Linear, attention_norm: nn.LayerNorm,
                 intermediate: nn.Linear, hidden_act: str, output: nn.Linear,
                 output_norm: nn.LayerNorm, kernels: native.Kernels | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.attention_kernel = kernels and kernels.attention
        linear = kernels and kernels.linear
        self.qkv = PackedLinear.of(query, key, value, linear=linear)
        self.attention_output = PackedLinear.of(attention_output, binary="add", linear=linear)
        self.attention_norm = attention_norm
        gelu = FUSED_GELU.get(hidden_act)
        self.intermediate = PackedLinear.of(intermediate, gelu=gelu, linear=linear)
        # activations with no fused form run after the product
        self.act = None if gelu is not None else activation(hidden_act)
        self.output = PackedLinear.of(output, binary="add", linear=linear)
        self.output_norm = output_norm

    @classmethod
    def of_bert(cls, layer: BertLayer, hidden_act: str,
                kernels: native.Kernels | None) -> FusedBertLayer:
        attn = layer.attention.self
        return cls(attn.query, attn.key, attn.value, attn.num_heads,
                   layer.attention.output.dense, layer.attention.output.LayerNorm,
                   layer.intermediate.dense, hidden_act, layer.output.dense,
                   layer.output.LayerNorm, kernels)

    @classmethod
    def of_mpnet(cls, layer: MPNetLayer, hidden_act: str,
                 kernels: native.Kernels | None) -> FusedBertLayer:
        attn = layer.attention.attn
        return cls(attn.q, attn.k, attn.v, attn.num_heads, attn.o, layer.attention.LayerNorm,
                   layer.intermediate.dense, hidden_act, layer.output.dense,
                   layer.output.LayerNorm, kernels)

    @classmethod
    def of_distilbert(cls, layer: TransformerBlock, hidden_act: str,
                      kernels: native.Kernels | None) -> FusedBertLayer:
        attn, ffn = layer.attention, layer.ffn
        return cls(attn.q_lin, attn.k_lin, attn.v_lin, attn.n_heads, attn.out_lin,
                   layer.sa_layer_norm, ffn.lin1, hidden_act, ffn.lin2, layer.output_layer_norm,
                   kernels)

    def forward(self, x: torch.Tensor, batch: PackedBatch, bias=None) -> torch.Tensor:
        """`bias`: MPNet's relative-position bias (layers.varlen_attention)."""
        qkv = self.qkv(x).view(x.shape[0], 3, self.num_heads, -1)  # [num_tokens, 3, heads, d]
        context = qkv_attention(qkv, batch, bias=bias,
                                kernel=self.attention_kernel).flatten(1)  # [num_tokens, hidden]
        return by_blocks(self._after_attention, context, x, pad=self.qkv.pads)

    def _after_attention(self, context: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = self.attention_norm(self.attention_output(context, x))  # + x in the product
        h = self.intermediate(x)  # [rows, intermediate]
        if self.act is not None:
            h = self.act(h)
        return self.output_norm(self.output(h, x))


class FusedModernBertLayer(nn.Module):
    """ModernBertEncoderLayer with each residual add inside the product before it, and GeGLU as
    two products: Wi's first half with its GELU as a post-op, then its second half multiplied
    by that inside the product (no [rows, 2 * intermediate] tensor, no separate GELU and
    product passes)."""

    def __init__(self, layer: ModernBertEncoderLayer, hidden_act: str,
                 kernels: native.Kernels | None = None):
        super().__init__()
        self.attention_kernel = kernels and kernels.attention
        linear = kernels and kernels.linear
        self.attention_type = layer.attention_type
        self.attn_norm, self.mlp_norm = layer.attn_norm, layer.mlp_norm
        self.head_dim, self.window = layer.attn.head_dim, layer.attn.window
        self.Wqkv = PackedLinear.of(layer.attn.Wqkv, linear=linear)
        self.attn_out = PackedLinear.of(layer.attn.Wo, binary="add", linear=linear)
        mlp, half = layer.mlp, layer.mlp.Wo.in_features
        gelu = FUSED_GELU.get(hidden_act)
        bias = mlp.Wi.bias
        self.act = None if gelu is not None else mlp.act
        self.inputs = PackedLinear(mlp.Wi.weight[:half], None if bias is None else bias[:half],
                                   gelu, linear=linear)
        self.gate = PackedLinear(mlp.Wi.weight[half:], None if bias is None else bias[half:],
                                 binary="mul", linear=linear)
        self.mlp_out = PackedLinear.of(mlp.Wo, binary="add", linear=linear)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                batch: PackedBatch) -> torch.Tensor:
        context = attend(self.Wqkv(self.attn_norm(x)), self.head_dim, self.window, cos, sin,
                         batch, self.attention_kernel)  # [num_tokens, hidden]
        return by_blocks(self._after_attention, context, x, pad=self.Wqkv.pads)

    def _after_attention(self, context: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = self.attn_out(context, x)  # [rows, hidden], + x in the product
        h = self.mlp_norm(x)
        inputs = self.inputs(h)  # [rows, intermediate]
        if self.act is not None:
            inputs = self.act(inputs)
        return self.mlp_out(self.gate(h, inputs), x)


def optimize(module: nn.Module, kernels: native.Kernels | None = None) -> int:
    """Switches `module`'s body to the CPU fast path in place; returns how many matrix products
    it packs. The module must already be on the CPU in its serving dtype. `kernels`: the native
    ones (native.load()) for the products and attention they take; None keeps oneDNN's
    products and PyTorch's attention."""
    module.forward = _in_slices(module.forward)
    linear = kernels and kernels.linear
    count = 0
    if isinstance(module, BertModel):  # RoBERTa and XLM-R too: the same layers
        act = module.config.hidden_act
        count += _fuse(module.encoder.layer, lambda x: FusedBertLayer.of_bert(x, act, kernels))
    elif isinstance(module, MPNetModel):
        act = module.config.hidden_act
        count += _fuse(module.encoder.layer, lambda x: FusedBertLayer.of_mpnet(x, act, kernels))
    elif isinstance(module, DistilBertModel):
        act = module.config.activation
        count += _fuse(module.transformer.layer,
                       lambda x: FusedBertLayer.of_distilbert(x, act, kernels))
    elif isinstance(module, ModernBertModel):
        act = module.config.hidden_activation
        count += _fuse(module.layers, lambda x: FusedModernBertLayer(x, act, kernels))
    elif isinstance(module, NomicBertModel):
        for attention in module.modules():
            if isinstance(attention, NomicBertAttention):
                attention.attention_kernel = kernels and kernels.attention
    if isinstance(module, BertForMaskedLM):  # SPLADE: the vocabulary projection, 2.4x faster
        predictions = module.cls.predictions
        weight = module.embeddings.word_embeddings.weight if predictions.decoder is None \
            else predictions.decoder.weight
        predictions.vocab = PackedLinear(weight, predictions.bias, linear=linear)
        count += 1
    return count + _pack_linears(module, linear)


def native_products(module: nn.Module) -> int:
    """How many of `module`'s packed products linear.cpp runs (the rest: oneDNN)."""
    return sum(isinstance(m, PackedLinear) and m.native is not None for m in module.modules())


def warm(module: nn.Module) -> int:
    """Builds oneDNN's kernel of each of `module`'s products for every row count up to
    EXACT_ROWS (a lone text, or a block of a few), on the calling thread; returns the products
    run. oneDNN keys its cached kernels by the number of threads too, so this must run on the
    thread that computes, with its thread count. Otherwise the first batch of each new number of
    tokens paid ~0.75 ms per distinct product (MiniLM: 3-4 ms on a 4-5 ms call, one text);
    larger blocks are padded to a few shapes and cost enough for one build not to matter."""
    kernels: dict[tuple, PackedLinear] = {}
    for layer in module.modules():
        if isinstance(layer, PackedLinear) and layer.native is None:  # linear.cpp builds none
            kernels.setdefault(layer.onednn_key, layer)
    with torch.inference_mode():
        for layer in kernels.values():
            for rows in range(1, EXACT_ROWS + 1):
                layer.warm(rows)
    return len(kernels) * EXACT_ROWS


def _fuse(layers: nn.ModuleList, fused) -> int:
    """Replaces each layer by `fused(layer)`, except layers with LoRA adapters (a fused layer
    concatenates its linear layers' weights; _pack_linears packs theirs inside their adapter
    wrappers); returns the matrix products made."""
    for i, layer in enumerate(layers):
        if not adapted(layer):
            layers[i] = fused(layer)
    return sum(isinstance(m, PackedLinear) for m in layers.modules())


def _in_slices(forward):
    """The model's forward over a batch cut into slices of whole sequences of about SLICE_TOKENS
    tokens, one after the other: every activation of a slice fits in cache, and no tensor of a
    big batch is large enough to be mapped fresh from the OS (page faults) at every layer.
    Sequences never span slices, so the rows are the same. Slices take the sequences by length,
    so each has few attention buckets and blocks of sequences of similar length (+4% on queries
    against the batch's order, with buckets)."""

    def run(batch: PackedBatch) -> torch.Tensor:
        if batch.pixel_values is not None or len(batch.split(SLICE_TOKENS)) == 1:
            return forward(batch)
        ordered, rows = batch.by_length()
        hidden = torch.cat([forward(part) for part in ordered.split(SLICE_TOKENS)])
        return hidden[rows]  # [num_tokens, hidden], in the batch's order

    return run


def _pack_linears(module: nn.Module, linear: native.Linear | None) -> int:
    count = 0
    for name, child in module.named_children():
        if name in _KEEP:
            continue
        if isinstance(child, nn.Linear):
            setattr(module, name, PackedLinear.of(child, linear=linear))
            count += 1
        else:
            count += _pack_linears(child, linear)
    return count
