#!/usr/bin/env bash
# Images with grpcurl, against a server holding a CLIP or SigLIP model, e.g.
#   poolsvc serve --model clip=/models/clip-vit-base-patch32
#   ADDR=127.0.0.1:50051 MODEL=clip IMAGE=cat.jpg bash clients/grpcurl/images.sh
# Image bytes travel base64-encoded in grpcurl's JSON. CI runs this file (tests/test_multimodal.py).
set -euo pipefail
ADDR=${ADDR:-127.0.0.1:50051}
GRPCURL=${GRPCURL:-grpcurl}
MODEL=${MODEL:-clip}
IMAGE=${IMAGE:?set IMAGE to a PNG, JPEG or WebP file}
DATA=$(base64 -w0 "$IMAGE")

echo "## the model's modalities"
$GRPCURL -plaintext -d "{\"model\": \"$MODEL\"}" "$ADDR" poolsvc.v1.ModelService/GetModelInfo

echo "## an image and a text in one batch: one [2, D] tensor, in input order"
$GRPCURL -plaintext -d @ "$ADDR" poolsvc.v1.EmbedService/Embed <<JSON
{"model": "$MODEL", "inputs": [{"image": {"data": "$DATA"}}, {"text": "a photo of a cat"}]}
JSON

echo "## how well two captions match the image (cosine)"
$GRPCURL -plaintext -d @ "$ADDR" poolsvc.v1.ScoreService/Score <<JSON
{"model": "$MODEL", "queries": [{"image": {"data": "$DATA"}}],
 "documents": [{"text": "a photo of a cat"}, {"text": "a photo of a dog"}]}
JSON
