"""Per-request LoRA adapters (--lora): every adapter of a mixed batch equals peft's merged model
(PeftModel.from_pretrained(...).merge_and_unload(), forward in transformers), offline, over
gRPC, through the Python client and the HTTP routes; and the adapters that cannot be served are
refused at load with the reason."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # the CUDA kernels, interpreted on the CPU

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import requests  # noqa: E402
import torch  # noqa: E402
from conftest import ROOT, ServerProcess  # noqa: E402
from tiny_models import TOKENIZER_FILES, bert_classifier, decoder, tiny_bert  # noqa: E402

from poolsvc.engine import fused  # noqa: E402
from poolsvc.engine.config import LoraSpec, ModelSpec, PoolerConfig  # noqa: E402
from poolsvc.engine.errors import AdapterNotFoundError, ModelLoadError  # noqa: E402
from poolsvc.engine.loader import load_model  # noqa: E402
from poolsvc.engine.lora import LoraLinear  # noqa: E402
from poolsvc.engine.packing import PackedBatch  # noqa: E402
from poolsvc.engine.params import PoolingParams, Task  # noqa: E402
from poolsvc.engine.request import PoolingRequest  # noqa: E402
from poolsvc.gen.v1 import (  # noqa: E402
    common_pb2,
    embed_pb2,
    embed_pb2_grpc,
    encode_pb2,
    encode_pb2_grpc,
    model_pb2,
    model_pb2_grpc,
)

pytestmark = pytest.mark.timeout(300)

TEXTS = ["Hello, my name is", "LoRA adapters share one batch.", "x",
         "A longer passage about embeddings, retrieval and the adapters that tune them.",
         "Short one", "Another text of middling length for the packed batch"]
RAW = PoolingParams(normalize=False)


# --- checkpoints: tiny bases, and adapters saved by peft with random A and B ------------------

def make_adapter(base: Path, model_class, directory: Path, seed: int, **lora) -> Path:
    """A peft adapter on `base` (loaded as `model_class`), saved as peft saves it."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = model_class.from_pretrained(base)
    get_peft_model(model, LoraConfig(init_lora_weights=False, **lora)).save_pretrained(directory)
    return directory


def merged(base: Path, model_class, adapter: Path | None):
    """The reference: peft's merged model in transformers (the base itself for None)."""
    from peft import PeftModel

    model = model_class.from_pretrained(base)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.eval()


def hidden_states(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).last_hidden_state[0].numpy()


@pytest.fixture(scope="module")
def bert(tmp_path_factory, minilm_path):
    """A tiny BERT, two adapters of different ranks and targets (one on layer 1 only, so layer 0
    keeps the fused CPU path), and the token ids of TEXTS."""
    from transformers import AutoTokenizer, BertModel

    root = tmp_path_factory.mktemp("lora-bert")
    base = tiny_bert(root / "bert", minilm_path)
    adapters = {
        "qv": make_adapter(base, BertModel, root / "qv", 1, r=4, lora_alpha=16,
                           target_modules=["query", "value"], layers_to_transform=[1]),
        "mlp": make_adapter(base, BertModel, root / "mlp", 2, r=8, lora_alpha=8,
                            use_rslora=True, target_modules=["key", "dense"]),
    }
    tokenizer = AutoTokenizer.from_pretrained(base)
    ids = [tokenizer(t)["input_ids"] for t in TEXTS]
    return base, adapters, ids


@pytest.fixture(scope="module")
def bert_references(bert):
    from transformers import BertModel

    base, adapters, ids = bert
    models = {"": merged(base, BertModel, None),
              **{name: merged(base, BertModel, path) for name, path in adapters.items()}}
    return {name: [hidden_states(m, i) for i in ids] for name, m in models.items()}


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """A tiny Qwen3 (GQA), adapters on attention and on the MLP, and token ids."""
    from transformers import AutoTokenizer, Qwen3Model

    root = tmp_path_factory.mktemp("lora-qwen3")
    base = decoder(root / "qwen3", "Qwen3")
    adapters = {
        "attn": make_adapter(base, Qwen3Model, root / "attn", 3, r=2, lora_alpha=4,
                             target_modules=["q_proj", "v_proj", "o_proj"]),
        "mlp": make_adapter(base, Qwen3Model, root / "mlp", 4, r=6, lora_alpha=12,
                            target_modules=["gate_proj", "up_proj", "down_proj", "k_proj"]),
    }
    tokenizer = AutoTokenizer.from_pretrained(base)
    ids = [tokenizer(t)["input_ids"] for t in TEXTS]
    references = {name: [hidden_states(merged(base, Qwen3Model, path), i) for i in ids]
                  for name, path in {"": None, **adapters}.items()}
    return base, adapters, ids, references


