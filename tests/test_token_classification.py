"""Token classification (NER-style `*ForTokenClassification`) against transformers: per-token
label probabilities with the label names and each token's character offsets, offline, over
gRPC (Encode) and through the Python client, and its errors."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch
import transformers
from conftest import ServerProcess
from poolsvc_client import Client
from tiny_models import NER_LABELS, token_classifier

from poolsvc import LLM, PoolingParams
from poolsvc.engine.errors import InvalidInputError
from poolsvc.gen.v1 import common_pb2, encode_pb2, encode_pb2_grpc

CPU = dict(device="cpu", threads=2)
TEXTS = ["John Smith lives in Paris.", "Hello", "Ünïcödé names: Zoë and Dvořák in Brno"]
LABELS = list(NER_LABELS.values())


def reference(directory, texts, activation=True):
    """transformers' logits per token (softmax unless `activation` is off) and offsets."""
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    model = transformers.AutoModelForTokenClassification.from_pretrained(directory).eval()
    out = []
    with torch.no_grad():
        for text in texts:
            enc = tok(text, return_tensors="pt", return_offsets_mapping=True)
            offsets = [tuple(o) for o in enc.pop("offset_mapping")[0].tolist()]
            logits = model(**enc).logits[0]
            out.append(((torch.softmax(logits, -1) if activation else logits).numpy(), offsets))
    return out


@pytest.fixture(scope="module", params=["bert", "xlm-roberta"])
def tagger(request, tmp_path_factory, minilm_path):
    return token_classifier(tmp_path_factory.mktemp(request.param), minilm_path, request.param)


def test_offline_matches_transformers(tagger):
    want = reference(tagger, TEXTS)
    logits = reference(tagger, TEXTS, activation=False)
    with LLM(str(tagger), **CPU) as llm:
        info = llm.engine.model("")
        assert [t.value for t in info.tasks] == ["token_classify"]
        assert list(info.labels) == LABELS and info.implementation == "poolsvc"
        got = llm.encode(TEXTS, pooling_task="token_classify")
        raw = llm.encode(TEXTS, PoolingParams(activation=False), pooling_task="token_classify")
        with pytest.raises(InvalidInputError, match="does not serve classify"):
            llm.classify(TEXTS)
    for (probs, _), (lg, _), g, r in zip(want, logits, got, raw):
        np.testing.assert_allclose(g.outputs.data.numpy(), probs, atol=1e-5)
        np.testing.assert_allclose(r.outputs.data.numpy(), lg, atol=1e-4)


def test_encode_over_grpc_with_labels_and_offsets(tagger, minilm_path, tmp_path):
    want = reference(tagger, TEXTS)
    srv = ServerProcess(tmp_path / "server.log", "--model", f"ner={tagger}",
                        "--model", f"minilm={minilm_path}").wait_ready()
    try:
        with grpc.insecure_channel(srv.address) as channel, Client(srv.address) as client:
            stub = encode_pb2_grpc.EncodeServiceStub(channel)
            inputs = [common_pb2.Input(text=t) for t in TEXTS]
            reply = stub.Encode(encode_pb2.EncodeRequest(
                model="ner", inputs=inputs, return_offsets=True), timeout=60)
            assert reply.task == common_pb2.TASK_TOKEN_CLASSIFY and list(reply.labels) == LABELS
            for (_, offsets), spans in zip(want, reply.offsets):
                assert [(o.start, o.end) for o in spans.offsets] == offsets

            tagged = client.classify_tokens(TEXTS, model="ner")
            for text, (probs, offsets), result in zip(TEXTS, want, tagged):
                np.testing.assert_allclose(result.probs, probs, atol=1e-5)
                assert result.offsets == offsets and result.labels == LABELS
                assert [w for w, _ in result.spans(text)] == \
                    [text[a:b] for a, b in offsets if b > a]

            # a prompt is not part of the caller's text: offsets stay in the text
            prompted = client.classify_tokens(TEXTS[:1], model="ner", prompt="Name: ")[0]
            assert [w for w, _ in prompted.spans(TEXTS[0])] == \
                [TEXTS[0][a:b] for a, b in want[0][1] if b > a]

            # per-token embeddings take offsets too; sequence outputs have none
            reply = stub.Encode(encode_pb2.EncodeRequest(
                model="minilm", inputs=inputs[:1], task=common_pb2.TASK_TOKEN_EMBED,
                return_offsets=True), timeout=60)
            assert len(reply.offsets[0].offsets) == reply.outputs[0].shape[0]
            for request, message in [
                (encode_pb2.EncodeRequest(model="minilm", inputs=inputs, return_offsets=True,
                                          task=common_pb2.TASK_EMBED),
                 "return_offsets applies to Encode's per-token outputs"),
                (encode_pb2.EncodeRequest(model="ner", inputs=inputs,
                                          task=common_pb2.TASK_CLASSIFY),
                 "does not serve classify")]:
                with pytest.raises(grpc.RpcError) as err:
                    stub.Encode(request, timeout=60)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert message in err.value.details()
    finally:
        assert srv.terminate() == 0
