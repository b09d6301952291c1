"""Classify, Score, Rerank and Encode over gRPC, on one server holding several models."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
import torch
import transformers
from conftest import ServerProcess
from grpc_health.v1 import health_pb2, health_pb2_grpc
from poolsvc_client import decode_tensor
from tiny_models import bert_classifier, qwen2_reward, reward_reference, xlmr_classifier

from poolsvc import LLM
from poolsvc.engine.params import PoolingParams
from poolsvc.gen.v1 import (
    classify_pb2,
    classify_pb2_grpc,
    common_pb2,
    embed_pb2,
    embed_pb2_grpc,
    encode_pb2,
    encode_pb2_grpc,
    model_pb2,
    model_pb2_grpc,
    score_pb2,
    score_pb2_grpc,
)

QUERY = "What is the capital of France?"
DOCS = ["A cat is a small feline.", "Paris is the capital and largest city of France.",
        "The quick brown fox jumps over the lazy dog.", "Embeddings map text to vectors."]
TEXTS = ["What is the capital of France?", "café naïve 🚀", "x", "東京は日本の首都です。"]
CPU = dict(device="cpu", threads=2)


def text(t: str) -> common_pb2.Input:
    return common_pb2.Input(text=t)


@pytest.fixture(scope="module")
def models(tmp_path_factory, minilm_path):
    root = tmp_path_factory.mktemp("models")
    prm = qwen2_reward(root / "prm", 2, "Qwen2ForProcessRewardModel", seed=3)
    step = transformers.AutoTokenizer.from_pretrained(prm).convert_tokens_to_ids("<step>")
    return {
        "rerank": xlmr_classifier(root / "rerank", seed=1),
        "clf": bert_classifier(root / "clf", minilm_path, 3, seed=2,
                               id2label={0: "negative", 1: "neutral", 2: "positive"}),
        "rm": qwen2_reward(root / "rm", 1, "Qwen2ForRewardModel", seed=4),
        "prm": prm,
        "step": step,
    }


@pytest.fixture(scope="module")
def multi_server(models, tmp_path_factory):
    pooler = json.dumps({"pooling_type": "STEP", "step_tag_id": models["step"]})
    srv = ServerProcess(
        tmp_path_factory.mktemp("multi") / "server.log",
        "--model", "bundled:all-MiniLM-L6-v2", "--model", f"rerank={models['rerank']}",
        "--model", f"clf={models['clf']}", "--model", f"rm={models['rm']}",
        "--model", f"prm={models['prm']}", "--pooler-config", f"prm={pooler}").wait_ready()
    yield srv
    assert srv.terminate() == 0, srv.log()


@pytest.fixture(scope="module")
def multi(multi_server):
    with grpc.insecure_channel(multi_server.address) as channel:
        yield channel


def offline(path, **kw) -> LLM:
    return LLM(str(path), **CPU, **kw)


def test_list_models_describes_each(multi):
    infos = {m.name: m for m in model_pb2_grpc.ModelServiceStub(multi).ListModels(
        model_pb2.ListModelsRequest()).models}
    assert list(infos) == ["all-MiniLM-L6-v2", "rerank", "clf", "rm", "prm"]
    assert infos["all-MiniLM-L6-v2"].is_default and not infos["rerank"].is_default
    assert list(infos["all-MiniLM-L6-v2"].tasks) == [common_pb2.TASK_EMBED, common_pb2.TASK_SCORE,
                                                      common_pb2.TASK_TOKEN_EMBED]
    assert list(infos["rerank"].tasks) == [common_pb2.TASK_CLASSIFY, common_pb2.TASK_SCORE]
    assert infos["rerank"].architecture == "XLMRobertaForSequenceClassification"
    assert infos["rerank"].max_input_tokens == 128
    assert list(infos["clf"].labels) == ["negative", "neutral", "positive"]
    assert infos["clf"].pooling_type == common_pb2.POOLING_TYPE_CLS
    assert infos["rm"].default_task == common_pb2.TASK_REWARD
    assert infos["prm"].implementation == "poolsvc"
    assert infos["prm"].pooling_type == common_pb2.POOLING_TYPE_STEP
    assert infos["rm"].pooling_type == common_pb2.POOLING_TYPE_ALL
    assert infos["all-MiniLM-L6-v2"].pooling_type == common_pb2.POOLING_TYPE_MEAN


def test_health_is_serving_for_every_service(multi):
    health = health_pb2_grpc.HealthStub(multi)
    for service in ("", "poolsvc.v1.EmbedService", "poolsvc.v1.ClassifyService",
                    "poolsvc.v1.ScoreService", "poolsvc.v1.EncodeService"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
        assert status == health_pb2.HealthCheckResponse.SERVING, service


def test_classify(multi, models):
    stub = classify_pb2_grpc.ClassifyServiceStub(multi)
    reply = stub.Classify(classify_pb2.ClassifyRequest(model="clf",
                                                       inputs=[text(t) for t in TEXTS]))
    assert list(reply.labels) == ["negative", "neutral", "positive"]
    assert list(reply.probs.shape) == [len(TEXTS), 3]
    with offline(models["clf"]) as llm:
        want = np.array([o.outputs.probs for o in llm.classify(TEXTS)])
        logits = np.array([o.outputs.probs for o in
                           llm.classify(TEXTS, PoolingParams(activation=False))])
    np.testing.assert_allclose(decode_tensor(reply.probs), want, atol=1e-6)
    np.testing.assert_allclose(decode_tensor(reply.probs).sum(1), 1.0, atol=1e-6)
    raw = stub.Classify(classify_pb2.ClassifyRequest(model="clf", inputs=[text(t) for t in TEXTS],
                                                     activation=False))
    np.testing.assert_allclose(decode_tensor(raw.probs), logits, atol=1e-6)
    streamed = {r.id: r for r in stub.ClassifyStream(iter([
        classify_pb2.ClassifyStreamRequest(id=str(i), request=classify_pb2.ClassifyRequest(
            model="clf", inputs=[text(t)])) for i, t in enumerate(TEXTS)]))}
    for i in range(len(TEXTS)):
        np.testing.assert_allclose(decode_tensor(streamed[str(i)].response.probs)[0], want[i],
                                   atol=1e-6)


def test_score_with_a_cross_encoder_and_a_bi_encoder(multi, models, st_model):
    from sentence_transformers import CrossEncoder
    from sentence_transformers.util import cos_sim
    stub = score_pb2_grpc.ScoreServiceStub(multi)
    request = score_pb2.ScoreRequest(model="rerank", queries=[text(QUERY)],
                                     documents=[text(d) for d in DOCS])
    reply = stub.Score(request)
    want = CrossEncoder(str(models["rerank"]), device="cpu").predict([(QUERY, d) for d in DOCS])
    np.testing.assert_allclose(decode_tensor(reply.scores), want, atol=1e-5)
    assert len(reply.usage.input_tokens) == len(DOCS)
    bi = stub.Score(score_pb2.ScoreRequest(queries=[text(QUERY)],
                                           documents=[text(d) for d in DOCS]))
    emb = st_model.encode([QUERY, *DOCS], convert_to_tensor=True)
    np.testing.assert_allclose(decode_tensor(bi.scores), cos_sim(emb[:1], emb[1:])[0].numpy(),
                               atol=1e-5)
    streamed = list(stub.ScoreStream(iter([score_pb2.ScoreStreamRequest(id="a", request=request)])))
    np.testing.assert_allclose(decode_tensor(streamed[0].response.scores), want, atol=1e-5)


def test_rerank_sorts_with_original_indices(multi, models):
    from sentence_transformers import CrossEncoder
    want = CrossEncoder(str(models["rerank"]), device="cpu").predict([(QUERY, d) for d in DOCS])
    stub = score_pb2_grpc.ScoreServiceStub(multi)
    reply = stub.Rerank(score_pb2.RerankRequest(model="rerank", query=text(QUERY),
                                                documents=[text(d) for d in DOCS], top_n=3,
                                                return_documents=True))
    order = list(np.argsort(-want, kind="stable")[:3])
    assert [r.index for r in reply.results] == order
    np.testing.assert_allclose([r.score for r in reply.results], want[order], atol=1e-5)
    assert [r.document for r in reply.results] == [DOCS[i] for i in order]
    everything = stub.Rerank(score_pb2.RerankRequest(model="rerank", query=text(QUERY),
                                                     documents=[text(d) for d in DOCS]))
    assert len(everything.results) == len(DOCS) and not everything.results[0].document
    scores = [r.score for r in everything.results]
    assert scores == sorted(scores, reverse=True)


def test_encode_rewards_and_process_rewards(multi, models):
    stub = encode_pb2_grpc.EncodeServiceStub(multi)
    reply = stub.Encode(encode_pb2.EncodeRequest(model="rm", inputs=[text(t) for t in TEXTS]))
    assert reply.task == common_pb2.TASK_REWARD and len(reply.outputs) == len(TEXTS)
    tok = transformers.AutoTokenizer.from_pretrained(models["rm"])
    for t, tensor in zip(TEXTS, reply.outputs):
        ids = tok(t)["input_ids"]
        assert list(tensor.shape) == [len(ids), 1]
        np.testing.assert_allclose(decode_tensor(tensor), reward_reference(models["rm"], ids),
                                   atol=1e-4)
    step_text = "Step 1: add two and two.<step>Step 2: the answer is four.<step>"
    prm = stub.Encode(encode_pb2.EncodeRequest(model="prm", inputs=[text(step_text)]))
    ids = transformers.AutoTokenizer.from_pretrained(models["prm"])(step_text)["input_ids"]
    at = [i for i, t in enumerate(ids) if t == models["step"]]
    want = torch.softmax(reward_reference(models["prm"], ids)[at], -1).numpy()
    np.testing.assert_allclose(decode_tensor(prm.outputs[0]), want, atol=1e-4)


def test_encode_token_embeddings_over_grpc(multi, llm):
    stub = encode_pb2_grpc.EncodeServiceStub(multi)
    reply = stub.Encode(encode_pb2.EncodeRequest(inputs=[text(t) for t in TEXTS],
                                                 output_dtype=2))  # float16
    assert reply.task == common_pb2.TASK_TOKEN_EMBED
    want = llm.encode(TEXTS, pooling_task="token_embed")
    for tensor, out in zip(reply.outputs, want):
        np.testing.assert_allclose(decode_tensor(tensor), out.outputs.data.numpy(), atol=1e-3)
    streamed = list(stub.EncodeStream(iter([encode_pb2.EncodeStreamRequest(
        id="x", request=encode_pb2.EncodeRequest(model="rm", inputs=[text("x")]))])))
    assert streamed[0].id == "x" and streamed[0].response.task == common_pb2.TASK_REWARD


def test_models_are_picked_by_name(multi):
    embed = embed_pb2_grpc.EmbedServiceStub(multi)
    assert embed.Embed(embed_pb2.EmbedRequest(
        model="sentence-transformers/all-MiniLM-L6-v2", inputs=[text("x")])).model == \
        "all-MiniLM-L6-v2"
    with pytest.raises(grpc.RpcError) as info:
        embed.Embed(embed_pb2.EmbedRequest(model="rerank", inputs=[text("x")]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "rerank (classifier) does not serve embed" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        score_pb2_grpc.ScoreServiceStub(multi).Score(score_pb2.ScoreRequest(
            model="rerank", queries=[common_pb2.Input(tokens=common_pb2.TokenIds(ids=[0, 2]))],
            documents=[text("d")]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "scores text pairs" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        classify_pb2_grpc.ClassifyServiceStub(multi).Classify(classify_pb2.ClassifyRequest(
            model="clf", inputs=[common_pb2.Input(tokens=common_pb2.TokenIds(ids=[101, 40000]))]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "token id 40000, outside the vocabulary" in info.value.details()


def test_documented_grpcurl_examples_for_every_task(multi_server):
    import os
    import subprocess

    from conftest import ROOT
    from test_grpcurl import GRPCURL
    env = {**os.environ, "ADDR": multi_server.address, "GRPCURL": GRPCURL,
           "CLASSIFIER": "clf", "RERANKER": "rerank", "REWARD": "rm"}
    done = subprocess.run(["bash", str(ROOT / "clients/grpcurl/tasks.sh")], env=env,
                          capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert '"labels": [\n    "negative",\n    "neutral",\n    "positive"\n  ]' in out
    assert out.count('"index": 1') >= 1 and '"document": "Paris is the capital of France."' in out
    assert '"task": "TASK_REWARD"' in out and '"task": "TASK_TOKEN_EMBED"' in out
    assert '"dtype": "DATA_TYPE_FLOAT16"' in out
