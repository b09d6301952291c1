"""HTTP/JSON routes beside gRPC, in the same process, on the same engine and event loop:
OpenAI's embeddings API (openai.py), vLLM's pooling routes (vllm.py) and Cohere's v2 embed and
rerank (cohere.py). Like poolsvc/service, this package never imports torch: handlers build the
engine's PoolingRequest and run it through the one admission path (service/admitted.py); errors
map through the one table (service/status.py)."""
