"""The engine's own packed model code against transformers and sentence-transformers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TEXTS
from tiny_models import add_st_config, tiny_bert

from poolsvc import LLM
from poolsvc.engine.errors import InvalidInputError, ModelLoadError
from poolsvc.engine.llm import PoolingParams

CPU = dict(device="cpu", threads=2)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory, minilm_path):
    return tiny_bert(tmp_path_factory.mktemp("bert"), minilm_path)


def hf_forward(directory, texts, max_length=128):
    from transformers import AutoTokenizer, BertModel
    tok = AutoTokenizer.from_pretrained(directory)
    model = BertModel.from_pretrained(directory, add_pooling_layer=False).eval()
    batch = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    return hidden, batch["attention_mask"]


def test_plain_hf_bert_defaults_to_normalized_cls(bert_dir):
    hidden, _ = hf_forward(bert_dir, TEXTS)
    want = torch.nn.functional.normalize(hidden[:, 0], dim=-1).numpy()
    with LLM(str(bert_dir), **CPU) as llm:
        got = np.array([o.outputs.embedding for o in llm.embed(TEXTS, truncate_prompt_tokens=-1)])
        raw = np.array([o.outputs.embedding for o in
                        llm.embed(TEXTS, PoolingParams(normalize=False),
                                  truncate_prompt_tokens=-1)])
    assert np.abs(got - want).max() <= 1e-4
    assert np.abs(raw - hidden[:, 0].numpy()).max() <= 1e-4


@pytest.mark.parametrize("mode", ["cls", "mean", "max", "lasttoken"])
@pytest.mark.parametrize("normalize", [True, False])
def test_sentence_transformers_directories(tmp_path, minilm_path, mode, normalize):
    from sentence_transformers import SentenceTransformer
    directory = add_st_config(tiny_bert(tmp_path / "m", minilm_path, seed=1), mode, normalize,
                              max_seq_length=64)
    want = SentenceTransformer(str(directory), device="cpu").encode(TEXTS, convert_to_numpy=True)
    with LLM(str(directory), **CPU) as llm:
        outs = llm.embed(TEXTS, truncate_prompt_tokens=-1)
    got = np.array([o.outputs.embedding for o in outs])
    assert np.abs(got - want).max() <= 1e-4
    assert max(len(o.prompt_token_ids) for o in outs) == 64  # max_seq_length, then truncated


def test_named_prompts(tmp_path, minilm_path):
    from sentence_transformers import SentenceTransformer
    directory = add_st_config(tiny_bert(tmp_path / "m", minilm_path), "mean", True,
                              prompts={"query": "query: ", "passage": "passage: "})
    st = SentenceTransformer(str(directory), device="cpu")
    with LLM(str(directory), **CPU) as llm:
        for name in ("query", "passage"):
            want = st.encode(TEXTS[:4], prompt_name=name, convert_to_numpy=True)
            got = np.array([o.outputs.embedding for o in llm.embed(TEXTS[:4], prompt_name=name)])
            assert np.abs(got - want).max() <= 1e-4
        with pytest.raises(InvalidInputError, match="this model's prompts: passage, query"):
            llm.embed("x", prompt_name="document")


def test_token_id_prompts_match_text(bert_dir):
    with LLM(str(bert_dir), **CPU) as llm:
        by_text = llm.embed(TEXTS, truncate_prompt_tokens=-1)
        by_ids = llm.embed([{"prompt_token_ids": o.prompt_token_ids} for o in by_text])
    for a, b in zip(by_text, by_ids):
        assert a.prompt_token_ids == b.prompt_token_ids
        np.testing.assert_allclose(a.outputs.embedding, b.outputs.embedding, atol=1e-6)


def test_packed_batches_equal_one_at_a_time(bert_dir):
    """Cross-sequence leakage in packed attention would show up here."""
    with LLM(str(bert_dir), max_batch_tokens=128, **CPU) as llm:
        together = [o.outputs.embedding for o in llm.embed(TEXTS, truncate_prompt_tokens=-1)]
        alone = [llm.embed(t, truncate_prompt_tokens=-1)[0].outputs.embedding for t in TEXTS]
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_pickled_checkpoints_need_the_flag(tmp_path, minilm_path):
    hidden, _ = hf_forward(tiny_bert(tmp_path / "reference", minilm_path, seed=3), TEXTS[:2])
    directory = tiny_bert(tmp_path / "pickled", minilm_path, safetensors=False, seed=3)
    assert not list(directory.glob("*.safetensors"))
    with pytest.raises(ModelLoadError, match="--allow-pickle-weights"):
        LLM(str(directory), **CPU)
    with LLM(str(directory), allow_pickle_weights=True, **CPU) as llm:
        got = np.array([o.outputs.embedding for o in llm.embed(TEXTS[:2])])
    want = torch.nn.functional.normalize(hidden[:, 0], dim=-1).numpy()
    assert np.abs(got - want).max() <= 1e-4


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_load_errors_name_the_problem(tmp_path, minilm_path):
    gpt = tiny_bert(tmp_path / "gpt", minilm_path)
    _edit_json(gpt / "config.json", architectures=["GPT2Model"], model_type="gpt2")
    with pytest.raises(ModelLoadError, match="weights missing from the checkpoint: h.0"):
        LLM(str(gpt), **CPU)  # through transformers, which would leave them random

    head = tiny_bert(tmp_path / "head", minilm_path)
    _edit_json(head / "config.json", architectures=["BertForQuestionAnswering"])
    with pytest.raises(ModelLoadError, match="BertForQuestionAnswering has a task head"):
        LLM(str(head), **CPU)

    wrong = tiny_bert(tmp_path / "wrong", minilm_path)
    _edit_json(wrong / "config.json", hidden_size=64)
    with pytest.raises(ModelLoadError, match="has shape .* the config implies"):
        LLM(str(wrong), **CPU)

    dense = add_st_config(tiny_bert(tmp_path / "dense", minilm_path), "mean", True)
    modules = json.loads((dense / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense",
                    "type": "sentence_transformers.models.Dense"})
    (dense / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ModelLoadError, match="Dense module must come after Pooling and before"):
        LLM(str(dense), **CPU)
    modules.insert(2, modules.pop())
    (dense / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ModelLoadError, match="3_Dense has no config.json"):
        LLM(str(dense), **CPU)

    no_weights = tiny_bert(tmp_path / "empty", minilm_path)
    for f in no_weights.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelLoadError, match="has no weights"):
        LLM(str(no_weights), **CPU)


def test_vllm_shaped_outputs(llm):
    (out,) = llm.embed("Hello, my name is")
    assert len(out.outputs.embedding) == out.outputs.hidden_size == 384
    assert out.prompt_token_ids == [101, 7592, 1010, 2026, 2171, 2003, 102]
    assert out.finished and isinstance(out.request_id, str)
    outs = llm.embed(["a", {"prompt": "b"}, {"prompt_token_ids": [101, 1037, 102]}])
    np.testing.assert_allclose(outs[0].outputs.embedding, outs[2].outputs.embedding, atol=1e-6)
    with pytest.raises(InvalidInputError, match="does not serve classify"):
        LLM(task="classify")


def test_offline_equals_sentence_transformers(llm, st_model):
    got = np.array([o.outputs.embedding for o in llm.embed(TEXTS)])
    want = st_model.encode(TEXTS, convert_to_numpy=True)
    assert np.abs(got - want).max() <= 1e-5
