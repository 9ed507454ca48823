"""The document Q&A page in a real headless Chromium (Debian's /usr/bin/chromium via Playwright).

Drives it as a person would: enter the API key it asks for, upload a PDF and a Markdown file
through the file input, watch ingest finish in the library, ask with Enter, see the answer
stream, open a citation, delete a document. The chat model is scripted (it cites the passage
that mentions the ferry, word by word) so the test can check that citation [n] opens the right
source; retrieval, ingest and the tiny BERT embedder are real. Screenshots land in the test's
tmp dir and in /work/notes/screenshots/ for people to look at.
"""

from __future__ import annotations

import asyncio
import re
import shutil
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from inference.backend import GenerationChunk, GenerationRequest, Usage
from inference.embedder import Embedder

import httpx
import pytest

from rag.server.services import Services, StaticModelRegistry
from rag.server.settings import ServerSettings
from tests.fixtures.ingest_files import write_pdf
from tests.fixtures.live_server import TinyServer, make_tiny_services, tiny_server_running

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = Path("/work/notes/screenshots")
KEY = "sk-page-test"
MARKDOWN = (
    "# Harbour guide\n\n## Ferries\n\nThe morning ferry leaves the north pier at seven and "
    "carries bicycles free of charge.\n\n## Tickets\n\nTickets are sold on board, cash only.\n"
)
PASSAGE = re.compile(r"\[(\d+)\] [^\n]*\n(.*?)(?=\n\n\[\d+\] |\n\nQuestion: )", re.DOTALL)


class ScriptedStream:
    def __init__(self, request: GenerationRequest, words: list[str]) -> None:
        self.request_id = request.request_id
        self.words = words
        self.cancelled = False

    def __aiter__(self) -> AsyncIterator[GenerationChunk]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[GenerationChunk]:
        for n, word in enumerate(self.words, 1):
            await asyncio.sleep(0.03)  # slow enough that the page shows a partial answer
            if self.cancelled:
                yield GenerationChunk(self.request_id, "", (), Usage(50, 0, n), "cancelled")
                return
            last = n == len(self.words)
            yield GenerationChunk(
                self.request_id, word, (n,), Usage(50, 0, n), "stop" if last else None
            )

    def cancel(self) -> None:
        self.cancelled = True


class ScriptedBackend:
    """Answers by citing the numbered passage that mentions the ferry."""

    model_name = "scripted"
    max_model_len = 4096

    def __init__(self) -> None:
        self.prompt = ""

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True
    ) -> list[int]:
        self.prompt = str(messages[-1]["content"])
        return [1, 2, 3]

    def submit(self, request: GenerationRequest) -> ScriptedStream:
        passages = {int(n): text for n, text in PASSAGE.findall(self.prompt)}
        ferry = next((n for n, text in passages.items() if "ferry" in text), 1)
        answer = f"The morning ferry leaves the north pier at seven [{ferry}]. Bring cash [1]."
        return ScriptedStream(request, re.findall(r"\S+\s*", answer))

    def close(self) -> None:
        pass


pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)",
)


@pytest.fixture
def page_server(tiny_bert_path: Path, tmp_path: Path) -> Iterator[TinyServer]:
    services = Services(
        models=StaticModelRegistry([ScriptedBackend()]),
        embedder=Embedder.load(tiny_bert_path),
        index_path=tmp_path / "index.sqlite3",
    )
    with tiny_server_running(services, ServerSettings(api_keys=(KEY,))) as server:
        yield server


def shoot(page: Any, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, SCREENSHOTS / path.name)


