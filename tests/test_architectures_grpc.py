"""Every packed architecture served over gRPC, against transformers' forward pass."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch
import transformers
from conftest import ServerProcess
from poolsvc_client import decode_tensor
from tiny_models import bert_classifier, decoder, encoder_family, tiny_bert, xlmr_classifier

from poolsvc.gen.v1 import (
    classify_pb2,
    classify_pb2_grpc,
    common_pb2,
    embed_pb2,
    embed_pb2_grpc,
    model_pb2,
    model_pb2_grpc,
)

TEXTS = ["What is the capital of France?", "Step 12: add 345 and 6.", "café naïve 🚀", "x",
         "東京は日本の首都です。"]
DEC = {"head_dim": 32}
# name -> (builder, transformers body class for the reference, pooling of the reference)
EMBEDDERS = {
    "bert": (lambda d, m: tiny_bert(d, m, seed=7), "BertModel", "cls"),
    "roberta": (lambda d, m: xlmr_classifier(d, seed=8), "XLMRobertaModel", "cls"),
    "qwen2": (lambda d, m: decoder(d, "Qwen2", seed=9), "Qwen2Model", "last"),
    "qwen3": (lambda d, m: decoder(d, "Qwen3", "ForCausalLM", seed=10, **DEC), "Qwen3Model",
              "last"),
    "mistral": (lambda d, m: decoder(d, "Mistral", seed=11, **DEC), "MistralModel", "last"),
    "llama": (lambda d, m: decoder(d, "Llama", seed=12), "LlamaModel", "last"),
    "mpnet": (lambda d, m: encoder_family(d, m, "mpnet", seed=19), "MPNetModel", "cls"),
    "distilbert": (lambda d, m: encoder_family(d, m, "distilbert", seed=21), "DistilBertModel",
                   "cls"),
    "modernbert": (lambda d, m: encoder_family(d, m, "modernbert", seed=23), "ModernBertModel",
                   "cls"),
}
CLASSIFIERS = {
    "bert-clf": lambda d, m: bert_classifier(d, m, 3, seed=13),
    "xlmr-clf": lambda d, m: xlmr_classifier(d, num_labels=3, seed=14),
    "qwen2-clf": lambda d, m: decoder(d, "Qwen2", "ForSequenceClassification", seed=15,
                                      num_labels=3),
    "qwen3-clf": lambda d, m: decoder(d, "Qwen3", "ForSequenceClassification", seed=16,
                                      num_labels=3, **DEC),
    "llama-clf": lambda d, m: decoder(d, "Llama", "ForSequenceClassification", seed=17,
                                      num_labels=3),
    "mistral-clf": lambda d, m: decoder(d, "Mistral", "ForSequenceClassification", seed=18,
                                        num_labels=3, **DEC),
    "mpnet-clf": lambda d, m: encoder_family(d, m, "mpnet", "ForSequenceClassification",
                                            seed=20, num_labels=3),
    "distilbert-clf": lambda d, m: encoder_family(d, m, "distilbert", "ForSequenceClassification",
                                                 seed=22, num_labels=3),
    "modernbert-clf": lambda d, m: encoder_family(d, m, "modernbert", "ForSequenceClassification",
                                                 seed=24, num_labels=3),
}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, minilm_path):
    root = tmp_path_factory.mktemp("archs")
    out = {name: build(root / name, minilm_path) for name, (build, _, _) in EMBEDDERS.items()}
    # the XLM-R reranker checkpoint doubles as an XLM-R embedder: drop its head
    import json
    config = json.loads((out["roberta"] / "config.json").read_text())
    config["architectures"] = ["XLMRobertaModel"]
    (out["roberta"] / "config.json").write_text(json.dumps(config))
    out.update({name: build(root / name, minilm_path) for name, build in CLASSIFIERS.items()})
    return out


@pytest.fixture(scope="module")
def channel(dirs, tmp_path_factory):
    args = [a for name, path in dirs.items() for a in ("--model", f"{name}={path}")]
    srv = ServerProcess(tmp_path_factory.mktemp("srv") / "server.log", *args).wait_ready()
    with grpc.insecure_channel(srv.address) as ch:
        yield ch
    assert srv.terminate() == 0, srv.log()


def reference(path, body_class: str, texts, pooling: str | None = None, classify=False):
    tok = transformers.AutoTokenizer.from_pretrained(path)
    if classify:
        model = transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()
    else:
        model = getattr(transformers, body_class).from_pretrained(path).eval()
    rows = []
    with torch.no_grad():
        for t in texts:
            enc = tok(t, return_tensors="pt")
            if classify:
                rows.append(torch.softmax(model(**enc).logits[0], -1))
            else:
                hidden = model(**enc).last_hidden_state[0]
                rows.append(hidden[0] if pooling == "cls" else hidden[-1])
    out = torch.stack(rows)
    return out if classify else torch.nn.functional.normalize(out, dim=-1)


@pytest.mark.parametrize("name", list(EMBEDDERS))
def test_embedders(channel, dirs, name):
    _, body, pooling = EMBEDDERS[name]
    reply = embed_pb2_grpc.EmbedServiceStub(channel).Embed(embed_pb2.EmbedRequest(
        model=name, inputs=[common_pb2.Input(text=t) for t in TEXTS]))
    want = reference(dirs[name], body, TEXTS, pooling).numpy()
    assert np.abs(decode_tensor(reply.embeddings) - want).max() <= 1e-4


@pytest.mark.parametrize("name", list(CLASSIFIERS))
def test_classifiers(channel, dirs, name):
    reply = classify_pb2_grpc.ClassifyServiceStub(channel).Classify(classify_pb2.ClassifyRequest(
        model=name, inputs=[common_pb2.Input(text=t) for t in TEXTS]))
    want = reference(dirs[name], "", TEXTS, classify=True).numpy()
    assert np.abs(decode_tensor(reply.probs) - want).max() <= 1e-4


def test_every_one_runs_on_the_packed_code(channel):
    infos = model_pb2_grpc.ModelServiceStub(channel).ListModels(model_pb2.ListModelsRequest())
    assert {m.name: m.implementation for m in infos.models} == {
        name: "poolsvc" for name in [*EMBEDDERS, *CLASSIFIERS]}
