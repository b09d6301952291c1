"""The Llama-family decoders (Llama, Mistral, Qwen2, Qwen3) on packed tokens against transformers.

Each case saves a tiny random-weight transformers model, loads it the way served.py does (built
on the meta device, then filled), and compares packed outputs with transformers run on each
sequence alone.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from safetensors.torch import save_file
from tiny_models import load_ours
from torch import nn

from poolsvc.engine.loader import load_state_dict
from poolsvc.engine.models.llama import (
    LlamaForSequenceClassification,
    LlamaModel,
    MistralForSequenceClassification,
    MistralModel,
)
from poolsvc.engine.models.qwen2 import (
    Qwen2ForProcessRewardModel,
    Qwen2ForRewardModel,
    Qwen2ForSequenceClassification,
    Qwen2Model,
)
from poolsvc.engine.models.qwen3 import Qwen3ForSequenceClassification, Qwen3Model
from poolsvc.engine.packing import PackedBatch
from poolsvc.engine.params import PoolingType

TINY = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
LENS = (23, 1, 61, 9)
TOL = 1e-4
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}

# case -> (transformers family prefix, our body class, config overrides, expected max_positions)
BODIES = {
    "llama": ("Llama", LlamaModel, {}, 256),
    "llama-biases": ("Llama", LlamaModel, dict(attention_bias=True, mlp_bias=True), 256),
    "llama3-rope": ("Llama", LlamaModel, dict(rope_parameters=LLAMA3_ROPE), 256),
    "linear-rope": ("Llama", LlamaModel,
                    dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0,
                                          "factor": 4.0}), 256),
    "mistral": ("Mistral", MistralModel, dict(head_dim=32, sliding_window=128), 128),
    "qwen2": ("Qwen2", Qwen2Model,
              dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                   use_sliding_window=True, sliding_window=64, max_window_layers=1), 64),
    "qwen3": ("Qwen3", Qwen3Model, dict(head_dim=32), 256),
    "qwen3-bias": ("Qwen3", Qwen3Model, dict(head_dim=16, attention_bias=True), 256),
}
CLASSIFIERS = {
    "Llama": LlamaForSequenceClassification,
    "Mistral": MistralForSequenceClassification,
    "Qwen2": Qwen2ForSequenceClassification,
    "Qwen3": Qwen3ForSequenceClassification,
}


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Weights that make attention sharp and norms / biases non-trivial, unlike HF's init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 2:
                p.copy_(noise * p.shape[1] ** -0.5)
            elif "norm" in name:
                p.copy_(1 + 0.2 * noise)
            else:  # biases
                p.copy_(0.2 * noise)
    return model.eval()


def hf_model(family: str, kind: str, seed: int = 0, **overrides) -> nn.Module:
    config = getattr(transformers, f"{family}Config")(**{**TINY, **overrides})
    return randomize(getattr(transformers, f"{family}{kind}")(config), seed)



def token_ids(lens=LENS, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, TINY["vocab_size"], (n,), generator=gen).tolist() for n in lens]


def packed(seqs: list[list[int]]) -> PackedBatch:
    return PackedBatch.build(seqs, None, torch.device("cpu"))


def last_rows(batch: PackedBatch) -> torch.Tensor:
    return batch.cu_seqlens[1:].long() - 1


def hf_hidden(body: nn.Module, seqs: list[list[int]]) -> torch.Tensor:
    return torch.cat([body(input_ids=torch.tensor([s])).last_hidden_state[0] for s in seqs])


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@torch.no_grad()
@pytest.mark.parametrize("case", BODIES)
def test_body_matches_transformers(tmp_path, case):
    family, cls, overrides, max_positions = BODIES[case]
    ref = hf_model(family, "Model", **overrides)
    ref.save_pretrained(tmp_path)
    ours = load_ours(cls, tmp_path)
    assert list(ours.buffers()) == []  # nothing fill_weights would leave uninitialized
    assert ours.max_positions == max_positions and ours.hidden_size == TINY["hidden_size"]
    assert ours.default_pooling is PoolingType.LAST
    assert torch.equal(ours.rotary.rope.inv_freq(ours.config.head_dim, torch.device("cpu")),
                       ref.rotary_emb.inv_freq)

    seqs = token_ids()
    want = hf_hidden(ref, seqs)
    assert max_diff(ours(packed(seqs)), want) <= TOL
    assert max_diff(ours(packed(seqs[2:3])), want[24:85]) <= TOL  # one sequence: no padding


@torch.no_grad()
@pytest.mark.parametrize("family", CLASSIFIERS)
def test_sequence_classifier_matches_transformers(tmp_path, family):
    ref = hf_model(family, "ForSequenceClassification", seed=1, num_labels=3,
                   **BODIES[family.lower()][2])
    ref.save_pretrained(tmp_path)
    ours = load_ours(CLASSIFIERS[family], tmp_path)
    assert ours.num_labels == 3 and ours.head_pooling is PoolingType.LAST

    seqs = token_ids(seed=1)
    batch = packed(seqs)
    hidden = ours(batch)
    assert max_diff(hidden, hf_hidden(ref.model, seqs)) <= TOL
    want = torch.cat([ref(input_ids=torch.tensor([s])).logits for s in seqs])
    assert max_diff(ours.head(hidden[last_rows(batch)]), want) <= TOL


@torch.no_grad()
@pytest.mark.parametrize("cls, labels, num_labels", [
    (Qwen2ForRewardModel, {}, 1),                       # Qwen2.5-Math-RM: no labels in config
    (Qwen2ForProcessRewardModel, {"num_labels": 2}, 2),  # Qwen2.5-Math-PRM
])
def test_qwen2_reward_layouts(tmp_path, cls, labels, num_labels):
    config = transformers.Qwen2Config(**TINY, architectures=[cls.__name__], **labels)
    body = randomize(transformers.Qwen2Model(config), seed=2)
    hidden = TINY["hidden_size"]
    score = randomize(nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(),
                                    nn.Linear(hidden, num_labels)), seed=3)
    config.save_pretrained(tmp_path)
    state = {f"model.{k}": v for k, v in body.state_dict().items()}
    state.update({f"score.{k}": v for k, v in score.state_dict().items()})
    save_file(state, str(tmp_path / "model.safetensors"))
    ours = load_ours(cls, tmp_path)
    assert ours.num_labels == num_labels and ours.head_pooling is PoolingType.ALL

    seqs = token_ids(seed=2)
    want = score(hf_hidden(body, seqs))  # [num_tokens, num_labels]
    assert max_diff(ours.head(ours(packed(seqs))), want) <= TOL


@torch.no_grad()
@pytest.mark.parametrize("family, cls, overrides", [
    ("Llama", LlamaModel, {}),
    ("Qwen3", Qwen3Model, dict(head_dim=32, tie_word_embeddings=True)),  # as Qwen3-Embedding
])
def test_causal_lm_checkpoint_loads_into_body(tmp_path, family, cls, overrides):
    ref = hf_model(family, "ForCausalLM", seed=4, **overrides)
    ref.save_pretrained(tmp_path)
    assert any(k.startswith("model.") for k in load_state_dict(tmp_path, allow_pickle=False))
    ours = load_ours(cls, tmp_path)
    seqs = token_ids(seed=4)
    assert max_diff(ours(packed(seqs)), hf_hidden(ref.model, seqs)) <= TOL


def config_dict(family: str, **overrides) -> dict:
    return getattr(transformers, f"{family}Config")(**{**TINY, **overrides}).to_dict()


def build(cls, config: dict):
    with torch.device("meta"):
        return cls.from_hf_config(config)


def test_legacy_rope_theta_and_rope_scaling():
    modern = build(LlamaModel, config_dict("Llama", rope_parameters=LLAMA3_ROPE))
    legacy = config_dict("Llama")
    del legacy["rope_parameters"]
    scaling = {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}
    legacy.update(rope_theta=500000.0, rope_scaling=scaling)
    assert build(LlamaModel, legacy).config.rope == modern.config.rope
    legacy.update(rope_theta=1e6, rope_scaling=None)  # e.g. Qwen2 configs before transformers 5
    assert build(Qwen2Model, legacy).config.rope.theta == 1e6
    linear = {"type": "linear", "factor": 2.0}  # the oldest spelling of rope_type
    assert build(LlamaModel, {**legacy, "rope_scaling": linear}).config.rope.factor == 2.0


def test_sliding_window_caps_max_positions():
    qwen2 = config_dict("Qwen2")
    assert build(Qwen2Model, {**qwen2, "sliding_window": 64}).max_positions == 256  # not in use
    used = {**qwen2, "use_sliding_window": True, "sliding_window": 64, "layer_types": None}
    assert build(Qwen2Model, {**used, "max_window_layers": 2}).max_positions == 256  # no layer
    assert build(Qwen2Model, {**used, "max_window_layers": 0}).max_positions == 64
    mistral = config_dict("Mistral", sliding_window=None)
    assert build(MistralModel, mistral).max_positions == 256
    del mistral["sliding_window"]  # transformers' default window, 4096, is above 256
    assert build(MistralModel, mistral).max_positions == 256


def test_num_labels_from_config():
    base = config_dict("Qwen2")
    base.pop("id2label", None), base.pop("num_labels", None)
    assert build(Qwen2ForSequenceClassification, base).num_labels == 2
    assert build(Qwen2ForRewardModel, base).num_labels == 1
    assert build(Qwen2ForProcessRewardModel, base).num_labels == 2
    labels = {"id2label": {"0": "bad", "1": "ok", "2": "good"}}
    assert build(Qwen2ForRewardModel, {**base, **labels}).num_labels == 3
    assert build(Qwen2ForRewardModel, {**base, **labels, "num_labels": 4}).num_labels == 4
    model = build(Qwen2ForRewardModel, {**base, **labels})
    assert model.score[2].weight.shape == (3, TINY["hidden_size"])


@pytest.mark.parametrize("overrides, message", [
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "rope_type 'yarn'"),
    (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0}), "rope_type 'dynamic'"),
    (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0}), "needs 'low_freq_factor'"),
    (dict(rope_parameters={"rope_type": "default", "partial_rotary_factor": 0.5}),
     "partial_rotary_factor"),
    (dict(num_key_value_heads=3), "multiple of num_key_value_heads"),
    (dict(hidden_act="swiglu"), "hidden_act 'swiglu'"),
    (dict(num_labels=-1), "num_labels must be at least 1"),
])
def test_unsupported_configs_raise(overrides, message):
    config = {**config_dict("Llama"), **overrides}
    with pytest.raises(ValueError, match=message):
        build(LlamaModel, config)
