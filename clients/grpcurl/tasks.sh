#!/usr/bin/env bash
# grpcurl for every pooling task, against a server holding an embedder (the default model), a
# classifier, a cross-encoder reranker and a reward model, e.g.
#   poolsvc serve --model bundled:all-MiniLM-L6-v2 --model clf=/models/classifier \
#     --model rerank=/models/bge-reranker-v2-m3 --model rm=/models/Qwen2.5-Math-RM-72B
#   ADDR=127.0.0.1:50051 CLASSIFIER=clf RERANKER=rerank REWARD=rm bash clients/grpcurl/tasks.sh
# CI runs this file against such a server (tests/test_tasks_grpc.py).
set -euo pipefail
ADDR=${ADDR:-127.0.0.1:50051}
GRPCURL=${GRPCURL:-grpcurl}
CLASSIFIER=${CLASSIFIER:-clf}
RERANKER=${RERANKER:-rerank}
REWARD=${REWARD:-rm}

echo "## classify: probabilities [N, num_labels] and the label names"
$GRPCURL -plaintext -d "{\"model\": \"$CLASSIFIER\", \"inputs\": [{\"text\": \"I love it\"}, {\"text\": \"meh\"}]}" \
  "$ADDR" poolsvc.v1.ClassifyService/Classify

echo "## classify without the activation: raw logits"
$GRPCURL -plaintext -d "{\"model\": \"$CLASSIFIER\", \"inputs\": [{\"text\": \"I love it\"}], \"activation\": false}" \
  "$ADDR" poolsvc.v1.ClassifyService/Classify

echo "## score one query against two documents with the cross-encoder"
$GRPCURL -plaintext -d "{\"model\": \"$RERANKER\", \"queries\": [{\"text\": \"capital of France\"}],
    \"documents\": [{\"text\": \"Paris is the capital of France.\"}, {\"text\": \"Cats purr.\"}]}" \
  "$ADDR" poolsvc.v1.ScoreService/Score

echo "## score with the embedding model: cosine similarity"
$GRPCURL -plaintext -d '{"queries": [{"text": "capital of France"}],
    "documents": [{"text": "Paris is the capital of France."}, {"text": "Cats purr."}]}' \
  "$ADDR" poolsvc.v1.ScoreService/Score

echo "## rerank: best first, with the original index and the text"
$GRPCURL -plaintext -d "{\"model\": \"$RERANKER\", \"query\": {\"text\": \"capital of France\"},
    \"documents\": [{\"text\": \"Cats purr.\"}, {\"text\": \"Paris is the capital of France.\"}, {\"text\": \"Rome is in Italy.\"}],
    \"top_n\": 2, \"return_documents\": true}" \
  "$ADDR" poolsvc.v1.ScoreService/Rerank

echo "## encode: a reward per token"
$GRPCURL -plaintext -d "{\"model\": \"$REWARD\", \"inputs\": [{\"text\": \"Step 1: 2 + 2 = 4.\"}]}" \
  "$ADDR" poolsvc.v1.EncodeService/Encode

echo "## encode: the embedding model's per-token hidden states, as float16"
$GRPCURL -plaintext -d '{"inputs": [{"text": "per-token vectors"}], "task": "TASK_TOKEN_EMBED", "output_dtype": "DATA_TYPE_FLOAT16"}' \
  "$ADDR" poolsvc.v1.EncodeService/Encode
