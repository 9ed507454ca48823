"""The demo corpus (examples/docs) through `ingest` with the real default embedder (MiniLM):
every file ingests, chunks fit the model, and questions find the right chunk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ingest.cli import EXIT_OK, main
from ingest.store import SqliteVecStore

pytestmark = pytest.mark.default_models

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "docs"


@pytest.fixture(scope="module")
def embedder():
    from inference.embedder import Embedder, default_embedder_path

    return Embedder.load(default_embedder_path())


def test_examples_ingest_and_answer_questions(
    tmp_path: Path, embedder, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "index.sqlite3"
    code = main([str(EXAMPLES), "--db", str(db), "--json"], embedder_loader=lambda _: embedder)
    report = json.loads(capsys.readouterr().out)
    assert code == EXIT_OK, report
    assert (report["added"], report["failed"], report["num_truncated"]) == (5, 0, 0)
    assert report["embedder"] == embedder.name

    with SqliteVecStore.open(db) as store:
        assert store.check_integrity().ok
        assert store.embedder_identity() == (embedder.name, embedder.dim)
        texts = [row[0] for row in store._conn.execute("SELECT text FROM chunks")]
        assert max(embedder.count_tokens(texts)) <= embedder.max_tokens

        def top(question: str) -> tuple[str, int | None, str]:
            hit = store.search_vectors(embedder.embed([question]).vectors[0], k=1)[0]
            return Path(hit.path).name, hit.page, hit.text

        name, _, text = top("What is the minimum age to volunteer?")
        assert name == "volunteer-handbook.docx" and "minimum age is 16" in text
        name, page, text = top("How much did re-aluminising the telescope mirror cost?")
        assert (name, page) == ("annual-report-2023.pdf", 2) and "7,200" in text
        name, _, _ = top("Who founded the observatory and when?")
        assert name == "history.txt"
        keyword = store.search_keywords("Perseid meteor", k=1)[0]
        assert (Path(keyword.path).name, keyword.page) == ("annual-report-2023.pdf", 1)
        telescope = store.search_keywords(
            "focal length", k=5, sources=[str(EXAMPLES / "telescopes.html")]
        )
        assert telescope and all(h.path.endswith("telescopes.html") for h in telescope)
        assert "optical path" not in " ".join(texts)  # inline SVG text is dropped

    # Nothing changed: the second run never loads the model.
    def no_model(_: Path | None):
        raise AssertionError("the model was loaded for an unchanged folder")

    assert main([str(EXAMPLES), "--db", str(db), "--json"], embedder_loader=no_model) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["unchanged"] == 5
