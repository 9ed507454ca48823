"""The FastAPI app: routers, error shapes, and the middleware stack around them.

request -> access log + metrics -> body size limit -> API key -> CORS -> routes
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi

from rag.server import (
    routes_anthropic,
    routes_documents,
    routes_embeddings,
    routes_openai,
    routes_ops,
    routes_rag,
    routes_rerank,
    web,
)
from rag.server.access_log import AccessLogMiddleware
from rag.server.auth import APIKeyMiddleware
from rag.server.errors import install_error_handlers
from rag.server.limits import BodySizeLimitMiddleware
from rag.server.services import Services
from rag.server.settings import ServerSettings

API_VERSION = "0.1.0"


def create_app(
    services: Services, settings: ServerSettings | None = None, *, owns_services: bool = False
) -> FastAPI:
    """The app over `services`; with owns_services, shutting the app down closes them."""
    settings = settings or ServerSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        routes_documents.resume_uploads(app)  # a killed server's unfinished uploads
        yield
        if owns_services:  # flush and stop the engines before the process exits
            services.close()

    app = FastAPI(
        lifespan=lifespan,
        title="MLX RAG appliance",
        version=API_VERSION,
        description="OpenAI- and Anthropic-compatible local inference, embeddings, rerank and RAG.",
    )
    app.state.services = services
    app.state.settings = settings
    install_error_handlers(app)
    for module in (
        routes_ops,
        routes_openai,
        routes_anthropic,
        routes_embeddings,
        routes_rerank,
        routes_rag,
        routes_documents,
        web,
    ):
        app.include_router(module.router)

    app.openapi = lambda: _openapi_schema(app)  # type: ignore[method-assign]

    # Added innermost first: the last one added sees the request first.
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["authorization", "x-api-key", "content-type", "anthropic-version"],
        )
    app.add_middleware(APIKeyMiddleware, keys=settings.api_keys)
    app.add_middleware(
        BodySizeLimitMiddleware,
        max_request_bytes=settings.max_request_bytes,
        max_upload_bytes=settings.max_upload_bytes,
    )
    assert services.metrics is not None
    app.add_middleware(AccessLogMiddleware, metrics=services.metrics)
    return app


_ERROR_SCHEMA = {
    "type": "object",
    "description": "OpenAI's error shape ({error: {message, type, param, code}}); Anthropic's "
    "({type: 'error', error: {type, message}}) under /v1/messages",
}


def _openapi_schema(app: FastAPI) -> dict:
    """FastAPI's schema, with validation failures documented as what errors.py sends: a 400."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                responses = operation.get("responses", {})
                if responses.pop("422", None) is not None:
                    responses["400"] = {
                        "description": "Invalid request",
                        "content": {"application/json": {"schema": _ERROR_SCHEMA}},
                    }
        schema.get("components", {}).get("schemas", {}).pop("HTTPValidationError", None)
        schema.get("components", {}).get("schemas", {}).pop("ValidationError", None)
        app.openapi_schema = schema
    return app.openapi_schema
