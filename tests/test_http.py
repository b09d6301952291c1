"""The HTTP/JSON routes (`--http-port`) against a live server, called by the real clients: the
openai Python SDK, the cohere SDK, langchain-openai, the Node openai package and curl. Every
answer is compared with the gRPC answer for the same inputs from the same server; every bad input
gets its status and a message saying what to change (a fuzz test shows nothing answers 500)."""

from __future__ import annotations

import base64
import json
import signal
import socket
import ssl
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from conftest import ROOT, ServerProcess
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from poolsvc_client import Client

KEY = "http-test-key"
MODEL = "all-MiniLM-L6-v2"
TEXTS = ["Hello, my name is", "The quick brown fox jumps over the lazy dog.",
         "東京は日本の首都であり、世界で最も人口の多い都市圏の一つです。",
         "Emoji too 🚀🔥🎉 and accents: café, naïve, Ångström.", "x",
         " ".join(["A longer passage about embeddings and retrieval"] * 20)]
QUERY, DOCS = "what is a cat?", ["a small feline", "a big dog", "cats purr", "the stock market"]
AUTH = {"Authorization": f"Bearer {KEY}"}
NODE = ROOT / "tests/http_node"


@pytest.fixture(scope="module")
def models(tmp_path_factory, minilm_path):
    """The bundled embedder with named prompts (query, passage), a cross-encoder, a classifier."""
    from tiny_models import bert_classifier, xlmr_classifier

    root = tmp_path_factory.mktemp("http-models")
    prompted = root / "prompted"
    prompted.mkdir()
    for item in minilm_path.iterdir():
        if item.name != "config_sentence_transformers.json":
            (prompted / item.name).symlink_to(item)
    (prompted / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": {"query": "query: ", "passage": "passage: "}, "default_prompt_name": None}))
    return {MODEL: prompted, "rerank": xlmr_classifier(root / "rerank", seed=1),
            "clf": bert_classifier(root / "clf", minilm_path, 3, seed=2,
                                   id2label={0: "negative", 1: "neutral", 2: "positive"})}


@pytest.fixture(scope="module")
def srv(models, tmp_path_factory):
    args = [a for name, path in models.items() for a in ("--model", f"{name}={path}")]
    server = ServerProcess(tmp_path_factory.mktemp("http") / "server.log", *args,
                           "--http-port", "-1", "--api-key", KEY,
                           "--max-message-bytes", str(1 << 20),
                           "--max-inputs-per-request", "64").wait_ready()
    yield server
    assert server.terminate() == 0, server.log()


@pytest.fixture(scope="module")
def grpc_client(srv):
    with Client(srv.address, api_key=KEY) as client:
        yield client


@pytest.fixture(scope="module")
def http(srv):
    with httpx.Client(base_url=srv.http_url, headers=AUTH, timeout=60) as client:
        yield client


def close(got, want, tol=1e-6):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.abs(got - want).max() <= tol


# --- the real clients ------------------------------------------------------------------------


def test_openai_sdk_float_base64_dimensions_token_ids(srv, grpc_client):
    from openai import OpenAI

    client = OpenAI(base_url=f"{srv.http_url}/v1", api_key=KEY, max_retries=0)
    want = grpc_client.embed(TEXTS, model=MODEL)
    floats = client.embeddings.create(input=TEXTS, model=MODEL, encoding_format="float")
    close([d.embedding for d in floats.data], want)
    assert [d.index for d in floats.data] == list(range(len(TEXTS)))
    tokens = grpc_client.embed_response(TEXTS, model=MODEL).usage.total_tokens
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == tokens
    assert floats.model == MODEL
    packed = client.embeddings.create(input=TEXTS, model=MODEL, encoding_format="base64")
    close([np.frombuffer(base64.b64decode(d.embedding), "<f4") for d in packed.data], want)
    default = client.embeddings.create(input=TEXTS, model=MODEL)  # the SDK asks for base64
    close([d.embedding for d in default.data], want)
    small = client.embeddings.create(input="a query", model=MODEL, dimensions=64,
                                     encoding_format="float")
    close([small.data[0].embedding], grpc_client.embed("a query", model=MODEL, dimensions=64))
    ids = grpc_client.tokenize(TEXTS[:2], model=MODEL)
    by_ids = client.embeddings.create(input=ids, model=MODEL, encoding_format="float")
    close([d.embedding for d in by_ids.data], want[:2])
    assert {m.id for m in client.models.list()} >= {MODEL, "rerank", "clf"}


def test_cohere_sdk_embed_types_prompts_and_rerank(srv, grpc_client):
    import cohere

    client = cohere.ClientV2(api_key=KEY, base_url=srv.http_url)
    kinds = {"float": "float32", "int8": "int8", "uint8": "uint8", "binary": "binary",
             "ubinary": "ubinary"}
    texts = TEXTS[:5]  # the long passage takes most of the time; the other tests have it
    for input_type, prompt in (("search_query", "query"), ("search_document", "passage")):
        res = client.embed(model=MODEL, texts=texts, input_type=input_type,
                           embedding_types=list(kinds))
        floats = grpc_client.embed(texts, model=MODEL, prompt_name=prompt)
        close(res.embeddings.float_, floats)
        clear = np.abs(floats) > 1e-4  # sign bits and quantization steps far from a boundary
        for kind, dtype in kinds.items():
            if kind == "float":
                continue
            got = np.array(getattr(res.embeddings, kind))
            want = grpc_client.embed(texts, model=MODEL, prompt_name=prompt, dtype=dtype)
            assert got.shape == want.shape
            if kind in ("int8", "uint8"):
                assert np.abs(got - want.astype(int)).max() <= 1
            else:
                bits = np.unpackbits(got.astype(np.int64).astype(np.uint8), axis=1)
                want_bits = np.unpackbits(want.view(np.uint8), axis=1)[:, :clear.shape[1]]
                assert (bits[:, :clear.shape[1]] == want_bits)[clear].all()
        assert res.texts == texts
    # A model without a "classification" prompt embeds the texts as they are.
    plain = client.embed(model=MODEL, texts=TEXTS[:2], input_type="classification",
                         embedding_types=["float"])
    close(plain.embeddings.float_, grpc_client.embed(TEXTS[:2], model=MODEL))
    ranked = client.rerank(model="rerank", query=QUERY, documents=DOCS, top_n=3)
    want = grpc_client.rerank(QUERY, DOCS, model="rerank", top_n=3)
    assert [r.index for r in ranked.results] == [w.index for w in want]
    close([r.relevance_score for r in ranked.results], [w.score for w in want])


def test_cohere_rerank_max_tokens_per_doc_cuts_each_document(srv, grpc_client, models):
    """Each document is cut to its first N tokens (the model's tokenizer, as transformers
    counts them) before pairing, as Cohere does; a limit past the model's maximum cuts none."""
    import cohere
    from transformers import AutoTokenizer

    docs = ["a small feline that purrs and sleeps in the sun all day long", "a dog",
            "cats purr when they are happy, fed and warm", "the stock market fell on Monday"]
    tokenizer = AutoTokenizer.from_pretrained(str(models["rerank"]))
    cut = []
    for doc in docs:
        ends = [end for _, end in tokenizer(doc, add_special_tokens=False,
                                            return_offsets_mapping=True)["offset_mapping"]]
        cut.append(doc[:ends[3]] if len(ends) > 4 else doc)
        assert len(tokenizer(cut[-1], add_special_tokens=False)["input_ids"]) == min(4, len(ends))
    assert cut[1] == docs[1] and cut[0] != docs[0]
    client = cohere.ClientV2(api_key=KEY, base_url=srv.http_url)
    ranked = client.rerank(model="rerank", query=QUERY, documents=docs, max_tokens_per_doc=4)
    want = grpc_client.score(QUERY, cut, model="rerank")
    close([r.relevance_score for r in sorted(ranked.results, key=lambda r: r.index)], want)
    assert not np.allclose(want, grpc_client.score(QUERY, docs, model="rerank"))
    whole = client.rerank(model="rerank", query=QUERY, documents=docs, max_tokens_per_doc=4096)
    close([r.relevance_score for r in sorted(whole.results, key=lambda r: r.index)],
          grpc_client.score(QUERY, docs, model="rerank"))


def test_langchain_openai_embeddings(srv, grpc_client):
    from langchain_openai import OpenAIEmbeddings

    # check_embedding_ctx_length=False: send the texts, not tiktoken's token ids of them (which
    # would need tiktoken's files from the internet, and are not this model's tokens).
    embeddings = OpenAIEmbeddings(model=MODEL, base_url=f"{srv.http_url}/v1", api_key=KEY,
                                  check_embedding_ctx_length=False, max_retries=0)
    want = grpc_client.embed(TEXTS, model=MODEL)
    close(embeddings.embed_documents(TEXTS), want)
    close([embeddings.embed_query(TEXTS[1])], want[1:2])


def test_node_openai_package(srv, grpc_client):
    assert (NODE / "node_modules/openai").is_dir(), \
        "run: npm ci --prefix tests/http_node (scripts/test-deps.sh does)"
    done = subprocess.run(["node", str(NODE / "embed.js"), f"{srv.http_url}/v1", KEY, MODEL,
                           *TEXTS], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    want = grpc_client.embed(TEXTS, model=MODEL)
    close(out["float"], want)
    close(out["default"], want)


def curl(srv, path: str, body) -> dict:
    done = subprocess.run(["curl", "-sS", "--fail-with-body", f"{srv.http_url}{path}", "-H",
                           f"Authorization: Bearer {KEY}", "-d", json.dumps(body)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def test_curl_every_vllm_route(srv, grpc_client):
    pooled = curl(srv, "/pooling", {"input": TEXTS[:3], "task": "token_embed"})
    for item, want in zip(pooled["data"], grpc_client.encode(TEXTS[:3], model=MODEL,
                                                             task="token_embed")):
        close(item["data"], want)
    pooled = curl(srv, "/pooling", {"input": TEXTS[0], "task": "embed", "encoding_format":
                                    "base64"})
    close([np.frombuffer(base64.b64decode(pooled["data"][0]["data"]), "<f4")],
          grpc_client.embed(TEXTS[:1], model=MODEL))
    want = grpc_client.score(QUERY, DOCS, model="rerank")
    for body in ({"model": "rerank", "text_1": QUERY, "text_2": DOCS},
                 {"model": "rerank", "queries": QUERY, "documents": DOCS}):
        close([d["score"] for d in curl(srv, "/score", body)["data"]], want)
    cosine = curl(srv, "/v1/score", {"text_1": [QUERY, QUERY], "text_2": DOCS[:2]})
    close([d["score"] for d in cosine["data"]], grpc_client.score([QUERY] * 2, DOCS[:2]))
    want = grpc_client.rerank(QUERY, DOCS, model="rerank", top_n=2)
    for path in ("/rerank", "/v1/rerank"):
        ranked = curl(srv, path, {"model": "rerank", "query": QUERY, "documents": DOCS,
                                  "top_n": 2})
        assert [r["index"] for r in ranked["results"]] == [w.index for w in want]
        assert [r["document"]["text"] for r in ranked["results"]] == [DOCS[w.index] for w in want]
        close([r["relevance_score"] for r in ranked["results"]], [w.score for w in want])
    classes = curl(srv, "/classify", {"model": "clf", "input": TEXTS[:3]})
    want = grpc_client.classify(TEXTS[:3], model="clf")
    close([d["probs"] for d in classes["data"]], want.probs)
    assert [d["label"] for d in classes["data"]] == \
        [want.labels[i] for i in np.argmax(want.probs, axis=1)]
    tokens = curl(srv, "/tokenize", {"prompt": TEXTS[0], "return_token_strs": True})
    assert tokens["tokens"] == grpc_client.tokenize(TEXTS[0])[0]
    assert tokens["count"] == len(tokens["tokens"]) and tokens["token_strs"][0] == "[CLS]"
    embedded = curl(srv, "/v1/embeddings", {"input": TEXTS, "model": MODEL})
    close([d["embedding"] for d in embedded["data"]], grpc_client.embed(TEXTS, model=MODEL))


def test_tokenize_cuts_to_a_length_below_the_special_tokens_without_them(http, models):
    """Without special tokens, truncation to 1 or 2 tokens leaves room for text (the engine
    used to refuse any length up to the count of special tokens the model would add)."""
    from transformers import AutoTokenizer

    want = AutoTokenizer.from_pretrained(str(models[MODEL]))(TEXTS[1], add_special_tokens=False)
    for keep in (1, 2):
        got = http.post("/tokenize", json={"prompt": TEXTS[1], "add_special_tokens": False,
                                           "truncate_prompt_tokens": keep})
        assert got.status_code == 200, got.text
        assert got.json()["tokens"] == want["input_ids"][:keep]
    refused = http.post("/tokenize", json={"prompt": TEXTS[1], "truncate_prompt_tokens": 2})
    assert refused.status_code == 400 and "leaves no room for text" in refused.text


def test_health_and_metrics_are_open_and_count_the_routes(srv, http):
    assert httpx.get(f"{srv.http_url}/health").status_code == 200  # no key needed
    http.post("/v1/embeddings", json={"input": "count me"}).raise_for_status()
    metrics = httpx.get(f"{srv.http_url}/metrics").text
    assert 'poolsvc_requests_total{code="200",rpc="POST /v1/embeddings"}' in metrics
    assert httpx.get(f"{srv.http_url}/openapi.json").status_code == 401
    schema = http.get("/openapi.json").json()
    assert {"/v1/embeddings", "/pooling", "/score", "/rerank", "/v1/rerank", "/classify",
            "/tokenize", "/v2/embed", "/v2/rerank"} <= set(schema["paths"])


# --- bad input -------------------------------------------------------------------------------

LONG = "word " * 400  # over the model's 256 tokens
BAD = [
    # path, body (a JSON value, or str: raw bytes), status, what the message says
    ("/v1/embeddings", {"input": []}, 400, "input is empty"),
    ("/v1/embeddings", {"input": ""}, 400, "empty text"),
    ("/v1/embeddings", {"input": 5}, 400, "input must be a text"),
    ("/v1/embeddings", {"input": ["a", 3]}, 400, "input[1] must be a text"),
    ("/v1/embeddings", {"input": [[1, True]]}, 400, "input[0] must be a list of token ids"),
    ("/v1/embeddings", {"input": [[101, -5, 102]]}, 400, "token id -5, outside the vocabulary"),
    ("/v1/embeddings", {"input": [101, -5]}, 400, "token id -5, outside the vocabulary"),
    ("/pooling", {"input": [[101, -2 ** 70]]}, 400, "outside the vocabulary"),
    ("/v1/embeddings", {"input": [[1, 10 ** 30]]}, 400, "outside the vocabulary"),
    ("/v1/embeddings", {"input": "x", "dimensions": "64"}, 400, "dimensions"),
    ("/v1/embeddings", {"input": "x", "dimensions": 1000}, 400, "dimensions"),
    ("/v1/embeddings", {"input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
    ("/v1/embeddings", {"input": "x", "colour": 1}, 400, "unknown field 'colour'"),
    ("/v1/embeddings", {"input": "x", "model": "nope"}, 404, "'nope' is not served"),
    ("/v1/embeddings", {"input": LONG}, 400, '"truncate_prompt_tokens": -1'),
    ("/v1/embeddings", {"input": "x", "truncate_prompt_tokens": 10 ** 20}, 400,
     "exceeds the model's maximum"),
    ("/v1/embeddings", {"input": ["x"] * 65}, 413, "--max-inputs-per-request"),
    ("/v1/embeddings", {"input": "x" * (1 << 20)}, 413, "--max-message-bytes"),
    ("/v1/embeddings", "{not json", 400, "not valid JSON"),
    ("/v1/embeddings", "[1, 2]", 400, "must be a JSON object"),
    ("/v2/embed", {"texts": ["x"]}, 400, "model is required"),
    ("/v2/embed", {"model": MODEL, "texts": []}, 400, "texts is empty"),
    ("/v2/embed", {"model": MODEL, "texts": "x"}, 400, "texts must be a list of texts"),
    ("/v2/embed", {"model": MODEL, "texts": ["x"], "embedding_types": ["float64"]}, 400,
     "embedding_types[0]"),
    ("/v2/embed", {"model": MODEL, "texts": ["x"], "input_type": "chat"}, 400, "input_type"),
    ("/v2/embed", {"model": MODEL, "texts": [LONG], "truncate": "NONE"}, 400,
     '"truncate": "END"'),
    ("/v2/embed", {"model": MODEL, "texts": ["x"], "images": []}, 400, "unknown field 'images'"),
    ("/v2/embed", {"model": "nope", "texts": ["x"]}, 404, "'nope' is not served"),
    ("/v2/rerank", {"model": "rerank", "query": "q", "documents": "d"}, 400, "list of texts"),
    ("/v2/rerank", {"model": "rerank", "query": "q", "documents": ["d"], "top_n": 0}, 400,
     "top_n"),
    ("/v2/rerank", {"model": "rerank", "query": "q", "documents": ["d"],
                    "max_tokens_per_doc": 0}, 400, "max_tokens_per_doc"),
    ("/score", {"text_1": "a"}, 400, "text_2 is required"),
    ("/score", {"text_1": "a", "queries": "b"}, 400, "one of the two forms"),
    ("/score", {"model": "rerank", "text_1": ["a", "b"], "text_2": ["c", "d", "e"]}, 400,
     "cannot pair 2 queries with 3 documents"),
    ("/rerank", {"query": "", "documents": ["a"]}, 400, "query is an empty text"),
    ("/rerank", {"query": "q", "documents": ["a"], "top_n": -1}, 400, "top_n"),
    ("/classify", {"input": "x"}, 400, "does not serve classify"),
    ("/pooling", {"input": "x", "task": "dance"}, 400, "task"),
    ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/tokenize", {"prompt": LONG, "model": "clf"}, 400, "tokens"),
]


def error_message(path: str, response: httpx.Response) -> str:
    """The message, from the body shape of the API the route imitates."""
    body = response.json()
    if path.startswith("/v2/"):
        assert set(body) == {"message"}
        return body["message"]
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if path not in ("/v1/embeddings", "/v1/models"):
        assert error["code"] == response.status_code  # vLLM's: the status
    return error["message"]


@pytest.mark.parametrize("path, body, status, fragment", BAD,
                         ids=[f"{p}-{i}" for i, (p, *_) in enumerate(BAD)])
def test_bad_input_says_what_to_change(http, path, body, status, fragment):
    content = body if isinstance(body, str) else json.dumps(body)
    response = http.post(path, content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    assert fragment in error_message(path, response)


@pytest.mark.parametrize("path", ["/v1/embeddings", "/v2/embed", "/rerank", "/v1/models"])
def test_no_or_wrong_key_is_401(srv, path):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        response = httpx.request("GET" if path == "/v1/models" else "POST",
                                 f"{srv.http_url}{path}", json={"input": "x"}, headers=headers)
        assert response.status_code == 401
        assert "Authorization: Bearer" in error_message(path, response)


def test_wrong_route_and_method(http):
    assert http.post("/v1/chat/completions", json={}).status_code == 404
    response = http.get("/v1/embeddings")
    assert response.status_code == 405 and "does not take GET" in error_message(
        "/v1/embeddings", response)


# --- fuzz: nothing answers 500 ----------------------------------------------------------------

ROUTES = {
    "/v1/embeddings": ["input", "model", "encoding_format", "dimensions", "user", "normalize",
                       "truncate_prompt_tokens"],
    "/pooling": ["input", "model", "task", "encoding_format", "dimensions", "normalize",
                 "use_activation", "truncate_prompt_tokens"],
    "/classify": ["input", "model", "use_activation", "activation"],
    "/score": ["text_1", "text_2", "queries", "documents", "model", "use_activation"],
    "/rerank": ["query", "documents", "top_n", "return_documents", "model"],
    "/tokenize": ["prompt", "model", "add_special_tokens", "return_token_strs"],
    "/v2/embed": ["model", "texts", "input_type", "embedding_types", "output_dimension",
                  "max_tokens", "truncate"],
    "/v2/rerank": ["model", "query", "documents", "top_n", "max_tokens_per_doc"],
}
_MODELS = st.sampled_from(["", MODEL, "rerank", "clf", "nope"])
_SCALARS = (st.none() | st.booleans() | st.integers(-3, 300) | st.integers(-2 ** 70, 2 ** 70)
            | st.floats(allow_nan=False) | st.text(max_size=12)
            | st.sampled_from(["float", "base64", "int8", "embed", "token_embed", "classify",
                               "search_query", "END", "NONE", "START"]))
_JSON = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=10)


@st.composite
def bodies(draw):
    path = draw(st.sampled_from(sorted(ROUTES)))
    if draw(st.integers(0, 9)) == 0:
        return path, draw(_JSON)  # anything at all
    fields = draw(st.lists(st.sampled_from(ROUTES[path]), unique=True, max_size=5))
    body = {name: draw(_MODELS if name == "model" else _JSON) for name in fields}
    if draw(st.booleans()):
        body[draw(st.sampled_from(["input", "texts", "query", "text_1", "prompt"]))] = \
            draw(st.text(min_size=1, max_size=30) | st.lists(st.text(max_size=8), max_size=3))
    return path, body


@settings(max_examples=250, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=bodies())
def test_fuzz_no_route_answers_500(http, case):
    path, body = case
    response = http.post(path, content=json.dumps(body),
                         headers={"Content-Type": "application/json"})
    assert response.status_code in (200, 400, 404, 413), (path, body, response.text)
    if response.status_code != 200:
        assert error_message(path, response)


# --- gRPC and HTTP callers together ------------------------------------------------------------


def test_mixed_grpc_and_http_load(http, grpc_client):
    texts = TEXTS[:5]
    want = grpc_client.embed(texts, model=MODEL)
    rng = np.random.default_rng(0)
    picks = [rng.choice(len(texts), size=int(rng.integers(1, 4)), replace=False)
             for _ in range(64)]

    def call(i: int):
        chosen = [texts[j] for j in picks[i]]
        if i % 2:
            got = grpc_client.embed(chosen, model=MODEL)
        else:
            response = http.post("/v1/embeddings", json={"input": chosen, "model": MODEL})
            response.raise_for_status()
            got = [d["embedding"] for d in response.json()["data"]]
        close(got, want[picks[i]], 1e-5)  # batched with other callers' texts
        return i

    with ThreadPoolExecutor(8) as pool:
        assert sorted(pool.map(call, range(len(picks)))) == list(range(len(picks)))


# --- flags, and a second server: TLS, overload, SIGTERM ------------------------------------------


def test_http_port_flag_is_checked():
    from poolsvc.config import ConfigError, ServerConfig

    with pytest.raises(ConfigError, match="--http-port must be 0"):
        ServerConfig(http_port=-2)
    with pytest.raises(ConfigError, match="taken by --port"):
        ServerConfig(port=8000, http_port=8000)
    assert ServerConfig(http_port=-1).http_port == -1


PASSAGE = " ".join(["retrieval augmented generation needs fast embeddings"] * 30)


@pytest.fixture(scope="module")
def edge(tmp_path_factory):
    """The bundled embedder over TLS, one request admitted at a time, a long grace period. The
    tests below use it in order; the last one SIGTERMs it."""
    from certs import make_certs

    root = tmp_path_factory.mktemp("http-edge")
    certs = make_certs(root / "certs")
    server = ServerProcess(root / "server.log", "--http-port", "-1", "--tls-cert",
                           str(certs["server"]), "--tls-key", str(certs["server_key"]),
                           "--max-concurrent-requests", "1", "--grace-period", "60")
    server.trust = ssl.create_default_context(cafile=str(certs["ca"]))
    try:
        yield server.wait_ready()
    finally:
        assert server.terminate() == 0, server.log()


def test_tls_applies_to_the_http_port(edge, grpc_client):
    assert edge.http_url.startswith("https://")
    with httpx.Client(base_url=edge.http_url, verify=edge.trust) as client:
        assert client.get("/health").status_code == 200
        got = client.post("/v1/embeddings", json={"input": TEXTS[:2], "model": MODEL})
        close([d["embedding"] for d in got.json()["data"]],
              grpc_client.embed(TEXTS[:2], model=MODEL))
    with pytest.raises(httpx.HTTPError):  # plaintext to the TLS port
        httpx.get(edge.http_url.replace("https://", "http://") + "/health", timeout=10)


OVERLOAD = {"/v1/embeddings": {"input": [PASSAGE] * 16, "truncate_prompt_tokens": -1},
            "/pooling": {"input": [PASSAGE] * 16, "truncate_prompt_tokens": -1},
            "/v2/embed": {"model": MODEL, "texts": [PASSAGE] * 16}}


def test_overload_is_429_with_retry_after(edge):
    """Past --max-concurrent-requests a call is refused at once with 429, the peer's error body
    and Retry-After (which the OpenAI SDK honours), as gRPC answers RESOURCE_EXHAUSTED."""
    paths = sorted(OVERLOAD) * 3
    with httpx.Client(base_url=edge.http_url, verify=edge.trust, timeout=120) as client:
        for _ in range(3):  # simultaneous calls; a round served one by one is tried again
            start = threading.Barrier(len(paths))
            with ThreadPoolExecutor(len(paths)) as pool:
                answers = list(pool.map(lambda path, start=start: (
                    start.wait(), path, client.post(path, json=OVERLOAD[path]))[1:], paths))
            if any(r.status_code == 429 for _, r in answers):
                break
        assert {r.status_code for _, r in answers} == {200, 429}, [r.text for _, r in answers]
        for path, response in answers:
            if response.status_code == 429:
                assert response.headers["Retry-After"] == "1"
                message = error_message(path, response)
                assert "--max-concurrent-requests 1" in message and "retry" in message
                if path == "/v1/embeddings":
                    assert response.json()["error"]["type"] == "rate_limit_error"
            else:
                assert len(response.json()["data" if path != "/v2/embed" else "texts"]) == 16
        # Once the load is gone, calls are admitted again.
        assert client.post("/v1/embeddings", json={"input": "again"}).status_code == 200


def held_request(url: str, path: str, body: bytes, context: ssl.SSLContext) -> socket.socket:
    """A POST whose headers are sent with `Expect: 100-continue` and whose body is not: the
    server's "100 Continue" says the call has reached the routes and asked for its body, so it
    is in flight until the caller sends the body (`finish`)."""
    where = urlsplit(url)
    sock = context.wrap_socket(socket.create_connection((where.hostname, where.port), 60),
                               server_hostname=where.hostname)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {where.netloc}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                 "Expect: 100-continue\r\nConnection: close\r\n\r\n".encode())
    interim = b""
    while b"\r\n\r\n" not in interim:
        interim += sock.recv(1) or pytest.fail(f"connection closed: {interim!r}")
    assert interim.startswith(b"HTTP/1.1 100 "), interim
    return sock


def finish(sock: socket.socket, body: bytes) -> tuple[int, dict]:
    """Sends the held request's body; its status and JSON body."""
    sock.sendall(body)
    reply = b""
    while chunk := sock.recv(65536):
        reply += chunk
    sock.close()
    head, _, content = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(content)


def test_sigterm_finishes_http_calls_in_flight_and_refuses_new_ones(edge, grpc_client):
    """As gRPC's drain (test_lifecycle.py): a call in flight at SIGTERM is answered in full; new
    calls get 503 saying why (with Retry-After), /health 503; the process exits 0 once the call
    is answered, well inside the grace period; then the port is closed."""
    body = json.dumps({"input": TEXTS, "model": MODEL}).encode()
    held = held_request(edge.http_url, "/v1/embeddings", body, edge.trust)
    edge.proc.send_signal(signal.SIGTERM)
    assert "shutting down: 1 calls in flight" in edge.wait_for(r"shutting down: .*", 60).group()
    with httpx.Client(base_url=edge.http_url, verify=edge.trust, timeout=60) as client:
        assert client.get("/health").status_code == 503
        for path, payload in (("/v1/embeddings", {"input": "late"}),
                              ("/v2/embed", {"model": MODEL, "texts": ["late"]})):
            response = client.post(path, json=payload)
            assert response.status_code == 503 and response.headers["Retry-After"] == "1"
            assert "shutting down and takes no new calls" in error_message(path, response)
    status, answer = finish(held, body)
    assert status == 200, answer
    close([d["embedding"] for d in answer["data"]], grpc_client.embed(TEXTS, model=MODEL))
    assert edge.proc.wait(50) == 0  # not the 60 s grace period: nothing is left in flight
    log = edge.log()
    assert "poolsvc stopped" in log and "cut off" not in log
    with pytest.raises(httpx.ConnectError):  # the port is closed
        httpx.get(f"{edge.http_url}/health", verify=edge.trust, timeout=10)
