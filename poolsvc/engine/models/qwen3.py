"""Qwen3 decoders: Llama with per-head RMSNorm on q and k, and an explicit head_dim."""

from __future__ import annotations

from poolsvc.engine.models.llama import LlamaModel, SequenceClassifier, TokenClassifier
from poolsvc.engine.models.qwen2 import qwen_sliding_window


class Qwen3Model(LlamaModel):
    @classmethod
    def switches(cls, config: dict) -> dict:
        bias = bool(config.get("attention_bias", False))
        return dict(qkv_bias=bias, o_bias=bias, qk_norm=True,
                    head_dim=config.get("head_dim") or 128,  # transformers' Qwen3Config default
                    sliding_window=qwen_sliding_window(config))


class Qwen3ForSequenceClassification(SequenceClassifier, Qwen3Model):
    pass


class Qwen3ForTokenClassification(TokenClassifier, Qwen3Model):
    pass
