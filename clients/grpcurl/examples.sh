#!/usr/bin/env bash
# grpcurl against a running poolsvc, through server reflection (no .proto files needed).
#   ADDR=127.0.0.1:50051 bash clients/grpcurl/examples.sh
# CI runs this file against a live server (tests/test_grpcurl.py).
set -euo pipefail
ADDR=${ADDR:-127.0.0.1:50051}
GRPCURL=${GRPCURL:-grpcurl}

echo "## services"
$GRPCURL -plaintext "$ADDR" list

echo "## what an Embed request holds"
$GRPCURL -plaintext "$ADDR" describe poolsvc.v1.EmbedRequest

echo "## health: the whole server, then one service"
$GRPCURL -plaintext "$ADDR" grpc.health.v1.Health/Check
$GRPCURL -plaintext -d '{"service": "poolsvc.v1.EmbedService"}' "$ADDR" grpc.health.v1.Health/Check

echo "## served models"
$GRPCURL -plaintext "$ADDR" poolsvc.v1.ModelService/ListModels

echo "## embed two texts: the [2, 384] float32 tensor comes back as base64 bytes"
$GRPCURL -plaintext -d '{"inputs": [{"text": "Hello, my name is"}, {"text": "poolsvc speaks gRPC"}]}' \
  "$ADDR" poolsvc.v1.EmbedService/Embed

echo "## Matryoshka: 64 dimensions, float16, truncating long inputs from the left"
$GRPCURL -plaintext -d '{
    "inputs": [{"text": "a long document ..."}],
    "dimensions": 64,
    "output_dtype": "DATA_TYPE_FLOAT16",
    "truncation": {"enabled": true, "side": "TRUNCATION_SIDE_LEFT"}
  }' "$ADDR" poolsvc.v1.EmbedService/Embed

echo "## tokenize, with token strings and character offsets"
$GRPCURL -plaintext -d '{"texts": ["Hello, world"], "return_tokens": true, "return_offsets": true}' \
  "$ADDR" poolsvc.v1.ModelService/Tokenize

echo "## pre-tokenized input (ids from Tokenize)"
$GRPCURL -plaintext -d '{"inputs": [{"tokens": {"ids": [101, 7592, 1010, 2088, 102]}}]}' \
  "$ADDR" poolsvc.v1.EmbedService/Embed

echo "## a stream of two requests, answered by id"
$GRPCURL -plaintext -d '{"id": "q1", "request": {"inputs": [{"text": "first"}]}}
{"id": "q2", "request": {"inputs": [{"text": "second"}]}}' "$ADDR" poolsvc.v1.EmbedService/EmbedStream
