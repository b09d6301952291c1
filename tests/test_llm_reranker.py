"""LLM rerankers (Qwen3-Reranker style) against transformers' causal LM: the softmax of the last
token's logits over the two answer tokens, with the prompt template, offline and over gRPC."""

from __future__ import annotations

import dataclasses

import grpc
import numpy as np
import pytest
import torch
import transformers
from conftest import ServerProcess
from tiny_models import decoder

from poolsvc import LLM, PoolingParams
from poolsvc.engine.errors import InvalidInputError, ModelLoadError
from poolsvc.engine.reranker import QWEN3, ScoreTemplate
from poolsvc.gen.v1 import common_pb2, score_pb2, score_pb2_grpc

CPU = dict(device="cpu", threads=2)
QUERY = "what is the capital of France?"
DOCS = ["Paris is the capital of France.", "The cat is on the mat.", "Embeddings are vectors.",
        "France is in Europe, and its capital is Paris."]
ANSWERS = ["is", "Ġthe"]  # the tiny vocabulary has no "no" / "yes": two of its tokens stand in
CONFIG = {"answer_tokens": ANSWERS, "score_instruction": "Find the answer"}


@pytest.fixture(scope="module")
def qwen3_lm(tmp_path_factory):
    return decoder(tmp_path_factory.mktemp("rr") / "Qwen3-Reranker-tiny", "Qwen3", "ForCausalLM",
                   head_dim=32, max_position_embeddings=512)


def reference(directory, template: ScoreTemplate, query: str, documents: list[str],
              answers=ANSWERS) -> np.ndarray:
    """The model card's recipe: prefix + pair + suffix token ids, the causal LM's logits at the
    last token, softmax over (false, true), the true answer's probability."""
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    false_id, true_id = tok.convert_tokens_to_ids(answers)
    scores = []
    with torch.no_grad():
        for doc in documents:
            ids = [i for text in template.texts(query, doc)
                   for i in tok(text, add_special_tokens=False).input_ids]
            logits = model(torch.tensor([ids])).logits[0, -1]
            scores.append(torch.softmax(logits[[false_id, true_id]], dim=-1)[1].item())
    return np.array(scores)


def test_matches_the_causal_lm_offline(qwen3_lm):
    template = dataclasses.replace(QWEN3, instruction="Find the answer")
    want = reference(qwen3_lm, template, QUERY, DOCS)
    with LLM(str(qwen3_lm), pooler_config=CONFIG, **CPU) as llm:
        info = llm.engine.model("")
        assert [t.value for t in info.tasks] == ["score"] and info.implementation == "poolsvc"
        got = np.array([o.outputs.score for o in llm.score(QUERY, DOCS)])
        logits = np.array([o.outputs.score for o in llm.score(QUERY, DOCS,
                                                              PoolingParams(activation=False))])
        with pytest.raises(InvalidInputError, match="does not serve embed"):
            llm.embed("x")
    assert np.abs(got - want).max() <= 1e-5
    np.testing.assert_allclose(1 / (1 + np.exp(-logits)), got, atol=1e-6)


def test_a_reranker_name_gets_the_qwen3_defaults(qwen3_lm):
    """A Qwen3 causal LM served from a source named like a reranker gets the built-in template
    and instruction; only the answer tokens differ here (the tiny vocabulary)."""
    want = reference(qwen3_lm, QWEN3, QUERY, DOCS[:2])
    with LLM(str(qwen3_lm), pooler_config={"answer_tokens": ANSWERS}, **CPU) as llm:
        got = np.array([o.outputs.score for o in llm.score(QUERY, DOCS[:2])])
    assert np.abs(got - want).max() <= 1e-5


def test_custom_template_and_errors(qwen3_lm, tmp_path):
    custom = "Query: {query} Document: {document} Relevant:"
    want = reference(qwen3_lm, ScoreTemplate((custom,), ""), QUERY, DOCS[:2])
    with LLM(str(qwen3_lm), pooler_config={"answer_tokens": ANSWERS, "score_template": custom},
             **CPU) as llm:
        got = np.array([o.outputs.score for o in llm.score(QUERY, DOCS[:2])])
    assert np.abs(got - want).max() <= 1e-5
    with pytest.raises(ModelLoadError, match="'no' is not one token"):
        LLM(str(qwen3_lm), **CPU)  # the built-in answers are not in the tiny vocabulary
    with pytest.raises(ModelLoadError, match="neither a built-in template"):
        LLM(str(qwen3_lm), pooler_config={"answer_tokens": ANSWERS, "score_template": "nope"},
            **CPU)
    body = decoder(tmp_path / "body", "Qwen3", "Model", head_dim=32)
    with pytest.raises(ModelLoadError, match="needs a causal LM checkpoint"):
        LLM(str(body), pooler_config={"answer_tokens": ANSWERS}, **CPU)


def test_rerank_over_grpc(qwen3_lm, tmp_path):
    import json
    template = dataclasses.replace(QWEN3, instruction="Find the answer")
    want = reference(qwen3_lm, template, QUERY, DOCS)
    srv = ServerProcess(tmp_path / "server.log", "--model", f"rr={qwen3_lm}",
                        "--pooler-config", "rr=" + json.dumps(CONFIG)).wait_ready()
    try:
        with grpc.insecure_channel(srv.address) as channel:
            stub = score_pb2_grpc.ScoreServiceStub(channel)
            reply = stub.Rerank(score_pb2.RerankRequest(
                model="rr", query=common_pb2.Input(text=QUERY),
                documents=[common_pb2.Input(text=d) for d in DOCS], top_n=2), timeout=60)
            assert [r.index for r in reply.results] == list(np.argsort(-want)[:2])
            assert abs(reply.results[0].score - want.max()) <= 1e-5
            with pytest.raises(grpc.RpcError) as err:
                stub.Score(score_pb2.ScoreRequest(
                    model="rr", queries=[common_pb2.Input(text=QUERY)],
                    documents=[common_pb2.Input(tokens=common_pb2.TokenIds(ids=[1, 2]))]),
                    timeout=60)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "scores text pairs" in err.value.details()
    finally:
        assert srv.terminate() == 0