def mixed_batch(engine, plan: list[tuple[str, list[list[int]]]]) -> list[list[np.ndarray]]:
    """Each (adapter, inputs) of `plan` as one request, all queued before the runner forms a
    batch, so that they share one device batch (checked); per request, each input's rows."""
    before = engine.stats["batches"]
    with engine.held():
        futures = [engine.submit(PoolingRequest(Task.TOKEN_EMBED, tuple(inputs), adapter=name,
                                                params=RAW, raw=True))
                   for name, inputs in plan]
    outputs = [f.result(timeout=120).outputs for f in futures]
    assert engine.stats["batches"] == before + 1, "the requests did not share one batch"
    return outputs


def check_plan(plan, outputs, references, ids) -> float:
    """Every output row against its adapter's reference; returns the largest difference."""
    worst = 0.0
    for (name, inputs), rows in zip(plan, outputs):
        for x, got in zip(inputs, rows):
            want = references[name][ids.index(x)]
            worst = max(worst, float(np.abs(got - want).max()))
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    return worst


def test_adapters_change_the_outputs(bert_references, qwen3):
    """The comparisons below could fail: each adapter moves the hidden states well past 1e-4."""
    for references in (bert_references, qwen3[3]):
        for name, rows in references.items():
            if name:
                assert max(np.abs(a - b).max() for a, b in zip(rows, references[""])) > 0.05


# --- offline: one batch mixing the base model and two adapters --------------------------------

def test_bert_mixed_batch_equals_peft_merged(bert, bert_references):
    from transformers import BertModel

    from poolsvc import LLM, LoRARequest

    base, adapters, ids = bert
    with LLM(str(base), loras={n: str(p) for n, p in adapters.items()}, threads=1) as llm:
        body = llm.engine.served("").backend
        wrapped = [m for m in body.modules() if isinstance(m, LoraLinear)]
        # key, the dense layers of 2 layers and query, value of layer 1 (the pooler is not served)
        assert len(wrapped) == 2 * 4 + 2
        # interleaved (an adapter's rows in several runs) and side by side (one run)
        plan = [("", ids[:2]), ("qv", [ids[2]]), ("mlp", ids[3:5]), ("qv", [ids[5], ids[0]]),
                ("", [ids[4]]), ("mlp", [ids[1]])]
        worst = check_plan(plan, mixed_batch(llm.engine, plan), bert_references, ids)
        # a batch over the CPU path's slice size (cpu.SLICE_TOKENS): its sequences regrouped
        # by length, each keeping its adapter
        long_ids = (ids[3] * 6)[:120]
        big = [(name, [long_ids] * 5) for name in ("qv", "", "mlp")]
        refs = {name: [hidden_states(merged(base, BertModel, adapters.get(name)), long_ids)]
                for name in ("", "qv", "mlp")}
        worst = max(worst, check_plan(big, mixed_batch(llm.engine, big), refs, [long_ids]))
        # the vLLM spellings: lora_request= as a name or a LoRARequest
        (out,) = llm.encode([{"prompt_token_ids": ids[3]}], RAW, pooling_task="token_embed",
                            lora_request=LoRARequest("mlp", 1, str(adapters["mlp"])))
        np.testing.assert_allclose(out.outputs.data.numpy(), bert_references["mlp"][3],
                                   atol=1e-4, rtol=0)
        (emb,) = llm.embed([{"prompt_token_ids": ids[2]}], RAW, lora_request="qv")
        np.testing.assert_allclose(emb.outputs.embedding, bert_references["qv"][2][0],
                                   atol=1e-4, rtol=0)  # CLS pooling: the first row
        with pytest.raises(AdapterNotFoundError, match=r"adapter 'nope' .* its adapters: qv, mlp"):
            llm.embed("x", lora_request="nope")
    print(f"BERT: max |ours - peft merged| = {worst:.2e}")


def test_qwen3_mixed_batch_equals_peft_merged(qwen3):
    from poolsvc import LLM

    base, adapters, ids, references = qwen3
    with LLM(str(base), loras=[f"{n}={p}" for n, p in adapters.items()], threads=1) as llm:
        plan = [("mlp", [ids[0]]), ("", ids[1:3]), ("attn", [ids[3], ids[4]]),
                ("mlp", [ids[5], ids[2]]), ("attn", [ids[1]])]
        worst = check_plan(plan, mixed_batch(llm.engine, plan), references, ids)
        # LAST pooling reads the adapter's last row
        (emb,) = llm.embed([{"prompt_token_ids": ids[3]}], RAW, lora_request="attn")
        np.testing.assert_allclose(emb.outputs.embedding, references["attn"][3][-1], atol=1e-4,
                                   rtol=0)
    print(f"Qwen3: max |ours - peft merged| = {worst:.2e}")


