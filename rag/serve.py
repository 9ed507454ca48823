"""`rag serve`: load the models once, then answer HTTP on 127.0.0.1:8000 until stopped.

With `--upstream URL` (repeatable) generation goes to OpenAI-compatible servers instead of a
local MLX engine (rag.upstreams); `--embedder-url` and `--reranker-url` do the same for query
embeddings and rerank. Ingest, the index and the RAG path stay here.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from inference.chat_model import ModelNotFoundError
from inference.engine import EngineConfig
from inference.model_pool import PoolConfig

from rag.server.settings import DEFAULT_HOST, DEFAULT_PORT, ServerSettings
from rag.upstreams.config import ROUTING_POLICIES, RouterConfig, UpstreamSpec, parse_upstream

if TYPE_CHECKING:
    from rag.server.loading import LoadOptions

GiB = 1024**3
API_KEYS_ENV = "RAG_API_KEYS"  # comma-separated; an env var keeps keys out of `ps` output

log = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    defaults = EngineConfig()
    parser = subparsers.add_parser(
        "serve",
        help="serve the OpenAI/Anthropic-compatible API and the document Q&A page",
        description="Load the chat model, the embedder and the index, then serve "
        "/v1/chat/completions, /v1/messages, /v1/embeddings, /v1/rerank, the RAG routes and the "
        "web page at /.",
    )
    parser.add_argument(
        "--host", default=DEFAULT_HOST, help="address to bind (default: %(default)s)"
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="(default: %(default)s)")
    parser.add_argument(
        "--model", help="chat model: a folder, a .gguf, or a name in $RAG_MODEL_DIR"
    )
    parser.add_argument("--embedder", type=Path, help="embedding model folder (default: packaged)")
    parser.add_argument("--reranker", type=Path, help="cross-encoder folder (BERT / XLM-R)")
    parser.add_argument("--db", type=Path, help="index file (default: $RAG_DATA_DIR/index.sqlite3)")
    parser.add_argument(
        "--max-num-seqs",
        type=int,
        default=defaults.max_num_seqs,
        help="requests decoding at once (default: %(default)s)",
    )
    parser.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=defaults.max_num_batched_tokens,
        help="tokens per engine step, the prefill chunk (default: %(default)s)",
    )
    parser.add_argument("--max-model-len", type=int, help="context limit (default: the model's)")
    parser.add_argument(
        "--prefix-cache-ram-gb",
        type=float,
        default=defaults.prefix_cache_ram_bytes / GiB,
        help="RAM for cached prompt prefixes per model, 0 turns the cache off (default: %(default)s)",
    )
    parser.add_argument(
        "--prefix-cache-ssd-gb",
        type=float,
        default=defaults.prefix_cache_ssd_bytes / GiB,
        help="disk for prefixes spilled to SSD, kept across restarts; 0: RAM only "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--prefix-cache-block-size",
        type=int,
        default=defaults.prefix_cache_block_size,
        help="tokens per cached block (default: %(default)s)",
    )
    parser.add_argument(
        "--prefix-cache-dir",
        type=Path,
        help="where SSD blocks live (default: $RAG_DATA_DIR/kv-cache)",
    )
    parser.add_argument(
        "--mtp",
        choices=MTP_MODES,
        default="auto",
        help="speculative decoding with the model's draft head for a lone user: auto (the depth "
        "`rag tune` chose, else adaptive), adaptive, a fixed depth 1-3, or off (default: auto)",
    )
    parser.add_argument(
        "--mtp-max-requests",
        type=int,
        default=defaults.mtp_max_requests,
        help="the MTP lane runs while the engine holds at most this many requests "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--memory-limit-gb",
        type=float,
        help="chat models loaded at once must fit in this (default: RAM minus 8 GB)",
    )
    parser.add_argument(
        "--pin",
        action="append",
        default=[],
        metavar="MODEL",
        help="also keep MODEL loaded from the start (repeatable; --model is always pinned)",
    )
    parser.add_argument(
        "--idle-ttl",
        type=float,
        metavar="SECONDS",
        help="unload an unpinned model unused this long (default: only when room is needed)",
    )
    parser.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="allow browser calls from ORIGIN (repeatable; default: CORS off)",
    )
    parser.add_argument("--log-json", action="store_true", help="one JSON object per log line")
    _add_upstream_arguments(parser)
    parser.set_defaults(run=run)


def _add_upstream_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = RouterConfig()
    group = parser.add_argument_group(
        "remote models",
        "send generation, query embeddings and rerank to OpenAI-compatible servers (vLLM, "
        "SGLang, llama-server, TEI, another rag serve) instead of loading local models",
    )
    group.add_argument(
        "--upstream",
        action="append",
        default=[],
        type=_upstream,
        metavar="URL[,model=NAME][,key=KEY|,key_env=VAR]",
        help="an upstream serving the chat model (repeatable; all serve the same model)",
    )
    group.add_argument(
        "--upstream-policy",
        choices=ROUTING_POLICIES,
        default=defaults.policy,
        help="affinity: same prompt prefix, same upstream (its prefix cache hits); "
        "round_robin: in turn (default: %(default)s)",
    )
    group.add_argument(
        "--upstream-tokenizer",
        type=Path,
        help="local folder with the upstreams' model tokenizer and chat template "
        "(default: the folder --model resolves to)",
    )
    group.add_argument(
        "--upstream-affinity-tokens",
        type=int,
        default=defaults.affinity_tokens,
        help="prompts sharing this many first tokens share an upstream (default: %(default)s)",
    )
    group.add_argument(
        "--upstream-max-model-len",
        type=int,
        help="context length (default: what the upstreams report in /v1/models)",
    )
    group.add_argument(
        "--embedder-url",
        type=_upstream,
        metavar="URL[,model=NAME][,key=KEY|,key_env=VAR]",
        help="embed queries on this server's /v1/embeddings instead of --embedder; its model "
        "must be the one the index was built with (checked at start-up)",
    )
    group.add_argument(
        "--reranker-url",
        type=_upstream,
        metavar="URL[,model=NAME][,key=KEY|,key_env=VAR]",
        help="rerank on this server's /v1/rerank instead of --reranker",
    )


def _upstream(text: str) -> UpstreamSpec:
    try:
        return parse_upstream(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def settings_from(args: argparse.Namespace) -> ServerSettings:
    keys = tuple(k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip())
    return ServerSettings(
        host=args.host, port=args.port, api_keys=keys, cors_origins=tuple(args.cors_origin)
    )


MTP_MODES = ("auto", "adaptive", "off", "1", "2", "3")


def _mtp_settings(mode: str) -> dict[str, object]:
    """--mtp as EngineConfig fields: on/off, a fixed depth, and whether `rag tune` may choose."""
    if mode == "off":
        return {"mtp": False}
    if mode in ("auto", "adaptive"):
        return {"mtp": True, "mtp_depth": None, "mtp_tuned": mode == "auto"}
    return {"mtp": True, "mtp_depth": int(mode), "mtp_tuned": False}


def load_options_from(args: argparse.Namespace) -> LoadOptions:
    """The parsed flags as what loading.py loads; ValueError for values out of range."""
    from rag.server.loading import LoadOptions

    engine = EngineConfig(
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        prefix_cache_ram_bytes=int(args.prefix_cache_ram_gb * GiB),
        prefix_cache_ssd_bytes=int(args.prefix_cache_ssd_gb * GiB),
        prefix_cache_block_size=args.prefix_cache_block_size,
        prefix_cache_dir=args.prefix_cache_dir,
        mtp_max_requests=args.mtp_max_requests,
        **_mtp_settings(args.mtp),
    )
    pool = PoolConfig(
        memory_limit_bytes=None
        if args.memory_limit_gb is None
        else int(args.memory_limit_gb * GiB),
        pinned=tuple(args.pin),
        idle_ttl_s=args.idle_ttl,
    )
    return LoadOptions(
        pool=pool,
        model=args.model,
        embedder=args.embedder,
        reranker=args.reranker,
        index_path=args.db,
        engine=engine,
        upstreams=tuple(args.upstream),
        router=RouterConfig(
            policy=args.upstream_policy,
            affinity_tokens=args.upstream_affinity_tokens,
            max_model_len=args.upstream_max_model_len,
        ),
        upstream_tokenizer=args.upstream_tokenizer,
        embedder_url=args.embedder_url,
        reranker_url=args.reranker_url,
    )


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from rag.server.app import create_app
    from rag.server.loading import load_services
    from rag.server.log_format import configure_logging

    configure_logging(json_lines=args.log_json, verbose=args.verbose)
    try:
        settings = settings_from(args)
        services = load_services(load_options_from(args))
    except (ValueError, ModelNotFoundError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_keys:
        log.warning("serving on %s without API keys: set %s", settings.host, API_KEYS_ENV)
    app = create_app(services, settings, owns_services=True)
    print(f"serving on http://{settings.host}:{settings.port}  (Ctrl-C stops)", file=sys.stderr)
    # uvicorn stops on SIGINT/SIGTERM, runs the app's shutdown (which closes the models), then
    # exits by the same signal, as a service manager expects.
    uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, access_log=False)
    return 0
