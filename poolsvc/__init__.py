"""poolsvc: a gRPC server for pooling models (embeddings, classification, scoring, rewards)."""

__version__ = "0.1.0"

# The offline API, by vLLM's names. It pulls in torch, so it is imported on first use:
# `import poolsvc` (the client, the stubs) must not.
_OFFLINE = ("LLM", "LoRARequest", "PoolingParams", "PoolingOutput", "EmbeddingOutput",
            "ClassificationOutput", "ScoringOutput", "PoolingRequestOutput",
            "EmbeddingRequestOutput", "ClassificationRequestOutput", "ScoringRequestOutput")


def __getattr__(name: str):
    if name in _OFFLINE:
        from poolsvc.engine import llm
        return getattr(llm, name)
    raise AttributeError(f"module 'poolsvc' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_OFFLINE])
