"""The HTTP server (`rag serve`): OpenAI, Anthropic, embeddings, rerank and RAG routes on FastAPI.

FastAPI and pydantic are imported only under this package. `app.create_app(services, settings)`
builds the app from already-loaded models (`services.Services`), so tests hand it tiny random
models and `rag serve` hands it the real ones.
"""
