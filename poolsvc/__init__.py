"""poolsvc: a gRPC server for pooling models (embeddings, classification, scoring, rewards)."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # The offline API pulls in torch; `import poolsvc` (the client, the stubs) must not.
    if name == "LLM":
        from poolsvc.engine.llm import LLM
        return LLM
    if name == "PoolingParams":
        from poolsvc.engine.params import PoolingParams
        return PoolingParams
    raise AttributeError(f"module 'poolsvc' has no attribute {name!r}")
