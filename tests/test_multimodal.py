"""CLIP and SigLIP: image and text embeddings equal transformers', offline and over gRPC; bad
images get specific statuses."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import zlib

import grpc
import numpy as np
import pytest
import torch
import transformers
from conftest import ROOT, ServerProcess
from PIL import Image
from poolsvc_client import Client, decode_tensor
from test_grpcurl import GRPCURL
from tiny_models import dual_encoder, image_bytes

from poolsvc import LLM, PoolingParams
from poolsvc.engine.errors import InvalidInputError, OverloadedError
from poolsvc.gen.v1 import (
    common_pb2,
    embed_pb2,
    embed_pb2_grpc,
    model_pb2,
    model_pb2_grpc,
    score_pb2,
    score_pb2_grpc,
)

TEXTS = ["a photo of a cat", "A cat is a small feline.", "東京"]
IMAGES = [image_bytes(40, 30, "PNG", 1), image_bytes(64, 64, "JPEG", 2),
          image_bytes(33, 50, "WEBP", 3)]


@pytest.fixture(scope="module", params=["clip", "siglip"])
def family(request):
    return request.param


@pytest.fixture(scope="module")
def checkpoint(family, tmp_path_factory):
    return dual_encoder(tmp_path_factory.mktemp(family), family, seed=7)


def reference(directory, family, texts, images):
    """transformers' get_text_features / get_image_features, preprocessed by the checkpoint's
    processor (SigLIP's text padded to its full length, as it was trained)."""
    cls = transformers.CLIPModel if family == "clip" else transformers.SiglipModel
    model = cls.from_pretrained(directory).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    processor = transformers.AutoImageProcessor.from_pretrained(directory)
    with torch.no_grad():
        if family == "clip":
            enc = tokenizer(texts, padding=True, return_tensors="pt")
            text = model.get_text_features(**enc)
        else:
            enc = tokenizer(texts, padding="max_length", max_length=64, return_tensors="pt")
            text = model.get_text_features(input_ids=enc["input_ids"])
        pixels = processor(images=[Image.open(io.BytesIO(b)) .convert("RGB") for b in images],
                           return_tensors="pt")["pixel_values"]
        image = model.get_image_features(pixel_values=pixels)
    as_tensor = [t if isinstance(t, torch.Tensor) else t.pooler_output for t in (text, image)]
    return as_tensor[0], as_tensor[1], model


def test_offline_matches_transformers(checkpoint, family):
    text, image, _ = reference(checkpoint, family, TEXTS, IMAGES)
    mixed = [{"image": IMAGES[0]}, TEXTS[0], {"image": Image.open(io.BytesIO(IMAGES[1]))},
             TEXTS[1], TEXTS[2], {"image": IMAGES[2], "mime_type": "image/webp"}]
    want = torch.stack([image[0], text[0], image[1], text[1], text[2], image[2]])
    with LLM(str(checkpoint), device="cpu", threads=2) as llm:
        raw = np.array([o.outputs.embedding for o in llm.embed(mixed,
                                                               PoolingParams(normalize=False))])
        normed = np.array([o.outputs.embedding for o in llm.embed(mixed)])
        assert llm.engine.model("").modalities == ("text", "image")
    assert np.abs(raw - want.numpy()).max() <= 1e-4
    want_normed = torch.nn.functional.normalize(want, dim=-1).numpy()
    assert np.abs(normed - want_normed).max() <= 1e-4


def test_text_to_image_scores_and_logits(checkpoint, family):
    _, _, model = reference(checkpoint, family, TEXTS, IMAGES)
    with LLM(str(checkpoint), device="cpu", threads=2) as llm:
        cosine = [o.outputs.score for o in llm.score(TEXTS[0], [{"image": b} for b in IMAGES])]
        logits = [o.outputs.score for o in llm.score(TEXTS[0], [{"image": b} for b in IMAGES],
                                                     PoolingParams(activation=False))]
    text, image, _ = reference(checkpoint, family, TEXTS[:1], IMAGES)
    want = torch.nn.functional.cosine_similarity(text, image).numpy()
    np.testing.assert_allclose(cosine, want, atol=1e-5)
    bias = float(model.logit_bias) if family == "siglip" else 0.0
    np.testing.assert_allclose(logits, want * float(model.logit_scale.exp()) + bias, atol=1e-4)


def test_over_grpc(checkpoint, family, tmp_path):
    srv = ServerProcess(tmp_path / "server.log", "--model", f"{family}={checkpoint}",
                        "--max-image-pixels", "100000", "--max-image-bytes", "200000"
                        ).wait_ready()
    text, image, _ = reference(checkpoint, family, TEXTS, IMAGES)
    try:
        with grpc.insecure_channel(srv.address) as channel:
            info = model_pb2_grpc.ModelServiceStub(channel).GetModelInfo(
                model_pb2.GetModelInfoRequest())
            assert list(info.info.modalities) == [common_pb2.MODALITY_TEXT,
                                                  common_pb2.MODALITY_IMAGE]
            stub = embed_pb2_grpc.EmbedServiceStub(channel)
            inputs = [common_pb2.Input(image=common_pb2.Image(data=IMAGES[2])),
                      common_pb2.Input(text=TEXTS[1]),
                      common_pb2.Input(image=common_pb2.Image(data=IMAGES[0],
                                                              mime_type="image/png"))]
            reply = stub.Embed(embed_pb2.EmbedRequest(inputs=inputs, normalize=False), timeout=60)
            want = torch.stack([image[2], text[1], image[0]]).numpy()
            assert np.abs(decode_tensor(reply.embeddings) - want).max() <= 1e-4
            scores = score_pb2_grpc.ScoreServiceStub(channel).Score(score_pb2.ScoreRequest(
                queries=[common_pb2.Input(text=TEXTS[0])], documents=inputs[::2]), timeout=60)
            want = torch.nn.functional.cosine_similarity(
                text[:1], torch.stack([image[2], image[0]])).numpy()
            np.testing.assert_allclose(decode_tensor(scores.scores), want, atol=1e-5)
            for data, mime, code, fragment in BAD_IMAGES:
                request = embed_pb2.EmbedRequest(inputs=[
                    common_pb2.Input(text="fine"),
                    common_pb2.Input(image=common_pb2.Image(data=data, mime_type=mime))])
                with pytest.raises(grpc.RpcError) as err:
                    stub.Embed(request, timeout=60)
                assert err.value.code() == code, err.value.details()
                assert "input 1" in err.value.details() and fragment in err.value.details()
            assert list(stub.Embed(embed_pb2.EmbedRequest(inputs=inputs), timeout=60)
                        .embeddings.shape)[0] == 3  # still serving
        picture = tmp_path / "picture.jpg"
        picture.write_bytes(IMAGES[1])
        env = {**os.environ, "ADDR": srv.address, "GRPCURL": GRPCURL, "MODEL": family,
               "IMAGE": str(picture)}
        done = subprocess.run(["bash", str(ROOT / "clients/grpcurl/images.sh")], env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        assert '"MODALITY_IMAGE"' in done.stdout and '"2",' in done.stdout
        with Client(srv.address) as client:  # the Python client: an image from a file
            vectors = client.embed([picture.read_bytes(), "a photo of a cat"], model=family,
                                   normalize=False)
        assert np.abs(vectors[0] - image[1].numpy()).max() <= 1e-4
    finally:
        assert srv.terminate() == 0


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb() -> bytes:
    """A valid PNG header claiming 100000 x 100000 pixels: a few hundred bytes of zlib could
    inflate to 30 GB."""
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    body = zlib.compress(b"\0" * 300_001)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", body)
            + _png_chunk(b"IEND", b""))


INVALID, EXHAUSTED = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED
BAD_IMAGES = [
    (b"definitely not an image", "", INVALID, "not a PNG, JPEG or WebP"),
    (IMAGES[0][: len(IMAGES[0]) // 2], "", INVALID, "corrupt or truncated"),
    (IMAGES[1], "image/png", INVALID, "labelled image/png but its bytes are JPEG"),
    (IMAGES[0], "image/gif", INVALID, "supported: image/png"),
    (image_bytes(500, 400, "PNG", 9), "", EXHAUSTED, "--max-image-bytes"),
    (image_bytes(400, 300, "JPEG", 9), "", EXHAUSTED, "400x300 image"),
    (bomb(), "", EXHAUSTED, "decompression bomb"),
    (b"", "", INVALID, "empty image"),
]


def test_bad_images_offline(checkpoint):
    with LLM(str(checkpoint), device="cpu", threads=2, max_image_pixels=100_000,
             max_image_bytes=200_000) as llm:
        for data, mime, code, fragment in BAD_IMAGES:
            error = InvalidInputError if code == INVALID else OverloadedError
            with pytest.raises(error, match=fragment.replace("(", r"\\(")):
                llm.embed(["fine", {"image": data, "mime_type": mime}])


def test_images_to_a_text_model(llm):
    with pytest.raises(InvalidInputError, match="input 1 is an image, but model all-MiniLM-L6-v2 "
                                                "accepts text only"):
        llm.embed(["text", {"image": IMAGES[0]}])
