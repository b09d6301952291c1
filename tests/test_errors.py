"""Every bad input gets a specific status with a message that says what to change."""

from __future__ import annotations

import grpc
import pytest

from poolsvc.engine import errors
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
    tensor_pb2,
)
from poolsvc.service.status import (
    ERROR_TABLE,
    HTTP_STATUS_OF_ERROR,
    STATUS_OF_ERROR,
    status_of,
)

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def text(t: str) -> common_pb2.Input:
    return common_pb2.Input(text=t)


def embed_call(channel, **fields):
    stub = embed_pb2_grpc.EmbedServiceStub(channel)
    fields.setdefault("inputs", [text("hello")])
    return stub.Embed(embed_pb2.EmbedRequest(**fields), timeout=30)


def assert_status(call, code: grpc.StatusCode, *fragments: str):
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    for fragment in fragments:
        assert fragment in info.value.details(), info.value.details()


LONG = " ".join(["token"] * 300)  # 302 tokens with [CLS] and [SEP]; the model's limit is 256

CASES = {
    "empty batch": (dict(inputs=[]), INVALID, ["no inputs", "at least one"]),
    "empty input": (dict(inputs=[text("ok"), common_pb2.Input()]), INVALID,
                    ["input 1 is empty", "set text, tokens or image"]),
    "over-long input, truncation off": (
        dict(inputs=[text("ok"), text(LONG)]), INVALID,
        ["input 1 has 302 tokens", "limit of 256", "truncation"]),
    "over-long input, truncation explicitly off": (
        dict(inputs=[text(LONG)], truncation=common_pb2.TruncationOptions(enabled=False)),
        INVALID, ["302 tokens", "256"]),
    "over-long token ids": (
        dict(inputs=[common_pb2.Input(tokens=common_pb2.TokenIds(ids=[101] * 300))]), INVALID,
        ["input 0 has 300 tokens", "limit of 256", "(truncation.enabled=true)"]),
    "dimensions zero": (dict(dimensions=0), INVALID, ["between 1 and 384", "got 0"]),
    "dimensions too big": (dict(dimensions=385), INVALID, ["between 1 and 384", "got 385"]),
    "unknown model": (dict(model="bge-large"), grpc.StatusCode.NOT_FOUND,
                      ["'bge-large' is not served", "all-MiniLM-L6-v2"]),
    "token id outside vocabulary": (
        dict(inputs=[common_pb2.Input(tokens=common_pb2.TokenIds(ids=[101, 30522, 102]))]),
        INVALID, ["input 0", "30522", "from 0 to 30521"]),
    "no token ids": (dict(inputs=[common_pb2.Input(tokens=common_pb2.TokenIds())]), INVALID,
                     ["input 0 has no token ids"]),
    "image to a text model": (
        dict(inputs=[common_pb2.Input(image=common_pb2.Image(data=b"\x89PNG"))]), INVALID,
        ["input 0 is an image", "text only"]),
    "unknown prompt name": (dict(prompt_name="query"), INVALID,
                            ["unknown prompt_name 'query'", "prompts: none"]),
    "prompt and prompt_name": (dict(prompt_name="query", prompt="q: "), INVALID,
                               ["prompt_name or prompt, not both"]),
    "prompt with token ids": (
        dict(inputs=[common_pb2.Input(tokens=common_pb2.TokenIds(ids=[101, 102]))],
             prompt="query: "), INVALID, ["text inputs only"]),
    "truncation beyond the model": (
        dict(truncation=common_pb2.TruncationOptions(max_tokens=1000)), INVALID,
        ["truncation length 1000", "maximum of 256", "(truncation.max_tokens)"]),
    "truncation leaving no room": (
        dict(truncation=common_pb2.TruncationOptions(max_tokens=2)), INVALID,
        ["truncation length 2", "2 special tokens", "(truncation.max_tokens)"]),
    "truncation contradiction": (
        dict(truncation=common_pb2.TruncationOptions(enabled=False, max_tokens=10)), INVALID,
        ["contradicts enabled=false"]),
    "negative truncation": (
        dict(truncation=common_pb2.TruncationOptions(max_tokens=-5)), INVALID,
        ["max_tokens must be positive", "-5"]),
    "unknown truncation side": (
        dict(truncation=common_pb2.TruncationOptions(side=9)), INVALID,
        ["side 9 is not a TruncationSide"]),
    "int8 of unnormalized vectors": (dict(output_dtype=tensor_pb2.DATA_TYPE_INT8, normalize=False),
                                     INVALID, ["output_dtype int8 quantizes normalized",
                                               "quantization_range"]),
    "unknown output dtype": (dict(output_dtype=42), INVALID,
                             ["output_dtype 42 is not a DataType", "DATA_TYPE_UBINARY"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_embed_errors(channel, case):
    fields, code, fragments = CASES[case]
    assert_status(lambda: embed_call(channel, **fields), code, *fragments)


def test_stream_reports_a_bad_request_and_goes_on(channel):
    stub = embed_pb2_grpc.EmbedServiceStub(channel)
    def item(id, **fields):
        fields.setdefault("inputs", [text(id)])
        return embed_pb2.EmbedStreamRequest(id=id, request=embed_pb2.EmbedRequest(**fields))

    requests = [item("good"), item("bad", dimensions=0), item("missing", model="x"),
                item("after")]
    got = {r.id: r for r in stub.EmbedStream(iter(requests), timeout=30)}
    assert got["good"].WhichOneof("result") == "response"
    assert got["after"].WhichOneof("result") == "response"
    assert got["bad"].error.code == INVALID.value[0]
    assert "between 1 and 384" in got["bad"].error.message
    assert got["missing"].error.code == grpc.StatusCode.NOT_FOUND.value[0]


def test_tokenize_errors(channel):
    stub = model_pb2_grpc.ModelServiceStub(channel)
    assert_status(lambda: stub.Tokenize(model_pb2.TokenizeRequest(), timeout=30), INVALID,
                  "no texts")
    assert_status(lambda: stub.Tokenize(model_pb2.TokenizeRequest(texts=[LONG]), timeout=30),
                  INVALID, "302 tokens", "256")
    assert_status(lambda: stub.Tokenize(model_pb2.TokenizeRequest(model="nope", texts=["a"]),
                                        timeout=30), grpc.StatusCode.NOT_FOUND, "'nope'")
    assert_status(lambda: model_pb2_grpc.ModelServiceStub(channel).GetModelInfo(
        model_pb2.GetModelInfoRequest(model="nope"), timeout=30), grpc.StatusCode.NOT_FOUND,
        "served: all-MiniLM-L6-v2")


def test_task_errors_on_an_embedding_model(channel):
    classify = classify_pb2_grpc.ClassifyServiceStub(channel)
    score = score_pb2_grpc.ScoreServiceStub(channel)
    encode = encode_pb2_grpc.EncodeServiceStub(channel)
    docs = [text("a"), text("b"), text("c")]
    cases = [
        (lambda: classify.Classify(classify_pb2.ClassifyRequest(inputs=[text("x")]), timeout=30),
         ["all-MiniLM-L6-v2 (embedding) does not serve classify", "it serves embed, score"]),
        (lambda: score.Score(score_pb2.ScoreRequest(queries=[text("q"), text("r")],
                                                    documents=docs), timeout=30),
         ["cannot pair 2 queries with 3 documents", "1 query and N documents"]),
        (lambda: score.Score(score_pb2.ScoreRequest(documents=docs), timeout=30),
         ["at least one query and one document"]),
        (lambda: score.Score(score_pb2.ScoreRequest(queries=[common_pb2.Input()],
                                                    documents=docs), timeout=30),
         ["query 0 is empty"]),
        (lambda: score.Rerank(score_pb2.RerankRequest(documents=docs), timeout=30),
         ["rerank needs a query"]),
        (lambda: score.Rerank(score_pb2.RerankRequest(query=text("q")), timeout=30),
         ["at least one document"]),
        (lambda: encode.Encode(encode_pb2.EncodeRequest(inputs=[text("x")],
                                                        task=common_pb2.TASK_REWARD), timeout=30),
         ["does not serve reward"]),
        (lambda: encode.Encode(encode_pb2.EncodeRequest(inputs=[text("x")], task=42), timeout=30),
         ["task 42 is not a Task"]),
        (lambda: encode.Encode(encode_pb2.EncodeRequest(inputs=[text("x")],
                                                        task=common_pb2.TASK_SCORE), timeout=30),
         ["Encode does not run score"]),
        (lambda: encode.Encode(encode_pb2.EncodeRequest(inputs=[text("x")], activation=True),
                               timeout=30), ["activation does not apply to token_embed"]),
    ]
    for call, fragments in cases:
        assert_status(call, INVALID, *fragments)
    assert_status(lambda: classify.Classify(classify_pb2.ClassifyRequest(
        model="nope", inputs=[text("x")]), timeout=30), grpc.StatusCode.NOT_FOUND,
        "'nope' is not served")
    stream = list(classify.ClassifyStream(iter([classify_pb2.ClassifyStreamRequest(
        id="1", request=classify_pb2.ClassifyRequest(inputs=[text("x")]))]), timeout=30))
    assert stream[0].id == "1" and stream[0].error.code == INVALID.value[0]
    assert "does not serve classify" in stream[0].error.message


def test_the_status_table():
    assert ERROR_TABLE == {
        errors.InvalidInputError: (INVALID, 400),
        errors.ModelNotFoundError: (grpc.StatusCode.NOT_FOUND, 404),
        errors.AdapterNotFoundError: (grpc.StatusCode.NOT_FOUND, 404),
        errors.TooLargeError: (grpc.StatusCode.RESOURCE_EXHAUSTED, 413),
        errors.OverloadedError: (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
        errors.UnsupportedError: (grpc.StatusCode.UNIMPLEMENTED, 501),
        errors.UnavailableError: (grpc.StatusCode.UNAVAILABLE, 503),
        errors.DeadlineExceededError: (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
    }
    assert STATUS_OF_ERROR[errors.TooLargeError] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert HTTP_STATUS_OF_ERROR[errors.OverloadedError] == 429

    class TooLong(errors.InvalidInputError):
        pass

    assert status_of(TooLong("x")) == (INVALID, "x")
    code, message = status_of(ZeroDivisionError("boom"))
    assert code == grpc.StatusCode.INTERNAL
    assert "boom" not in message and "server log" in message
