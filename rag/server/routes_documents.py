"""Document management: upload and ingest, job progress, the library, chunks, delete.

    POST   /v1/documents                 multipart files -> 202 {ingest job}
    GET    /v1/documents/jobs/{job_id}   progress: files done / total, chunks, failures
    GET    /v1/documents                 the library: documents with chunk counts, size, time
    GET    /v1/documents/{id}            one document
    GET    /v1/documents/{id}/chunks     its chunks in order (text, page, heading)
    DELETE /v1/documents/{id}            remove it with its chunks and vectors (and its upload)
    GET    /v1/chunks/{chunk_id}         one chunk with its document: the citation view

Reads and deletes run on the encoder thread with its store (library.py); ingest runs on the
ingest worker (ingest_jobs.py). The body size limit for uploads is the middleware's.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from pathlib import Path

from inference.paths import data_dir

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile

from ingest.records import ChunkInfo, DocumentInfo
from rag.server.errors import APIError
from rag.server.ingest_jobs import IngestJob, IngestJobs
from rag.server.library import (
    check_embedder,
    heading_of,
    index_path_of,
    index_store,
)
from rag.server.services import Services

router = APIRouter()
UPLOADS_DIRNAME = "uploads"


def services_of(request: Request) -> Services:
    return request.app.state.services


def jobs_for(app: FastAPI) -> IngestJobs:
    """The app's upload jobs, made on first use (uploads go under the data dir of that moment)."""
    state = app.state
    jobs = getattr(state, "ingest_jobs", None)
    if jobs is None:
        jobs = state.ingest_jobs = IngestJobs(state.services, data_dir() / UPLOADS_DIRNAME)
    return jobs


def jobs_of(request: Request) -> IngestJobs:
    return jobs_for(request.app)


def resume_uploads(app: FastAPI) -> IngestJob | None:
    """At start-up: ingest uploads a killed server saved but did not finish indexing."""
    services: Services = app.state.services
    if services.embedder is None or services.index_path is None:
        return None
    return jobs_for(app).resume_pending()


def document_json(document: DocumentInfo, jobs: IngestJobs | None = None) -> dict:
    return {
        "object": "document",
        **asdict(document),
        "name": Path(document.path).name,
        "uploaded": jobs is not None and jobs.is_upload(document.path),
    }


def chunk_json(chunk: ChunkInfo) -> dict:
    data = asdict(chunk)
    data["heading_path"] = list(chunk.heading_path)
    return {"object": "chunk", **data, "heading": heading_of(chunk)}


def _not_found(what: str, key: int | str) -> APIError:
    return APIError(404, f"no {what} with id {key}", code=f"{what}_not_found")


# -- upload and jobs ---------------------------------------------------------------------------


def _check_can_ingest(services: Services) -> None:
    """On the encoder thread: the embedder exists and matches an existing index."""
    services.require_embedder()
    store = index_store(services)
    if store is not None:
        check_embedder(services, store)


# The form is read by hand (any field name, any number of files); this documents it.
_UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {
                    "files": {"type": "array", "items": {"type": "string", "format": "binary"}}
                },
                "required": ["files"],
            }
        }
    },
}


@router.post("/v1/documents", status_code=202, openapi_extra={"requestBody": _UPLOAD_BODY})
async def upload_documents(request: Request) -> JSONResponse:
    services = services_of(request)
    index_path_of(services)
    await services.encoder.run(_check_can_ingest, services)
    form = await request.form()
    try:
        uploads = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        if not uploads:
            raise APIError(
                400,
                "no files in the upload: send multipart/form-data with one or more file parts",
                param="files",
            )
        jobs = jobs_of(request)
        reports = jobs.accept([upload.filename or "" for upload in uploads])
        for report, upload in zip(reports, uploads, strict=True):
            if report.status == "queued":
                await asyncio.to_thread(jobs.save, report, upload.file)
        job = jobs.submit(reports)
    finally:
        await form.close()
    snapshot = jobs.snapshot(job.id)
    headers = {"Location": f"/v1/documents/jobs/{job.id}"}
    return JSONResponse(snapshot, status_code=202, headers=headers)


@router.get("/v1/documents/jobs/{job_id}")
async def ingest_job(job_id: str, request: Request) -> dict:
    snapshot = jobs_of(request).snapshot(job_id)
    if snapshot is None:
        raise APIError(404, f"no ingest job with id {job_id}", code="job_not_found")
    return snapshot


# -- the library -------------------------------------------------------------------------------


def _list(services: Services) -> tuple[list[DocumentInfo], tuple[str, int] | None]:
    store = index_store(services)
    if store is None:
        return [], None
    return store.list_documents(), store.embedder_identity()


@router.get("/v1/documents")
async def list_documents(request: Request) -> dict:
    services = services_of(request)
    documents, identity = await services.encoder.run(_list, services)
    jobs = jobs_of(request)
    return {
        "object": "list",
        "data": [document_json(d, jobs) for d in documents],
        "num_documents": len(documents),
        "num_chunks": sum(d.num_chunks for d in documents),
        "embedding_model": identity[0] if identity else None,
    }


def _document(services: Services, document_id: int) -> DocumentInfo:
    store = index_store(services)
    document = store.document(document_id) if store is not None else None
    if document is None:
        raise _not_found("document", document_id)
    return document


@router.get("/v1/documents/{document_id}")
async def get_document(document_id: int, request: Request) -> dict:
    services = services_of(request)
    document = await services.encoder.run(_document, services, document_id)
    return document_json(document, jobs_of(request))


def _chunks(services: Services, document_id: int) -> tuple[DocumentInfo, list[ChunkInfo]]:
    document = _document(services, document_id)
    store = index_store(services)
    assert store is not None
    return document, store.document_chunks(document_id)


@router.get("/v1/documents/{document_id}/chunks")
async def document_chunks(document_id: int, request: Request) -> dict:
    services = services_of(request)
    document, chunks = await services.encoder.run(_chunks, services, document_id)
    return {
        "object": "list",
        "document": document_json(document, jobs_of(request)),
        "data": [chunk_json(c) for c in chunks],
    }


def _delete(services: Services, document_id: int) -> DocumentInfo:
    document = _document(services, document_id)
    store = index_store(services)
    assert store is not None
    store.remove_documents([document.path])
    return document


@router.delete("/v1/documents/{document_id}")
async def delete_document(document_id: int, request: Request) -> dict:
    services = services_of(request)
    document = await services.encoder.run(_delete, services, document_id)
    jobs = jobs_of(request)
    if jobs.is_upload(document.path):  # our copy of the file; a folder ingested by CLI is not ours
        await asyncio.to_thread(Path(document.path).unlink, missing_ok=True)
    return {"id": document.id, "object": "document", "deleted": True, "path": document.path}


def _chunk(services: Services, chunk_id: int) -> ChunkInfo:
    store = index_store(services)
    chunk = store.chunk(chunk_id) if store is not None else None
    if chunk is None:
        raise _not_found("chunk", chunk_id)
    return chunk


@router.get("/v1/chunks/{chunk_id}")
async def get_chunk(chunk_id: int, request: Request) -> dict:
    services = services_of(request)
    return chunk_json(await services.encoder.run(_chunk, services, chunk_id))
