"""Qwen2 decoders: Llama with q/k/v biases, and the Qwen2.5-Math reward-model heads."""

from __future__ import annotations

from torch import nn

from poolsvc.engine.description import Kind
from poolsvc.engine.models.llama import (
    DecoderConfig,
    LlamaModel,
    SequenceClassifier,
    TaskHead,
    TokenClassifier,
)
from poolsvc.engine.params import PoolingType


def qwen_sliding_window(config: dict) -> int | None:
    """The window if any layer uses one, as transformers' Qwen2Config / Qwen3Config decide."""
    window = config.get("sliding_window", 4096)
    if not config.get("use_sliding_window", False) or window is None:
        return None
    layer_types = config.get("layer_types") or [
        "sliding_attention" if i >= config.get("max_window_layers", 28) else "full_attention"
        for i in range(config["num_hidden_layers"])]
    return window if "sliding_attention" in layer_types else None


class Qwen2Model(LlamaModel):
    @classmethod
    def switches(cls, config: dict) -> dict:
        return dict(qkv_bias=True, o_bias=False, sliding_window=qwen_sliding_window(config))


class Qwen2ForSequenceClassification(SequenceClassifier, Qwen2Model):
    pass


class Qwen2ForTokenClassification(TokenClassifier, Qwen2Model):
    pass


class RewardHead(TaskHead):
    """Linear -> ReLU -> Linear on every token (Qwen2.5-Math-RM / -PRM; not in transformers)."""

    kind = Kind.REWARD
    head_pooling = PoolingType.ALL

    def __init__(self, cfg: DecoderConfig):
        super().__init__(cfg)
        h = cfg.hidden_size
        self.score = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, self.num_labels))


class Qwen2ForRewardModel(RewardHead, Qwen2Model):
    default_num_labels = 1  # Qwen2.5-Math-RM-72B: one scalar reward


class Qwen2ForProcessRewardModel(RewardHead, Qwen2Model):
    default_num_labels = 2  # Qwen2.5-Math-PRM: (negative, positive) step logits