def test_upload_ask_stream_and_open_a_citation(page_server: TinyServer, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    pdf = write_pdf(
        tmp_path / "files" / "opening-hours.pdf",
        [["Opening hours", "The harbour office opens daily at nine."], ["Closed on holidays."]],
        title="Opening hours",
    )
    markdown = tmp_path / "files" / "harbour-guide.md"
    markdown.write_text(MARKDOWN)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(page_server.base_url)

            # 1. The server wants a key: the page opens the key form; saving it loads the library.
            key = page.get_by_label("API key", exact=True)
            expect(key).to_be_focused()
            key.fill(KEY)
            key.press("Enter")
            expect(page.locator("#library-summary")).to_contain_text("No documents yet")
            expect(page.locator("#server-status")).to_contain_text("Model: scripted")

            # 2. Upload through the file input; the job card reports, the library fills.
            page.set_input_files("#file-input", [str(pdf), str(markdown)])
            expect(page.locator(".job[data-status=done]")).to_contain_text("Ingested 2 files")
            documents = page.locator("#documents .document")
            expect(documents).to_have_count(2)
            expect(documents.first).to_contain_text("harbour-guide.md")
            expect(documents.nth(1)).to_contain_text("opening-hours.pdf")
            expect(page.locator("#library-summary")).to_contain_text("2 documents")
            shoot(page, tmp_path, "01-library")

            # 3. Ask with Enter (keyword search: the tiny embedder's similarities are random).
            page.get_by_text("Search options").click()
            page.get_by_label("Search").select_option("keyword")
            question = page.get_by_label("Question")
            question.fill("When does the morning ferry leave the north pier?")
            question.press("Enter")
            page.wait_for_function(
                "() => document.querySelector('#answer-state').textContent === 'Writing…'"
                " && document.querySelector('#answer').textContent.length > 0"
            )  # partial text while the answer still streams
            shoot(page, tmp_path, "02-streaming")
            answer = page.locator("#answer")
            expect(answer).to_contain_text("Bring cash")
            expect(page.locator("#timings")).to_contain_text("Decode")
            expect(answer).not_to_have_attribute("aria-busy", "true")
            shoot(page, tmp_path, "03-answer")

            # 4. The answer's [n] is a button; it opens the passage it cites.
            cite = answer.locator("button.cite").first
            expect(cite).to_have_attribute("aria-label", re.compile(r"^Source \d+: "))
            cite.click()
            panel = page.locator("#chunk-panel")
            expect(panel).to_be_visible()
            expect(panel).to_be_focused()
            expect(page.locator("#chunk-meta")).to_contain_text("harbour-guide.md")
            expect(page.locator("#chunk-meta")).to_contain_text("Harbour guide > Ferries")
            expect(page.locator("#chunk-body")).to_contain_text("ferry leaves")
            shoot(page, tmp_path, "04-citation")
            page.get_by_role("button", name="Show the whole document").click()
            expect(page.locator(".doc-chunk.highlighted")).to_contain_text("ferry leaves")
            page.keyboard.press("Escape")
            expect(panel).to_be_hidden()
            expect(cite).to_be_focused()  # focus returns to the citation that opened the panel

            # 5. Dark mode, then delete the PDF with the confirm dialog accepted.
            page.emulate_media(color_scheme="dark")
            shoot(page, tmp_path, "05-dark")
            page.once("dialog", lambda dialog: dialog.accept())
            page.get_by_role("button", name="Delete opening-hours.pdf").click()
            expect(documents).to_have_count(1)
            assert errors == []
        finally:
            browser.close()


def test_page_and_static_files_are_public_with_a_strict_policy(tiny_llama_path: Path) -> None:
    services = make_tiny_services(tiny_llama_path)
    with tiny_server_running(services, ServerSettings(api_keys=(KEY,))) as server:
        page = httpx.get(f"{server.base_url}/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        for name, kind in [("app.js", "text/javascript"), ("app.css", "text/css")]:
            response = httpx.get(f"{server.base_url}/static/{name}")
            assert response.status_code == 200 and response.headers["content-type"].startswith(kind)
            assert f"/static/{name}" in page.text
        assert httpx.get(f"{server.base_url}/static/nope.js").status_code == 404
        assert httpx.get(f"{server.base_url}/static/..%2Fweb.py").status_code == 404
        assert httpx.get(f"{server.base_url}/v1/documents").status_code == 401