def test_layers_without_adapters_keep_the_cpu_fast_path(bert, bert_references):
    """"qv" changes layer 1 only: on the oneDNN path layer 0 stays one fused layer, and layer
    1's adapted layers wrap their packed base layers."""
    from poolsvc.engine import cpu

    base, adapters, ids = bert
    if not cpu.supports(torch.float32):
        pytest.skip("this CPU has no oneDNN float32 linear layers")
    body = load(base, ("qv", adapters["qv"])).backend
    assert isinstance(body.encoder.layer[0], cpu.FusedBertLayer)
    wrapped = [m for m in body.modules() if isinstance(m, LoraLinear)]
    assert len(wrapped) == 2 and all(isinstance(m.base, cpu.PackedLinear) for m in wrapped)
    slots = [1, 0, 1]
    for i, got in enumerate(forward_mixed(body, ids[:3], slots)):
        want = bert_references["qv" if slots[i] else ""][i]
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def forward_mixed(body, ids, slots) -> list[np.ndarray]:
    """The body's hidden states of one packed batch, each sequence with its adapter slot."""
    with torch.inference_mode():
        hidden = body(PackedBatch.build(ids, None, torch.device("cpu"), adapters=slots))
    return [part.numpy() for part in hidden.split([len(x) for x in ids])]


@pytest.mark.parametrize("family", ["bert", "qwen3"])
def test_with_the_cuda_kernels(family, bert, bert_references, qwen3):
    """The Triton kernels' fused layers (interpreted on the CPU here) with adapters: BERT's
    bias + GELU reads its weight directly, so an adapted intermediate layer keeps its plain form;
    the decoder's rotary and norm kernels stay on with adapted projections."""
    if not fused.available():
        pytest.skip("the kernels package is not installed")
    base, adapters, ids = bert[:3] if family == "bert" else qwen3[:3]
    references = bert_references if family == "bert" else qwen3[3]
    names = list(adapters)
    model = load_model(ModelSpec(str(base)), torch.device("cpu"), torch.float32,
                       is_default=True, pooler_config=PoolerConfig(), use_kernels=False,
                       adapters=tuple(LoraSpec(n, str(p)) for n, p in adapters.items()))
    body = model.backend
    fused.enable(body)
    if family == "bert":  # the mlp adapter changes every intermediate.dense
        assert not body.encoder.layer[0].intermediate.fused
        assert body.encoder.layer[0].output.fused
    else:
        assert body.fused and body.layers[0].self_attn.fused
    slots = [2, 0, 1]  # interpreted kernels are slow: three short inputs
    for i, got in enumerate(forward_mixed(body, ids[:3], slots)):
        want = references[names[slots[i] - 1] if slots[i] else ""][i]
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_adapter_rows_of_a_packed_batch():
    """Rows per adapter slot: one slice for a run of sequences, indices otherwise; regrouping
    (by length, in slices) keeps each sequence's adapter."""
    batch = PackedBatch.build([[1] * 3, [2] * 2, [3] * 4, [4], [5] * 2], None,
                              torch.device("cpu"), adapters=[0, 2, 1, 2, 2])
    (one, rows_one), (two, rows_two) = batch.adapter_rows
    assert (one, rows_one) == (1, slice(5, 9))
    assert two == 2 and rows_two.tolist() == [3, 4, 9, 10, 11]
    ordered, _ = batch.by_length()
    assert ordered.prompt_lens == (1, 2, 2, 3, 4) and ordered.adapters == (2, 2, 2, 0, 1)
    assert [part.adapters for part in batch.split(5)] == [(0, 2), (1, 2), (2,)]
    base_only = PackedBatch.build([[1], [2]], None, torch.device("cpu"), adapters=[0, 0])
    assert base_only.adapters is None and base_only.adapter_rows == ()


# --- over gRPC, the Python client and the HTTP routes, on a real server -----------------------

