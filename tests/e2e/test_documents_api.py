"""Document routes on a real uvicorn: upload and ingest, job progress, library, chunks, delete.

The server starts with no index at all; uploads create it, and a RAG query sees documents that
were ingested after the server started.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ingest.pipeline import run_ingest
from ingest.store import SqliteVecStore
from tests.fixtures.ingest_fakes import HashingEmbedder
from tests.fixtures.ingest_files import write_pdf
from tests.fixtures.live_server import TinyServer, make_tiny_services, tiny_server_running

MARKDOWN = (
    b"# Ferries\n\nThe morning ferry leaves the north pier at seven.\n\n## Tickets\n\nCash only.\n"
)
TEXT = b"The lighthouse keeper lives on the island all winter.\n"


@pytest.fixture
def server(tiny_llama_path: Path, tiny_bert_path: Path, tmp_path: Path) -> Iterator[TinyServer]:
    services = make_tiny_services(
        tiny_llama_path, tiny_bert_path, index_path=tmp_path / "index" / "index.sqlite3"
    )
    with tiny_server_running(services) as running:
        yield running


def upload(server: TinyServer, *files: tuple[str, bytes]) -> httpx.Response:
    parts = [("files", (name, data, "application/octet-stream")) for name, data in files]
    return httpx.post(f"{server.base_url}/v1/documents", files=parts, timeout=30)


def wait_for(server: TinyServer, job: dict, timeout_s: float = 30) -> dict:
    deadline = time.monotonic() + timeout_s
    while job["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, f"ingest job did not finish: {job}"
        time.sleep(0.05)
        response = httpx.get(f"{server.base_url}/v1/documents/jobs/{job['id']}")
        assert response.status_code == 200
        job = response.json()
    return job


def documents(server: TinyServer) -> dict:
    return httpx.get(f"{server.base_url}/v1/documents").json()


def test_upload_ingests_reports_failures_and_serves_the_library(
    server: TinyServer, tmp_path: Path, isolated_data_dir: Path
) -> None:
    pdf = write_pdf(
        tmp_path / "guide.pdf", [["Opening hours", "Open daily from nine."]]
    ).read_bytes()
    response = upload(
        server,
        ("ferries.md", MARKDOWN),
        ("keeper.txt", TEXT),
        ("broken.pdf", b"%PDF-1.4\nthis is not really a pdf\n"),
        ("guide.pdf", pdf),
        ("tool.exe", b"MZ\x90\x00"),
    )
    assert response.status_code == 202, response.text
    assert response.headers["location"] == f"/v1/documents/jobs/{response.json()['id']}"
    job = wait_for(server, response.json())
    assert job["status"] == "done" and job["error"] is None
    by_name = {f["name"]: f for f in job["files"]}
    assert by_name["tool.exe"]["status"] == "rejected"
    assert by_name["tool.exe"]["error"]["status"] == 400
    assert "unsupported file type .exe" in by_name["tool.exe"]["error"]["message"]
    assert by_name["broken.pdf"]["status"] == "failed"
    assert by_name["broken.pdf"]["error"]["status"] == 422
    for name in ("ferries.md", "keeper.txt", "guide.pdf"):
        assert by_name[name]["status"] == "added" and by_name[name]["num_chunks"] > 0
    assert job["num_files"] == 4 and job["num_files_done"] == 4 and job["num_failed"] == 2
    assert job["num_chunks"] == sum(f["num_chunks"] for f in job["files"])

    uploads = isolated_data_dir / "uploads"
    assert sorted(p.name for p in uploads.iterdir()) == ["ferries.md", "guide.pdf", "keeper.txt"]

    library = documents(server)
    assert library["num_documents"] == 3
    docs = {d["name"]: d for d in library["data"]}
    assert docs["guide.pdf"]["kind"] == "pdf" and docs["guide.pdf"]["uploaded"]
    assert docs["ferries.md"]["num_chunks"] == by_name["ferries.md"]["num_chunks"]
    assert docs["keeper.txt"]["size"] == len(TEXT)
    assert library["num_chunks"] == job["num_chunks"]

    listing = httpx.get(f"{server.base_url}/v1/documents/{docs['guide.pdf']['id']}/chunks").json()
    assert listing["document"]["path"] == docs["guide.pdf"]["path"]
    chunks = listing["data"]
    assert [c["ordinal"] for c in chunks] == list(range(len(chunks)))
    assert all(c["page"] == 1 for c in chunks)
    assert "nine" in " ".join(c["text"] for c in chunks)
    one = httpx.get(f"{server.base_url}/v1/chunks/{chunks[0]['id']}").json()
    assert one == chunks[0]

    md_chunks = httpx.get(f"{server.base_url}/v1/documents/{docs['ferries.md']['id']}/chunks")
    headings = {c["heading"] for c in md_chunks.json()["data"]}
    assert "Ferries > Tickets" in headings


def test_rag_query_sees_documents_uploaded_after_start(server: TinyServer) -> None:
    question = {"question": "When does the ferry leave?", "min_similarity": -1.0, "max_tokens": 4}
    before = httpx.post(f"{server.base_url}/v1/rag/query", json=question)
    assert before.status_code == 409 and before.json()["error"]["code"] == "no_index"
    wait_for(server, upload(server, ("ferries.md", MARKDOWN)).json())
    after = httpx.post(f"{server.base_url}/v1/rag/query", json=question, timeout=60)
    assert after.status_code == 200, after.text
    assert all(c["source"].endswith("ferries.md") for c in after.json()["citations"])
    wait_for(server, upload(server, ("keeper.txt", TEXT)).json())
    keeper = {**question, "question": "lighthouse keeper", "mode": "keyword"}
    body = httpx.post(f"{server.base_url}/v1/rag/query", json=keeper, timeout=60).json()
    assert body["citations"][0]["source"].endswith("keeper.txt")


def test_delete_removes_document_chunks_and_upload(server: TinyServer) -> None:
    wait_for(server, upload(server, ("ferries.md", MARKDOWN), ("keeper.txt", TEXT)).json())
    docs = {d["name"]: d for d in documents(server)["data"]}
    target = docs["ferries.md"]
    chunks = httpx.get(f"{server.base_url}/v1/documents/{target['id']}/chunks").json()["data"]
    response = httpx.delete(f"{server.base_url}/v1/documents/{target['id']}")
    assert response.status_code == 200
    assert response.json() == {
        "id": target["id"],
        "object": "document",
        "deleted": True,
        "path": target["path"],
    }
    assert not Path(target["path"]).exists()
    assert [d["name"] for d in documents(server)["data"]] == ["keeper.txt"]
    gone = httpx.get(f"{server.base_url}/v1/chunks/{chunks[0]['id']}")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "chunk_not_found"
    again = httpx.delete(f"{server.base_url}/v1/documents/{target['id']}")
    assert again.status_code == 404 and again.json()["error"]["code"] == "document_not_found"
    assert server.services.index_path is not None
    with SqliteVecStore.open(server.services.index_path) as store:
        assert store.check_integrity().ok


def test_names_are_made_safe_and_reuploads_replace(
    server: TinyServer, isolated_data_dir: Path
) -> None:
    job = wait_for(
        server, upload(server, ("../../escape.md", MARKDOWN), (".hidden.txt", TEXT)).json()
    )
    saved = [f["saved_as"] for f in job["files"]]
    assert saved == ["escape.md", "hidden.txt"]
    uploads = isolated_data_dir / "uploads"
    assert sorted(p.name for p in uploads.iterdir()) == saved
    assert not (isolated_data_dir.parent / "escape.md").exists()
    same = wait_for(server, upload(server, ("escape.md", MARKDOWN)).json())
    assert same["files"][0]["status"] == "unchanged"
    changed = wait_for(server, upload(server, ("escape.md", MARKDOWN + b"\nNew line.\n")).json())
    assert changed["files"][0]["status"] == "updated"
    assert documents(server)["num_documents"] == 2
    twice = wait_for(server, upload(server, ("a.md", MARKDOWN), ("a.md", TEXT)).json())
    assert [f["saved_as"] for f in twice["files"]] == ["a.md", "a-2.md"]


def test_upload_errors(server: TinyServer, tmp_path: Path) -> None:
    empty = httpx.post(f"{server.base_url}/v1/documents", data={"note": "no files"})
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "files"
    unknown = httpx.get(f"{server.base_url}/v1/documents/jobs/nope")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "job_not_found"
    assert httpx.get(f"{server.base_url}/v1/documents/12345").status_code == 404
    assert documents(server) == {
        "object": "list",
        "data": [],
        "num_documents": 0,
        "num_chunks": 0,
        "embedding_model": None,
    }
    # An index built with another embedder is refused before anything is saved.
    assert server.services.index_path is not None
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_bytes(MARKDOWN)
    with SqliteVecStore.open(server.services.index_path) as store:
        run_ingest([docs], store, HashingEmbedder)
    refused = upload(server, ("keeper.txt", TEXT))
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "embedder_mismatch"
