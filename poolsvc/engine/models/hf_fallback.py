"""Any other Hugging Face encoder or decoder body, through transformers' AutoModel.

Correct rather than fast: the packed batch is padded for the model and unpadded after it, so
the rest of the engine (pooling, heads, batching) is the same as for the packed models.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from poolsvc.engine.backend import Backend
from poolsvc.engine.description import Kind
from poolsvc.engine.errors import ModelLoadError
from poolsvc.engine.model_files import ModelFiles
from poolsvc.engine.packing import PackedBatch
from poolsvc.engine.params import PoolingType

# Architecture suffixes whose body AutoModel loads; the LM heads they carry are not needed.
_BODY_SUFFIXES = ("Model", "ForMaskedLM", "ForCausalLM", "ForPreTraining")


class TransformersModel(Backend):
    position_offset = 0  # the wrapped model numbers positions itself

    def __init__(self, model: nn.Module, causal: bool):
        super().__init__()
        self.model = model
        self.default_pooling = PoolingType.LAST if causal else PoolingType.CLS
        body = model.base_model  # the model itself for AutoModel's bodies
        self._takes_token_types = "token_type_ids" in inspect.signature(body.forward).parameters
        config = model.config
        embeddings = getattr(body, "embeddings", None)
        padding_idx = getattr(getattr(embeddings, "position_embeddings", None), "padding_idx", None)
        # RoBERTa-style models count positions from padding_idx + 1.
        offset = padding_idx + 1 if isinstance(padding_idx, int) else 0
        limit = getattr(config, "max_position_embeddings", None) or 1 << 20
        self._max_positions = limit - offset

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def max_positions(self) -> int:
        return self._max_positions

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        num_seqs, width = batch.num_seqs, batch.max_seqlen
        starts = batch.cu_seqlens[:-1].long()
        lengths = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).long()
        seq = torch.repeat_interleave(torch.arange(num_seqs, device=starts.device), lengths,
                                      output_size=batch.num_tokens)
        flat = seq * width + (torch.arange(batch.num_tokens, device=starts.device) - starts[seq])
        ids = batch.input_ids.new_zeros(num_seqs * width)
        ids[flat] = batch.input_ids
        mask = torch.zeros(num_seqs * width, dtype=torch.long, device=ids.device)
        mask[flat] = 1
        if batch.key_lens is not None:  # tokens no one attends to (ColBERT's query expansion)
            keys = torch.tensor(batch.key_lens, device=ids.device)
            unread = torch.arange(width, device=ids.device)[None, :] >= keys[:, None]
            mask.view(num_seqs, width)[unread] = 0
        inputs = {"input_ids": ids.view(num_seqs, width),
                  "attention_mask": mask.view(num_seqs, width)}
        if self._takes_token_types:
            types = batch.token_type_ids.new_zeros(num_seqs * width)
            types[flat] = batch.token_type_ids
            inputs["token_type_ids"] = types.view(num_seqs, width)
        hidden = self.model.base_model(**inputs).last_hidden_state  # [seqs, width, hidden]
        return hidden.reshape(num_seqs * width, -1)[flat]  # [num_tokens, hidden]


# A masked LM's head on hidden states -> vocabulary logits, by model type (transformers' names).
# BERT's is packed code (models/bert.py).
_MLM_HEADS = {
    "roberta": lambda m: m.lm_head,
    "xlm-roberta": lambda m: m.lm_head,
    "camembert": lambda m: m.lm_head,
    "distilbert": lambda m: lambda h: m.vocab_projector(
        m.vocab_layer_norm(m.activation(m.vocab_transform(h)))),
    "modernbert": lambda m: lambda h: m.decoder(m.head(h)),
}


class TransformersMaskedLM(TransformersModel):
    """A masked LM served as a SPLADE sparse encoder: the body's hidden states, and `head`, the
    checkpoint's own MLM head, for the pooler to turn into vocabulary weights."""

    kind = Kind.SPARSE
    head_pooling = PoolingType.SPLADE

    def __init__(self, model: nn.Module):
        super().__init__(model, causal=False)
        self.default_pooling = PoolingType.SPLADE
        self._head = _MLM_HEADS[model.config.model_type](model)

    def head(self, rows: torch.Tensor) -> torch.Tensor:
        return self._head(rows)  # [rows, vocab]


def load_masked_lm(files: ModelFiles, allow_pickle: bool) -> TransformersMaskedLM:
    model_type = files.hf_config.get("model_type", "")
    if not files.architecture.endswith("ForMaskedLM") or model_type not in _MLM_HEADS:
        raise ModelLoadError(
            f"{files.path}: SPLADE pooling needs a masked-LM checkpoint (…ForMaskedLM) of "
            f"{', '.join(_MLM_HEADS)}; {files.architecture or 'this model'} is not one")
    from transformers import AutoModelForMaskedLM
    return TransformersMaskedLM(_from_pretrained(AutoModelForMaskedLM, files, allow_pickle))


def load(files: ModelFiles, allow_pickle: bool) -> TransformersModel:
    if not files.architecture.endswith(_BODY_SUFFIXES):
        raise ModelLoadError(
            f"{files.path}: architecture {files.architecture or '(none)'} has a task head poolsvc "
            "does not implement; bodies of any architecture (…Model, …ForMaskedLM, …ForCausalLM) "
            "are served through transformers")
    from transformers import AutoModel
    model = _from_pretrained(AutoModel, files, allow_pickle)
    return TransformersModel(model, is_decoder_only(files.architecture, model.config))


def _from_pretrained(auto, files: ModelFiles, allow_pickle: bool) -> nn.Module:
    try:
        model, info = auto.from_pretrained(
            str(files.path), trust_remote_code=False, dtype=torch.float32,
            use_safetensors=None if allow_pickle else True, output_loading_info=True)
    except Exception as exc:
        raise ModelLoadError(f"{files.path}: transformers cannot load {files.architecture}: "
                             f"{exc}") from exc
    if missing := sorted(info.get("missing_keys") or []):
        # transformers would run them randomly initialized: never serve that
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ModelLoadError(f"{files.path}: weights missing from the checkpoint: {shown}")
    return model.eval()


def is_decoder_only(architecture: str, config) -> bool:
    """Causal bodies pool their last token by default (vLLM's rule). A model type transformers
    builds only as a causal LM (GPT-2, Granite, OLMo, ...) is a decoder; one that also has a
    masked-LM form (BERT, RoBERTa, ...) is an encoder unless its config says is_decoder."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )
    model_type = getattr(config, "model_type", "")
    if getattr(config, "is_decoder", False) or architecture.endswith("ForCausalLM"):
        return True
    return (model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
            and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES)
