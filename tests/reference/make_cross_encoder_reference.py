"""Write cross_encoder_reference.npz: Hugging Face transformers' own scores of tiny cross-encoders.

Run once, by hand, where torch and transformers are installed (the `bench` extra):

    .venv/bin/python tests/reference/make_cross_encoder_reference.py

Three tiny random folders are built here with numpy only (`build_models`, which the parity test
calls too, so it rebuilds the very same weights without torch):
    bert1  the `tiny_cross_encoder_path` fixture: BertForSequenceClassification, num_labels=1
    bert2  the same trunk with a two-label classifier (irrelevant / relevant)
    xlmr   XLMRobertaForSequenceClassification, num_labels=1 (classifier.dense + out_proj,
           positions after the padding index, no token types)
The reference tokenizes as a real cross-encoder does: pairs, padding, truncation=True (longest
first) to model_max_length; token_type_ids for BERT, none for XLM-R. Texts avoid [UNK]: RoBERTa's
position ids treat pad_token_id (1, [UNK] in this vocabulary) as padding.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).parents[2]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from tests.fixtures.tiny_bert import HIDDEN, write_tiny_cross_encoder  # noqa: E402

OUT = Path(__file__).with_name("cross_encoder_reference.npz")
MODELS = ("bert1", "bert2", "xlmr")

LONG = "the capital of france is paris and the capital of italy is rome "
PAIRS = [
    ("what is the capital of france", "paris is the capital of france"),
    ("what is the capital of france", "rome"),
    ("what is the capital of france", ""),
    ("capital", "the capital of italy is rome, the capital of france is paris."),
    ("embedding model", "Retrieval augmented generation: chunk, embed, index, search!"),
    ("café é", "日本 local machine tokens 42"),
    ("query", LONG * 4),  # the document is cut to fit 40 tokens
    (LONG * 2, LONG * 3),  # both sides are cut (longest first)
    (LONG * 3, "paris"),  # only the query is long: it is the one cut
    ("a", "b"),
]


def build_models(root: Path) -> dict[str, Path]:
    """Write the three tiny folders under root (deterministic); name -> folder."""
    from safetensors.numpy import load_file, save_file

    bert1 = write_tiny_cross_encoder(root / "bert1")

    bert2 = write_tiny_cross_encoder(root / "bert2")
    weights = load_file(str(bert2 / "model.safetensors"))
    rng = np.random.default_rng(2)
    weights["classifier.weight"] = rng.normal(0, HIDDEN**-0.5, (2, HIDDEN)).astype(np.float32)
    weights["classifier.bias"] = np.array([0.2, -0.1], dtype=np.float32)
    save_file(weights, str(bert2 / "model.safetensors"))
    config = json.loads((bert2 / "config.json").read_text())
    config.update(
        num_labels=2,
        id2label={"0": "irrelevant", "1": "relevant"},
        label2id={"irrelevant": 0, "relevant": 1},
    )
    (bert2 / "config.json").write_text(json.dumps(config, indent=2))

    # XLM-R from bert1's numbers: renamed keys, the pooler as classifier.dense, one token-type
    # row, and two position rows in front (RoBERTa positions start at pad_token_id + 1 = 2).
    xlmr = write_tiny_cross_encoder(root / "xlmr")
    rng = np.random.default_rng(3)
    weights = {}
    for key, value in load_file(str(xlmr / "model.safetensors")).items():
        key = key.replace("bert.pooler.dense.", "classifier.dense.")
        key = key.replace("classifier.weight", "classifier.out_proj.weight")
        key = key.replace("classifier.bias", "classifier.out_proj.bias")
        weights[key.replace("bert.", "roberta.", 1)] = value
    table = weights["roberta.embeddings.position_embeddings.weight"]
    front = rng.normal(0, 0.5, (2, HIDDEN)).astype(np.float32)
    weights["roberta.embeddings.position_embeddings.weight"] = np.concatenate([front, table])
    weights["roberta.embeddings.position_ids"] = np.arange(len(table) + 2, dtype=np.int64)[None]
    types = weights["roberta.embeddings.token_type_embeddings.weight"]
    weights["roberta.embeddings.token_type_embeddings.weight"] = types[:1].copy()
    save_file(weights, str(xlmr / "model.safetensors"))
    config = json.loads((xlmr / "config.json").read_text())
    config.update(
        model_type="xlm-roberta",
        architectures=["XLMRobertaForSequenceClassification"],
        max_position_embeddings=config["max_position_embeddings"] + 2,
        type_vocab_size=1,
        pad_token_id=1,
        layer_norm_eps=1e-5,
    )
    (xlmr / "config.json").write_text(json.dumps(config, indent=2))
    return {"bert1": bert1, "bert2": bert2, "xlmr": xlmr}


def weights_digest(folder: Path) -> str:
    """Hash of the tensors (names, shapes, values), independent of the file's byte layout."""
    from safetensors.numpy import load_file

    digest = hashlib.sha256()
    for key, value in sorted(load_file(str(folder / "model.safetensors")).items()):
        digest.update(key.encode() + str(value.shape).encode() + np.ascontiguousarray(value).data)
    return digest.hexdigest()[:16]


def main() -> None:
    import tempfile

    import torch
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    queries = [q for q, _ in PAIRS]
    documents = [d for _, d in PAIRS]
    arrays: dict[str, np.ndarray] = {
        "queries": np.array(queries),
        "documents": np.array(documents),
    }
    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        for name, folder in build_models(Path(tmp)).items():
            tokenizer = AutoTokenizer.from_pretrained(str(folder))
            model = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
            bert = model.config.model_type == "bert"
            batch = tokenizer(
                queries,
                documents,
                padding=True,
                truncation=True,  # longest first, to model_max_length
                return_token_type_ids=bert,  # BertTokenizer returns them; XLM-R's does not
                return_tensors="pt",
            )
            assert "[UNK]" not in tokenizer.convert_ids_to_tokens(batch["input_ids"].flatten())
            with torch.no_grad():
                logits = model(**batch).logits.numpy().astype(np.float32)
            arrays[f"{name}_logits"] = logits
            arrays[f"{name}_num_tokens"] = batch["attention_mask"].sum(1).numpy().astype(np.int32)
            arrays[f"{name}_digest"] = np.array(weights_digest(folder))
            versions[f"{name}_max_length"] = tokenizer.model_max_length
    arrays["versions"] = np.array(json.dumps(versions))
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({len(PAIRS)} pairs x {len(MODELS)} models, {versions})")


if __name__ == "__main__":
    main()