@pytest.fixture(scope="module")
def refused_serve(bert, tmp_path_factory):
    """`poolsvc serve` with an adapter whose rank does not fit, started beside lora_server so
    that the two start-ups overlap; test_serve_exits_with_the_reason reads how it ended."""
    base, adapters, _ = bert
    bad = edited(adapters["qv"], tmp_path_factory.mktemp("refused") / "rank", r=3)
    proc = subprocess.Popen([sys.executable, "-m", "poolsvc", "serve", "--port", "0",
                             "--threads", "1", "--model", str(base), "--lora", f"bad={bad}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def lora_server(bert, tmp_path_factory, refused_serve):
    base, adapters, _ = bert
    loras = [arg for name, path in adapters.items() for arg in ("--lora", f"{name}={path}")]
    srv = ServerProcess(tmp_path_factory.mktemp("lora-server") / "server.log",
                        "--model", f"tiny={base}", *loras, "--http-port", "-1").wait_ready()
    yield srv
    assert srv.terminate() == 0, srv.log()


def tokens(ids: list[int]) -> common_pb2.Input:
    return common_pb2.Input(tokens=common_pb2.TokenIds(ids=ids))


def rows(tensor) -> np.ndarray:
    return np.frombuffer(tensor.data, "<f4").reshape(tuple(tensor.shape))


def test_grpc_encode_and_embed_with_adapters(lora_server, bert, bert_references):
    _, _, ids = bert
    with grpc.insecure_channel(lora_server.address) as channel:
        encode = encode_pb2_grpc.EncodeServiceStub(channel)
        for name in ("", "qv", "mlp"):
            reply = encode.Encode(encode_pb2.EncodeRequest(
                inputs=[tokens(i) for i in ids], adapter=name, normalize=False,
                task=common_pb2.TASK_TOKEN_EMBED), timeout=60)
            assert reply.model == "tiny"
            for i, out in enumerate(reply.outputs):
                np.testing.assert_allclose(rows(out), bert_references[name][i], atol=1e-4,
                                           rtol=0)
        # a stream mixing adapters, answered per request
        embed = embed_pb2_grpc.EmbedServiceStub(channel)
        stream = [embed_pb2.EmbedStreamRequest(id=name or "base", request=embed_pb2.EmbedRequest(
            inputs=[tokens(ids[3])], adapter=name, normalize=False))
            for name in ("mlp", "", "qv")]
        for response in embed.EmbedStream(iter(stream), timeout=60):
            name = "" if response.id == "base" else response.id
            np.testing.assert_allclose(rows(response.response.embeddings)[0],
                                       bert_references[name][3][0], atol=1e-4, rtol=0)

        models = model_pb2_grpc.ModelServiceStub(channel).ListModels(
            model_pb2.ListModelsRequest(), timeout=30).models
        (info,) = models
        assert [(a.name, a.rank, list(a.target_modules)) for a in info.adapters] == [
            ("qv", 4, ["query", "value"]), ("mlp", 8, ["dense", "key"])]
        assert info.adapters[0].source.endswith("qv")


def test_grpc_unknown_adapter_is_not_found(lora_server):
    with grpc.insecure_channel(lora_server.address) as channel:
        embed = embed_pb2_grpc.EmbedServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            embed.Embed(embed_pb2.EmbedRequest(inputs=[common_pb2.Input(text="x")],
                                               adapter="nope"), timeout=30)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert "adapter 'nope'" in info.value.details()
        assert "its adapters: qv, mlp" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:  # model names one adapter, adapter another
            embed.Embed(embed_pb2.EmbedRequest(inputs=[common_pb2.Input(text="x")], model="qv",
                                               adapter="mlp"), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "name one" in info.value.details()


def test_python_client_adapter_keyword(lora_server, bert, bert_references):
    from poolsvc_client import Client, PoolsvcError

    _, _, ids = bert
    with Client(lora_server.address) as client:
        vectors = client.embed([ids[0], ids[5]], adapter="qv", normalize=False)
        np.testing.assert_allclose(vectors, [bert_references["qv"][0][0],
                                             bert_references["qv"][5][0]], atol=1e-4, rtol=0)
        (per_token,) = client.encode(ids[4], adapter="mlp", task="token_embed",
                                     normalize=False)
        np.testing.assert_allclose(per_token, bert_references["mlp"][4], atol=1e-4, rtol=0)
        for index, batch in client.embed_stream([[ids[1]], [ids[2]]], adapter="mlp",
                                                normalize=False):
            np.testing.assert_allclose(batch[0], bert_references["mlp"][index + 1][0],
                                       atol=1e-4, rtol=0)
        cosine = client.score(ids[0], [ids[1], ids[2]], adapter="qv")
        embedded = client.embed([ids[0], ids[1], ids[2]], adapter="qv")
        np.testing.assert_allclose(cosine, embedded[1:] @ embedded[0], atol=1e-5)
        with pytest.raises(PoolsvcError) as info:
            client.rerank(ids[0], [ids[1]], adapter="nope")
        assert info.value.code == grpc.StatusCode.NOT_FOUND


def test_http_takes_the_adapter_as_model(lora_server, bert, bert_references):
    _, _, ids = bert
    url = lora_server.http_url
    reply = requests.post(f"{url}/v1/embeddings", json={"model": "mlp", "input": [ids[3]]},
                          timeout=60)
    assert reply.status_code == 200, reply.text
    vector = np.asarray(reply.json()["data"][0]["embedding"])
    want = bert_references["mlp"][3][0]
    np.testing.assert_allclose(vector, want / np.linalg.norm(want), atol=1e-5)
    listed = {m["id"]: m for m in requests.get(f"{url}/v1/models", timeout=30).json()["data"]}
    assert listed["qv"]["parent"] == "tiny" and "mlp" in listed
    missing = requests.post(f"{url}/v1/embeddings", json={"model": "nope", "input": "x"},
                            timeout=30)
    assert missing.status_code == 404 and "nope" in missing.text


# --- adapters that cannot be served: refused at load, with the reason -------------------------

def load(base: Path, *adapters: tuple[str, Path]):
    return load_model(ModelSpec(str(base)), torch.device("cpu"), torch.float32, is_default=True,
                      pooler_config=PoolerConfig(),
                      adapters=tuple(LoraSpec(n, str(p)) for n, p in adapters))


def edited(adapter: Path, directory: Path, **config) -> Path:
    """A copy of `adapter` with adapter_config.json entries changed."""
    shutil.copytree(adapter, directory)
    data = json.loads((directory / "adapter_config.json").read_text())
    data.update(config)
    (directory / "adapter_config.json").write_text(json.dumps(data))
    return directory


def test_refused_at_load(bert, qwen3, tmp_path, minilm_path):
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        BertModel,
        ElectraConfig,
        ElectraModel,
    )

    base, adapters, _ = bert
    cases = {
        "rank does not fit: .* r=5": edited(adapters["qv"], tmp_path / "rank", r=5),
        "use_dora=True, which is not supported": edited(adapters["qv"], tmp_path / "dora",
                                                        use_dora=True),
        # made for the Qwen3 base
        r"was made for base model '.*qwen3'": qwen3[1]["attn"],
        r"target modules do not fit: the served model has no layer layers\.0\.self_attn\.":
            edited(qwen3[1]["attn"], tmp_path / "q", base_model_name_or_path=str(base)),
    }
    wider = tmp_path / "wider"  # 64 wide; the base is 48
    BertModel(BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=1,
                         num_attention_heads=4, intermediate_size=128)).save_pretrained(wider)
    cases[r"base shapes do not fit: .*query is \[48, 48\] .* update is \[64, 64\]"] = edited(
        make_adapter(wider, BertModel, tmp_path / "wide", 5, r=2, lora_alpha=2,
                     target_modules=["query"]), tmp_path / "wide-on-base",
        base_model_name_or_path=str(base))
    for reason, path in cases.items():
        with pytest.raises(ModelLoadError, match=reason):
            load(base, ("bad", path))

    # a task head runs on pooled rows: not adaptable
    clf = bert_classifier(tmp_path / "clf", minilm_path, 2)
    head = make_adapter(clf, BertForSequenceClassification, tmp_path / "head", 6, r=2,
                        lora_alpha=2, target_modules=["query", "classifier"])
    with pytest.raises(ModelLoadError, match="classifier is in the model's task head"):
        load(clf, ("head", head))

    # the transformers fallback serves no adapters
    electra = tmp_path / "electra"
    ElectraModel(ElectraConfig(vocab_size=30522, embedding_size=32, hidden_size=32,
                               num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64)).save_pretrained(electra)
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_path / name, electra / name)
    on_electra = make_adapter(electra, ElectraModel, tmp_path / "electra-lora", 7, r=2,
                              lora_alpha=2, target_modules=["query"])
    with pytest.raises(ModelLoadError, match="transformers fallback, which does not serve LoRA"):
        load(electra, ("e", on_electra))


def test_offline_conflicting_names(bert):
    from poolsvc.engine.config import ConfigError, EngineConfig

    base, adapters, _ = bert
    with pytest.raises(ConfigError, match="also model names"):
        EngineConfig(models=(ModelSpec(str(base), "qv"),), loras=(LoraSpec("qv", "x"),))
    with pytest.raises(ConfigError, match="NAME=PATH"):
        LoraSpec.parse("just-a-path")


def test_serve_exits_with_the_reason(refused_serve):
    stdout, stderr = refused_serve.communicate(timeout=240)
    assert refused_serve.returncode == 1, stdout + stderr
    assert "cannot serve" in stderr and "rank does not fit: " in stderr, stderr
