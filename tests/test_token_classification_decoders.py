"""Token classification on the decoder families (`Qwen3ForTokenClassification`, and Llama,
Mistral, Qwen2 from the same head) against transformers: the packed head per family, then a
tiny Qwen3 tagger offline and over gRPC (Encode, EncodeStream, the Python client), and its
errors."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch
import transformers
from conftest import ServerProcess
from poolsvc_client import Client
from poolsvc_client.tensors import decode_tensor
from tiny_models import DECODER, NER_LABELS, _perturb, decoder, load_ours

from poolsvc import LLM, PoolingParams
from poolsvc.engine.errors import InvalidInputError
from poolsvc.engine.models.llama import LlamaForTokenClassification, MistralForTokenClassification
from poolsvc.engine.models.qwen2 import Qwen2ForTokenClassification
from poolsvc.engine.models.qwen3 import Qwen3ForTokenClassification
from poolsvc.engine.packing import PackedBatch
from poolsvc.engine.params import PoolingType
from poolsvc.gen.v1 import common_pb2, encode_pb2, encode_pb2_grpc

CPU = dict(device="cpu", threads=2)
TEXTS = ["John Smith lives in Paris.", "Hello", "Ünïcödé names: Zoë and Dvořák in Brno"]
LABELS = list(NER_LABELS.values())

# family -> (our class, config overrides)
FAMILIES = {
    "Llama": (LlamaForTokenClassification, dict(attention_bias=True)),
    "Mistral": (MistralForTokenClassification, dict(head_dim=32, sliding_window=128)),
    "Qwen2": (Qwen2ForTokenClassification, {}),
    "Qwen3": (Qwen3ForTokenClassification, dict(head_dim=16)),
    # transformers' switch for a bias-free score
    "Qwen3-no-bias": (Qwen3ForTokenClassification, dict(head_dim=16,
                                                         token_classification_bias=False)),
}


@torch.no_grad()
@pytest.mark.parametrize("case", FAMILIES)
def test_packed_head_matches_transformers(tmp_path, case):
    cls, overrides = FAMILIES[case]
    family = case.split("-")[0]
    torch.manual_seed(1)
    config = getattr(transformers, f"{family}Config")(vocab_size=300, id2label=NER_LABELS,
                                                      **{**DECODER, **overrides})
    ref = getattr(transformers, f"{family}ForTokenClassification")(config).eval()
    _perturb(ref)
    ref.save_pretrained(tmp_path)
    ours = load_ours(cls, tmp_path)
    assert ours.num_labels == len(LABELS) and ours.head_pooling is PoolingType.ALL
    assert (ours.score.bias is None) == (case == "Qwen3-no-bias")

    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 300, (n,), generator=gen).tolist() for n in (17, 1, 40)]
    got = ours.head(ours(PackedBatch.build(seqs, None, torch.device("cpu"))))
    want = torch.cat([ref(input_ids=torch.tensor([s])).logits[0] for s in seqs])
    assert got.shape == want.shape == (58, len(LABELS))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def tagger(tmp_path_factory):
    return decoder(tmp_path_factory.mktemp("qwen3-ner"), "Qwen3", "ForTokenClassification",
                   seed=3, head_dim=16, id2label=NER_LABELS)


def reference(directory, texts):
    """transformers' per-token logits and softmax, and the tokenizer's offsets."""
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    model = transformers.AutoModelForTokenClassification.from_pretrained(directory).eval()
    assert type(model).__name__ == "Qwen3ForTokenClassification"
    out = []
    with torch.no_grad():
        for text in texts:
            enc = tok(text, return_tensors="pt", return_offsets_mapping=True)
            offsets = [tuple(o) for o in enc.pop("offset_mapping")[0].tolist()]
            logits = model(**enc).logits[0]
            out.append((torch.softmax(logits, -1).numpy(), logits.numpy(), offsets))
    return out


def assert_matches(probs, want):
    np.testing.assert_allclose(probs, want, atol=1e-5)
    assert (probs.argmax(-1) == want.argmax(-1)).all()


def test_offline_matches_transformers(tagger):
    want = reference(tagger, TEXTS)
    with LLM(str(tagger), **CPU) as llm:
        info = llm.engine.model("")
        assert [t.value for t in info.tasks] == ["token_classify"]
        assert list(info.labels) == LABELS and info.implementation == "poolsvc"
        got = llm.encode(TEXTS, pooling_task="token_classify")
        raw = llm.encode(TEXTS, PoolingParams(activation=False), pooling_task="token_classify")
        with pytest.raises(InvalidInputError, match="does not serve classify"):
            llm.classify(TEXTS)
    for (probs, logits, _), g, r in zip(want, got, raw):
        assert_matches(g.outputs.data.numpy(), probs)
        np.testing.assert_allclose(r.outputs.data.numpy(), logits, atol=1e-4)


def test_over_grpc_with_labels_offsets_and_errors(tagger, tmp_path):
    want = reference(tagger, TEXTS)
    srv = ServerProcess(tmp_path / "server.log", "--model", f"ner={tagger}").wait_ready()
    try:
        with grpc.insecure_channel(srv.address) as channel, Client(srv.address) as client:
            stub = encode_pb2_grpc.EncodeServiceStub(channel)
            inputs = [common_pb2.Input(text=t) for t in TEXTS]
            request = encode_pb2.EncodeRequest(model="ner", inputs=inputs, return_offsets=True)
            reply = stub.Encode(request, timeout=60)
            assert reply.task == common_pb2.TASK_TOKEN_CLASSIFY and list(reply.labels) == LABELS
            for (probs, _, offsets), tensor, spans in zip(want, reply.outputs, reply.offsets):
                assert_matches(decode_tensor(tensor), probs)
                assert [(o.start, o.end) for o in spans.offsets] == offsets

            streamed = list(stub.EncodeStream(iter([
                encode_pb2.EncodeStreamRequest(id="a", request=request),
                encode_pb2.EncodeStreamRequest(id="b", request=encode_pb2.EncodeRequest(
                    model="ner", inputs=inputs, task=common_pb2.TASK_CLASSIFY))]), timeout=60))
            by_id = {s.id: s for s in streamed}
            for (probs, _, _), tensor in zip(want, by_id["a"].response.outputs):
                assert_matches(decode_tensor(tensor), probs)
            assert by_id["b"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            assert "does not serve classify" in by_id["b"].error.message

            tagged = client.classify_tokens(TEXTS, model="ner")
            raw = client.classify_tokens(TEXTS, model="ner", activation=False)
            for text, (probs, logits, offsets), result, r in zip(TEXTS, want, tagged, raw):
                assert_matches(result.probs, probs)
                np.testing.assert_allclose(r.probs, logits, atol=1e-4)
                assert result.offsets == offsets and result.labels == LABELS
                assert result.predicted == [LABELS[j] for j in probs.argmax(-1)]
                assert [w for w, _ in result.spans(text)] == \
                    [text[a:b] for a, b in offsets if b > a]

            too_long = common_pb2.Input(text=" ".join(["Paris"] * 300))
            for request, message in [
                (encode_pb2.EncodeRequest(model="ner", inputs=inputs,
                                          task=common_pb2.TASK_CLASSIFY),
                 "does not serve classify"),
                (encode_pb2.EncodeRequest(model="ner", inputs=[too_long]),
                 "more than the limit of 256"),
                (encode_pb2.EncodeRequest(model="ner", inputs=inputs, normalize=True),
                 "normalize does not apply")]:
                with pytest.raises(grpc.RpcError) as err:
                    stub.Encode(request, timeout=60)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert message in err.value.details()
    finally:
        assert srv.terminate() == 0
