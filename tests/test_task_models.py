"""Every task on every architecture, offline, against transformers / sentence-transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from tiny_models import bert_classifier, decoder, qwen2_reward, reward_reference, xlmr_classifier

from poolsvc import LLM
from poolsvc.engine.errors import InvalidInputError
from poolsvc.engine.params import PoolingParams

CPU = dict(device="cpu", threads=2)
TEXTS = ["What is the capital of France?", "Paris is the capital and largest city of France.",
         "A cat is a small feline.", "東京は日本の首都です。", "café naïve 🚀", "x"]
PAIRS_Q = "What is the capital of France?"
DOCS = ["Paris is the capital and largest city of France.", "A cat is a small feline.",
        "The quick brown fox jumps over the lazy dog.", "Embeddings map text to vectors."]
TOL = 1e-4


def hf_logits(directory, texts, pairs=None):
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(directory).eval()
    rows = []
    with torch.no_grad():
        for item in pairs or texts:
            enc = tok(*item, return_tensors="pt") if pairs else tok(item, return_tensors="pt")
            rows.append(model(**enc).logits[0])
    return torch.stack(rows)


@pytest.mark.parametrize("num_labels,problem,activation", [
    (3, None, torch.softmax),
    (1, None, torch.sigmoid),
    (4, "multi_label_classification", torch.sigmoid),
    (2, "regression", None),
])
def test_bert_classification(tmp_path, minilm_path, num_labels, problem, activation):
    id2label = {i: f"class-{i}" for i in range(num_labels)}
    directory = bert_classifier(tmp_path / "clf", minilm_path, num_labels, id2label=id2label,
                                **({"problem_type": problem} if problem else {}))
    logits = hf_logits(directory, TEXTS)
    want = logits if activation is None else (
        activation(logits, dim=-1) if activation is torch.softmax else activation(logits))
    with LLM(str(directory), task="classify", **CPU) as llm:
        outs = llm.classify(TEXTS)
        raw = llm.classify(TEXTS, PoolingParams(activation=False))
        assert list(llm.engine.model("").labels) == [f"class-{i}" for i in range(num_labels)]
    assert np.abs(np.array([o.outputs.probs for o in outs]) - want.numpy()).max() <= TOL
    assert np.abs(np.array([o.outputs.probs for o in raw]) - logits.numpy()).max() <= TOL


def test_bert_cross_encoder_uses_token_types(tmp_path, minilm_path):
    from sentence_transformers import CrossEncoder
    directory = bert_classifier(tmp_path / "ce", minilm_path, 1)
    want = CrossEncoder(str(directory), device="cpu").predict([(PAIRS_Q, d) for d in DOCS])
    with LLM(str(directory), **CPU) as llm:
        got = [o.outputs.score for o in llm.score(PAIRS_Q, DOCS)]
        # token type ids matter: zeroing them changes the scores
        types = [o.prompt_token_ids for o in llm.score(PAIRS_Q, DOCS)]
    assert np.abs(np.array(got) - want).max() <= 1e-5
    assert all(ids[0] == 101 and ids.count(102) == 2 for ids in types)  # [CLS] q [SEP] d [SEP]


@pytest.mark.parametrize("activation_fn,expected", [
    (None, "sigmoid"), ("torch.nn.modules.linear.Identity", "identity")])
def test_xlmr_reranker(tmp_path, activation_fn, expected):
    """The bge-reranker-v2-m3 layout: XLM-R, one label, RoBERTa pair template."""
    from sentence_transformers import CrossEncoder
    directory = xlmr_classifier(tmp_path / "rr", activation_fn=activation_fn)
    pairs = [(PAIRS_Q, d) for d in DOCS]
    want = CrossEncoder(str(directory), device="cpu").predict(pairs)
    logits = hf_logits(directory, None, pairs)[:, 0].numpy()
    with LLM(str(directory), **CPU) as llm:
        got = np.array([o.outputs.score for o in llm.score(PAIRS_Q, DOCS)])
        raw = np.array([o.outputs.score for o in llm.score(PAIRS_Q, DOCS,
                                                           PoolingParams(activation=False))])
        many = np.array([o.outputs.score for o in llm.score([PAIRS_Q] * 4, DOCS)])
    assert np.abs(got - want).max() <= 1e-5
    assert np.abs(raw - logits).max() <= TOL
    assert np.abs(many - got).max() <= 1e-6
    if expected == "identity":
        assert np.abs(got - logits).max() <= TOL


def test_cross_encoders_need_text(tmp_path):
    directory = xlmr_classifier(tmp_path / "rr")
    with LLM(str(directory), **CPU) as llm, \
            pytest.raises(InvalidInputError, match="scores text pairs"):
        llm.score({"prompt_token_ids": [0, 5, 2]}, DOCS)


@pytest.mark.parametrize("family,task,extra", [
    ("Qwen2", "Model", {}),
    ("Qwen3", "ForCausalLM", {"head_dim": 32, "tie_word_embeddings": True}),
    ("Mistral", "Model", {"head_dim": 32}),
    ("Llama", "Model", {}),
])
def test_decoder_embedders_pool_the_last_token(tmp_path, family, task, extra):
    directory = decoder(tmp_path / "dec", family, task, **extra)
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    body = getattr(transformers, f"{family}Model").from_pretrained(directory).eval()
    with torch.no_grad():
        last = torch.stack([body(**tok(t, return_tensors="pt")).last_hidden_state[0, -1]
                            for t in TEXTS])
    want = torch.nn.functional.normalize(last, dim=-1).numpy()
    with LLM(str(directory), **CPU) as llm:
        outs = llm.embed(TEXTS)
        assert llm.engine.model("").pooling_type.name == "LAST"
    assert all(o.prompt_token_ids[-1] == 0 for o in outs)  # the appended end-of-text token
    assert np.abs(np.array([o.outputs.embedding for o in outs]) - want).max() <= TOL


@pytest.mark.parametrize("family", ["Qwen2", "Qwen3", "Llama", "Mistral"])
def test_decoder_sequence_classifiers(tmp_path, family):
    """The Qwen2.5-1.5B-apeach layout: LAST pooling, then a bias-free score head."""
    directory = decoder(tmp_path / "clf", family, "ForSequenceClassification", num_labels=2,
                        **({"head_dim": 32} if family in ("Qwen3", "Mistral") else {}))
    logits = hf_logits(directory, TEXTS)
    with LLM(str(directory), task="classify", **CPU) as llm:
        probs = np.array([o.outputs.probs for o in llm.classify(TEXTS)])
        per_token = llm.encode(TEXTS[:2], PoolingParams(activation=False),
                               pooling_task="token_classify")
    assert np.abs(probs - torch.softmax(logits, -1).numpy()).max() <= TOL
    for text_logits, out in zip(logits[:2], per_token):  # the last token's row is the logit
        assert out.outputs.data.shape[1] == 2
        assert (out.outputs.data[-1] - text_logits).abs().max() <= TOL


def test_outcome_reward_model_scores_every_token(tmp_path):
    """Qwen2.5-Math-RM layout: ALL pooling, one value per token, no activation."""
    directory = qwen2_reward(tmp_path / "rm", 1, "Qwen2ForRewardModel")
    with LLM(str(directory), task="reward", **CPU) as llm:
        outs = llm.reward(TEXTS)
        assert llm.engine.model("").default_task.value == "reward"
    for out in outs:
        want = reward_reference(directory, out.prompt_token_ids)
        assert out.outputs.data.shape == (len(out.prompt_token_ids), 1)
        assert (out.outputs.data - want).abs().max() <= TOL


def test_process_reward_model_with_step_pooling(tmp_path):
    """Qwen2.5-Math-PRM layout: STEP pooling at the step tag, softmax over the two labels, and
    returned_token_ids selecting columns."""
    directory = qwen2_reward(tmp_path / "prm", 2, "Qwen2ForProcessRewardModel")
    step = transformers.AutoTokenizer.from_pretrained(directory).convert_tokens_to_ids("<step>")
    text = "Step 1: add two and two.<step>Step 2: the answer is four.<step>"
    config = {"pooling_type": "STEP", "step_tag_id": step}
    with LLM(str(directory), pooler_config=config, **CPU) as llm:
        (out,) = llm.reward(text)
        ids = out.prompt_token_ids
        at = [i for i, t in enumerate(ids) if t == step]
        assert len(at) == 2
        want = torch.softmax(reward_reference(directory, ids)[at], dim=-1)
        assert (out.outputs.data - want).abs().max() <= TOL
        (raw,) = llm.reward(text, PoolingParams(activation=False))
        assert (raw.outputs.data - reward_reference(directory, ids)[at]).abs().max() <= TOL
    config["returned_token_ids"] = [1]
    with LLM(str(directory), pooler_config=config, **CPU) as llm:
        (one,) = llm.reward(text, PoolingParams(activation=False))
        assert (one.outputs.data[:, 0] - reward_reference(directory, ids)[at][:, 1]).abs().max() \
            <= TOL


@pytest.mark.parametrize("family", ["Qwen2", "Llama"])
def test_tokenization_is_transformers(tmp_path, family):
    """transformers rebuilds some tokenizers from their class (Qwen2 splits digits one by one
    whatever tokenizer.json says); poolsvc tokenizes as AutoTokenizer does."""
    directory = decoder(tmp_path / "dec", family)
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    texts = ["Step 12: add 345 and 6.", "  two  spaces\nand a newline", "café 🚀 東京"]
    with LLM(str(directory), **CPU) as llm:
        outs = llm.embed(texts)
    assert [o.prompt_token_ids for o in outs] == [hf(t)["input_ids"] for t in texts]


def test_task_checks(tmp_path, minilm_path):
    directory = bert_classifier(tmp_path / "clf", minilm_path, 3)
    with LLM(str(directory), **CPU) as llm:
        with pytest.raises(InvalidInputError, match=r"\(classifier\) does not serve embed"):
            llm.embed("x")
        with pytest.raises(InvalidInputError, match="does not serve score"):  # 3 labels
            llm.score("a", "b")
        with pytest.raises(InvalidInputError, match="normalize does not apply to classify"):
            llm.classify("x", PoolingParams(normalize=True))
    with pytest.raises(InvalidInputError, match="does not serve embed"):
        LLM(str(directory), task="embed", **CPU)
