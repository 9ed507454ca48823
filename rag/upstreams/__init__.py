"""Models on remote OpenAI-compatible servers (vLLM, SGLang, llama-server, TEI, this appliance).

Generation (`rag serve --upstream`):
    config.py       UpstreamSpec (--upstream URL,model=..,key=..), RouterConfig (one per router)
    tokenizer.py    the local tokenizer and chat template: prompts become token ids here
    wire.py         GenerationRequest -> /v1/completions body; SSE chunks -> GenerationChunks
    client.py       one upstream over HTTP (httpx, async): stream a completion, probe /health
    ring.py         prefix keys, the consistent-hash ring and the bounded-load choice
    health.py       one upstream's health state machine: up, or down until a probe succeeds
    pool.py         the upstreams of one model: pick, send, fail over, restart non-streamed
                    answers, probe (an I/O thread)
    backend.py      RemoteBackend: a GenerationBackend over the pool (one upstream or a router)
    metrics.py      per-upstream Prometheus metrics

Query embeddings and rerank (`--embedder-url`, `--reranker-url`):
    json_client.py  sync JSON calls to one server, retried with backoff
    embeddings.py   RemoteEmbedder: ingest's TextEmbedder over /v1/embeddings
    rerank.py       RemoteReranker: rag.reranking.Reranker over /v1/rerank

Ignores: ingest and the index, the RAG path (local), HTTP routes.
"""
