"""Generation on remote OpenAI-compatible upstreams (vLLM, SGLang, llama-server, this appliance).

    config.py     UpstreamSpec (--upstream URL,model=..,key=..), RouterConfig (one per router)
    tokenizer.py  the local tokenizer and chat template: prompts become token ids here
    wire.py       GenerationRequest -> /v1/completions body; SSE chunks -> GenerationChunks
    client.py     one upstream over HTTP (httpx, async): stream a completion, probe /health
    ring.py       prefix keys, the consistent-hash ring and the bounded-load choice
    health.py     one upstream's health state machine: up, or down until a probe succeeds
    pool.py       the upstreams of one model: pick, send, fail over, probe (an I/O thread)
    backend.py    RemoteBackend: a GenerationBackend over the pool (one upstream or a router)
    metrics.py    per-upstream Prometheus metrics

Ignores: embeddings and rerank (local), the RAG path and the index (local), HTTP routes.
"""
