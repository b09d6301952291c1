"""Property-based fuzzing of every request message against a live server: every answer is OK or
a specific client-error status (never INTERNAL or UNKNOWN), and the server stays correct."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from poolsvc_client import decode_tensor

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

ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNIMPLEMENTED}
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])

texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=300)
small_ints = st.integers(min_value=-5, max_value=2000)
uint32 = st.one_of(st.integers(0, 40000), st.integers(0, 2**32 - 1))
int32 = st.integers(-(2**31), 2**31 - 1)
enum_values = st.integers(0, 12)
models = st.sampled_from(["", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2",
                          "nope", "../etc/passwd", "x" * 300])


@st.composite
def inputs(draw, max_size=5):
    items = []
    for _ in range(draw(st.integers(0, max_size))):
        kind = draw(st.sampled_from(["text", "tokens", "image", "empty"]))
        if kind == "text":
            items.append(common_pb2.Input(text=draw(texts)))
        elif kind == "tokens":
            ids = draw(st.lists(uint32, max_size=300))
            items.append(common_pb2.Input(tokens=common_pb2.TokenIds(ids=ids)))
        elif kind == "image":
            mime = draw(st.sampled_from(["", "image/png"]))
            items.append(common_pb2.Input(image=common_pb2.Image(
                data=draw(st.binary(max_size=64)), mime_type=mime)))
        else:
            items.append(common_pb2.Input())
    return items


@st.composite
def truncation(draw):
    if not draw(st.booleans()):
        return None
    options = common_pb2.TruncationOptions(max_tokens=draw(st.one_of(small_ints, int32)),
                                           side=draw(enum_values))
    if draw(st.booleans()):
        options.enabled = draw(st.booleans())
    return options


def optional(draw, message, field, strategy):
    if draw(st.booleans()):
        setattr(message, field, draw(strategy))


@st.composite
def embed_requests(draw):
    r = embed_pb2.EmbedRequest(model=draw(models), inputs=draw(inputs()),
                               output_dtype=draw(enum_values),
                               prompt_name=draw(st.sampled_from(["", "query", "x"])),
                               prompt=draw(st.sampled_from(["", "query: "])))
    optional(draw, r, "normalize", st.booleans())
    optional(draw, r, "dimensions", uint32)
    if (t := draw(truncation())) is not None:
        r.truncation.CopyFrom(t)
    return r


@st.composite
def classify_requests(draw):
    r = classify_pb2.ClassifyRequest(model=draw(models), inputs=draw(inputs()),
                                     output_dtype=draw(enum_values))
    optional(draw, r, "activation", st.booleans())
    return r


@st.composite
def score_requests(draw):
    r = score_pb2.ScoreRequest(model=draw(models), queries=draw(inputs(4)),
                               documents=draw(inputs(4)))
    optional(draw, r, "activation", st.booleans())
    if (t := draw(truncation())) is not None:
        r.truncation.CopyFrom(t)
    return r


@st.composite
def rerank_requests(draw):
    r = score_pb2.RerankRequest(model=draw(models), documents=draw(inputs(4)),
                                top_n=draw(uint32), return_documents=draw(st.booleans()))
    query = draw(inputs(1))
    if query:
        r.query.CopyFrom(query[0])
    return r


@st.composite
def encode_requests(draw):
    r = encode_pb2.EncodeRequest(model=draw(models), inputs=draw(inputs()),
                                 task=draw(enum_values), output_dtype=draw(enum_values))
    optional(draw, r, "normalize", st.booleans())
    optional(draw, r, "activation", st.booleans())
    return r


@st.composite
def tokenize_requests(draw):
    r = model_pb2.TokenizeRequest(model=draw(models), texts=draw(st.lists(texts, max_size=4)),
                                  return_tokens=draw(st.booleans()),
                                  return_offsets=draw(st.booleans()),
                                  prompt=draw(st.sampled_from(["", "q: "])))
    optional(draw, r, "add_special_tokens", st.booleans())
    if (t := draw(truncation())) is not None:
        r.truncation.CopyFrom(t)
    return r


def answer(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as err:
        assert err.code() in ALLOWED, (err.code(), err.details())
        return err.code()
    return grpc.StatusCode.OK


@pytest.fixture(scope="module")
def stubs(channel):
    return {"embed": embed_pb2_grpc.EmbedServiceStub(channel),
            "classify": classify_pb2_grpc.ClassifyServiceStub(channel),
            "score": score_pb2_grpc.ScoreServiceStub(channel),
            "encode": encode_pb2_grpc.EncodeServiceStub(channel),
            "model": model_pb2_grpc.ModelServiceStub(channel)}


@SETTINGS
@given(request=embed_requests())
def test_embed(stubs, request):
    answer(lambda: stubs["embed"].Embed(request, timeout=60))


@SETTINGS
@given(requests=st.lists(embed_requests(), min_size=1, max_size=3))
def test_embed_stream(stubs, requests):
    items = [embed_pb2.EmbedStreamRequest(id=str(i), request=r) for i, r in enumerate(requests)]
    replies = list(stubs["embed"].EmbedStream(iter(items), timeout=60))
    assert sorted(r.id for r in replies) == sorted(i.id for i in items)
    for reply in replies:
        if reply.WhichOneof("result") == "error":
            code = next(c for c in grpc.StatusCode if c.value[0] == reply.error.code)
            assert code in ALLOWED, reply.error.message


@SETTINGS
@given(request=classify_requests())
def test_classify(stubs, request):
    answer(lambda: stubs["classify"].Classify(request, timeout=60))


@SETTINGS
@given(request=score_requests())
def test_score(stubs, request):
    answer(lambda: stubs["score"].Score(request, timeout=60))


@SETTINGS
@given(request=rerank_requests())
def test_rerank(stubs, request):
    answer(lambda: stubs["score"].Rerank(request, timeout=60))


@SETTINGS
@given(request=encode_requests())
def test_encode(stubs, request):
    answer(lambda: stubs["encode"].Encode(request, timeout=60))


@SETTINGS
@given(request=tokenize_requests())
def test_tokenize(stubs, request):
    answer(lambda: stubs["model"].Tokenize(request, timeout=60))


@SETTINGS
@given(name=models)
def test_model_info(stubs, name):
    answer(lambda: stubs["model"].GetModelInfo(model_pb2.GetModelInfoRequest(model=name),
                                               timeout=60))


def test_still_serving_and_correct_afterwards(channel, stubs, st_model):
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=30).status == \
        health_pb2.HealthCheckResponse.SERVING
    texts_ = ["after the fuzz", "still right"]
    reply = stubs["embed"].Embed(embed_pb2.EmbedRequest(
        inputs=[common_pb2.Input(text=t) for t in texts_]), timeout=30)
    np.testing.assert_allclose(decode_tensor(reply.embeddings), st_model.encode(texts_),
                               atol=2e-6)
