"""Turning a finished request's pooled rows into its output, per task (runs on the host)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from poolsvc.engine.outputs import ClassifyOutput, EmbedOutput, EncodeOutput, ScoreOutput, to_numpy
from poolsvc.engine.pooling import activate, finish_embeddings
from poolsvc.engine.request import Request, now_ns


def _common(req: Request) -> dict:
    return dict(model=req.model.name, token_ids=req.token_ids, timing=req.timing(now_ns()))


def finish_embed(req: Request) -> EmbedOutput:
    plan = req.plan
    vectors = finish_embeddings(torch.stack(req.rows), plan.dimensions, plan.normalize)
    return EmbedOutput(embeddings=to_numpy(vectors, plan.out_dtype), dtype=plan.out_dtype,
                       **_common(req))


def finish_classify(req: Request) -> ClassifyOutput:
    plan = req.plan
    probs = activate(torch.stack(req.rows), plan.activation)  # [num_inputs, num_labels]
    return ClassifyOutput(probs=to_numpy(probs, plan.out_dtype), dtype=plan.out_dtype,
                          labels=req.model.labels, **_common(req))


def finish_cross_score(req: Request) -> ScoreOutput:
    logits = torch.stack(req.rows)[:, 0]  # one label: [num_pairs]
    return ScoreOutput(scores=activate(logits, req.plan.activation).numpy(), **_common(req))


def finish_cosine_score(req: Request) -> ScoreOutput:
    """Bi-encoder: the cosine of the two embeddings of each pair, in float32."""
    vectors = torch.stack(req.rows)
    queries, documents = zip(*req.plan.pairs)
    scores = F.cosine_similarity(vectors[list(queries)], vectors[list(documents)], dim=-1)
    if req.plan.logit is not None:
        scale, bias = req.plan.logit
        scores = scores * scale + bias
    common = _common(req)
    common["token_ids"] = [req.token_ids[q] + req.token_ids[d] for q, d in req.plan.pairs]
    return ScoreOutput(scores=scores.numpy(), **common)


def finish_encode(req: Request) -> EncodeOutput:
    plan = req.plan
    outputs = []
    for rows in req.rows:
        if plan.returned_token_ids is not None:
            rows = rows[..., list(plan.returned_token_ids)]
        if plan.normalize:
            rows = F.normalize(rows, p=2.0, dim=-1)
        outputs.append(to_numpy(activate(rows, plan.activation), plan.out_dtype))
    return EncodeOutput(task=plan.task, outputs=outputs, dtype=plan.out_dtype, **_common(req))
