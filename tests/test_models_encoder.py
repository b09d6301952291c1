"""Packed encoder models and their classification heads against transformers, sequence by sequence.

Each case saves a tiny random-weight transformers model, loads it the way served.py does (built on
the meta device, `to_empty`, `fill_weights`), runs sequences of mixed lengths packed into one batch
and compares with transformers running each sequence alone.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from tiny_models import load_ours

from poolsvc.engine.errors import ModelLoadError
from poolsvc.engine.models.bert import BertForSequenceClassification, BertModel
from poolsvc.engine.models.roberta import (
    RobertaForSequenceClassification,
    RobertaModel,
    XLMRobertaForSequenceClassification,
    XLMRobertaModel,
)
from poolsvc.engine.packing import PackedBatch
from poolsvc.engine.params import PoolingType

ATOL = 1e-4
VOCAB = 1000
TINY = dict(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=96)
BERT = dict(TINY, max_position_embeddings=64, type_vocab_size=2)
ROBERTA = dict(TINY, max_position_embeddings=130, type_vocab_size=1, layer_norm_eps=1e-5)


def save_hf(directory, hf_class, config, seed, **init):
    """A transformers model with random weights, saved as safetensors."""
    torch.manual_seed(seed)
    model = hf_class(config, **init).eval()
    with torch.no_grad():  # trained LayerNorms are not identity, trained biases not zero
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
            elif "classifier" in name or "pooler" in name:  # logits of O(1), not O(0.01)
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(directory)
    return model



def random_sequences(max_positions, seed, pairs):
    """Token ids (never 1, RoBERTa's pad) of lengths 1 ... max_positions, and their token types."""
    gen = torch.Generator().manual_seed(seed)
    lens = [7, 1, max_positions, 23]
    ids = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in lens]
    types = [[0] * (n // 2) + [1] * (n - n // 2) for n in lens] if pairs else None
    return ids, types


def run_both(ours, hf_body, hf_task, token_ids, token_type_ids):
    """(our hidden states, HF's) as [num_tokens, hidden], and (our logits, HF's) for tasks."""
    batch = PackedBatch.build(token_ids, token_type_ids, torch.device("cpu"),
                              ours.position_offset)
    with torch.no_grad():
        hidden = ours(batch)  # [num_tokens, hidden]
        want_hidden, want_logits = [], []
        for i, ids in enumerate(token_ids):
            inputs = {"input_ids": torch.tensor([ids])}
            if token_type_ids is not None:
                inputs["token_type_ids"] = torch.tensor([token_type_ids[i]])
            want_hidden.append(hf_body(**inputs).last_hidden_state[0])
            if hf_task is not None:
                want_logits.append(hf_task(**inputs).logits[0])
        logits = want = None
        if hf_task is not None:
            logits = ours.head(hidden[batch.cu_seqlens[:-1].long()])  # [num_seqs, num_labels]
            want = torch.stack(want_logits)
    return (hidden, torch.cat(want_hidden)), (logits, want)


def max_diff(got, want):
    assert got.shape == want.shape
    return (got - want).abs().max().item()


BODIES = [  # BERT also with pair encodings: token types 0 then 1
    (BertModel, transformers.BertModel, transformers.BertConfig, BERT, False),
    (BertModel, transformers.BertModel, transformers.BertConfig, BERT, True),
    (RobertaModel, transformers.RobertaModel, transformers.RobertaConfig, ROBERTA, False),
    (XLMRobertaModel, transformers.XLMRobertaModel, transformers.XLMRobertaConfig, ROBERTA,
     False),
]
TASKS = [
    (BertForSequenceClassification, BertModel, transformers.BertForSequenceClassification,
     transformers.BertConfig, BERT),
    (RobertaForSequenceClassification, RobertaModel,
     transformers.RobertaForSequenceClassification, transformers.RobertaConfig, ROBERTA),
    (XLMRobertaForSequenceClassification, XLMRobertaModel,
     transformers.XLMRobertaForSequenceClassification, transformers.XLMRobertaConfig, ROBERTA),
]


def _name(case):
    return case[0].__name__ + ("-pairs" if case[-1] is True else "")


@pytest.mark.parametrize("case", BODIES, ids=_name)
def test_body_matches_transformers(tmp_path, case):
    ours_cls, hf_class, hf_config, sizes, pairs = case
    # BERT bodies saved without a pooler; RoBERTa's keep theirs, which must be skipped
    init = {"add_pooling_layer": False} if hf_class is transformers.BertModel else {}
    hf = save_hf(tmp_path, hf_class, hf_config(**sizes), seed=1, **init)
    ours = load_ours(ours_cls, tmp_path)
    assert ours.position_offset == (0 if ours_cls is BertModel else 2)
    assert ours.max_positions == sizes["max_position_embeddings"] - ours.position_offset
    assert ours.hidden_size == 48 and ours.default_pooling is PoolingType.CLS

    token_ids, token_types = random_sequences(ours.max_positions, seed=2, pairs=pairs)
    (hidden, want), _ = run_both(ours, hf, None, token_ids, token_types)
    assert max_diff(hidden, want) <= ATOL


@pytest.mark.parametrize("num_labels", [1, 3])
@pytest.mark.parametrize("case", TASKS, ids=_name)
def test_classifier_matches_transformers(tmp_path, case, num_labels):
    ours_cls, body_cls, hf_class, hf_config, sizes = case
    hf = save_hf(tmp_path, hf_class, hf_config(**sizes, num_labels=num_labels), seed=3)
    ours = load_ours(ours_cls, tmp_path)
    assert ours.num_labels == num_labels and ours.head_pooling is PoolingType.CLS

    pairs = sizes["type_vocab_size"] > 1
    token_ids, token_types = random_sequences(ours.max_positions, seed=4, pairs=pairs)
    (hidden, want_hidden), (logits, want_logits) = run_both(
        ours, hf.base_model, hf, token_ids, token_types)
    assert max_diff(hidden, want_hidden) <= ATOL
    assert max_diff(logits, want_logits) <= ATOL
    # the body alone loads from the task checkpoint (prefix stripped, head skipped)
    body = load_ours(body_cls, tmp_path)
    batch = PackedBatch.build(token_ids, token_types, torch.device("cpu"), body.position_offset)
    with torch.no_grad():
        assert max_diff(body(batch), hidden) <= 1e-6


def test_num_labels_follows_transformers():
    base = dict(BERT, architectures=["BertForSequenceClassification"])
    cases = [({}, 2), ({"id2label": {"0": "a"}}, 1), ({"num_labels": 5, "id2label": {}}, 5)]
    for extra, want in cases:
        with torch.device("meta"):
            assert BertForSequenceClassification.from_hf_config({**base, **extra}).num_labels \
                == want
    with pytest.raises(ValueError, match="num_labels must be at least 1"):
        BertForSequenceClassification.from_hf_config({**base, "num_labels": 0})


def test_unsupported_configs_are_named():
    with pytest.raises(ValueError, match="pad_token_id 0 is not supported"):
        RobertaModel.from_hf_config(dict(ROBERTA, pad_token_id=0))
    with pytest.raises(ValueError, match="leaves no positions"):
        XLMRobertaModel.from_hf_config(dict(ROBERTA, max_position_embeddings=2))
    with pytest.raises(ValueError, match="is_decoder"):
        RobertaForSequenceClassification.from_hf_config(dict(ROBERTA, is_decoder=True))


def test_task_model_needs_its_head_weights(tmp_path):
    save_hf(tmp_path, transformers.RobertaModel, transformers.RobertaConfig(**ROBERTA), seed=5)
    with pytest.raises(ModelLoadError, match="weights missing .*classifier.dense.bias"):
        load_ours(RobertaForSequenceClassification, tmp_path)
