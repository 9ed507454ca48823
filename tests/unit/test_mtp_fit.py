"""Fitting an MTP head on a tiny random llama: the unrolled training pass computes exactly what
the decoder drafts, batches mask what they should, a few steps cut the loss and lift the
acceptance, the draft vocabulary keeps decoding exact, and the fitted sidecar (or a packaged head
matched by its GGUF source) is what `load_head` finds. Also `rag mtp fit` / `rag mtp eval`."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import inference  # noqa: F401  (BLAS before mlx)
from inference import mtp_head
from inference.mtp_decode import MTPDecoder, Trunk, decode_plain, draft_distribution
from inference.mtp_fit import (
    FitConfig,
    evaluate_teacher_forced,
    fit_head,
    init_head,
    save_fitted_head,
    trunk_identity,
)
from inference.mtp_fit_data import (
    Sample,
    draft_vocabulary,
    generate_samples,
    make_batch,
    text_samples,
)
from inference.mtp_fit_loss import unrolled_outputs
from inference.mtp_fit_measure import measure_acceptance
from inference.mtp_head import (
    SIDECAR_NAME,
    load_head,
    load_sidecar_head,
    make_generic_head,
    read_sidecar_info,
    sidecar_path,
)
from inference.sampling import SamplingParams, compute_probs

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten

from rag import mtp_cli
from tests.fixtures.tiny_llama import write_tiny_llama
from tests.unit.test_mtp_decode import PROMPT

GREEDY = SamplingParams(temperature=0.0, seed=3)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fit") / "tiny-llama"
    return write_tiny_llama(folder, seed=2, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def trunk(llama_dir: Path) -> Trunk:
    """Sharpened so its samples neither repeat one token (then any head is always right) nor
    spread evenly (then nothing is learnable): a copy-like fresh head accepts ~0.15 here."""
    model, _ = mlx_lm.load(str(llama_dir))
    model.lm_head.weight = model.lm_head.weight * 4
    return Trunk(model)


@pytest.fixture(scope="module")
def samples(trunk: Trunk) -> list[Sample]:
    prompts = [[1, *PROMPT[: 3 + i % 5], 40 + i] for i in range(16)]
    return generate_samples(trunk, prompts, stop_ids=[2], max_tokens=24, seed=0)


def test_unrolled_pass_equals_what_the_decoder_drafts(trunk: Trunk):
    """Depth k output at base t == the head run with a cache over pairs (h_i, x_{i+1}), i <= t,
    then on its own output with x_{t+2}, x_{t+3}: the decoder's drafting with drafts that stood."""
    mx.random.seed(4)
    head = make_generic_head(trunk.model, num_layers=2)
    tokens = [1, *PROMPT, 50, 60, 70]
    hiddens, _ = trunk.forward(tokens, None, "post_norm")
    embeddings = trunk.embed(tokens)
    outputs = unrolled_outputs(head, embeddings, hiddens, depth=3)
    assert [o.shape[1] for o in outputs] == [len(tokens) - k for k in (1, 2, 3)]
    for t in (0, 3, len(tokens) - 4):
        cache = head.make_cache()
        got = head(trunk.embed(tokens[1 : t + 2]), hiddens[:, : t + 1], cache)[:, -1:]
        for k in (1, 2, 3):
            if k > 1:
                got = head(trunk.embed([tokens[t + k]]), got, cache)
            np.testing.assert_allclose(
                np.array(got[0, 0]), np.array(outputs[k - 1][0, t]), atol=2e-5, err_msg=f"{t=} {k=}"
            )


def test_batches_mask_the_trained_targets_only():
    rng = np.random.default_rng(0)
    batch = make_batch([Sample((5, 6, 7, 8, 9), loss_start=3), Sample((5, 6, 7))], 6, rng)
    np.testing.assert_array_equal(np.array(batch.tokens), [[5, 6, 7, 8, 9, 0], [5, 6, 7, 0, 0, 0]])
    # mask[t] = 1: x_{t+1} exists and t + 1 >= loss_start.
    np.testing.assert_array_equal(
        np.array(batch.target_mask), [[0, 0, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]]
    )
    long = Sample(tuple(range(100, 140)), loss_start=16)
    for _ in range(20):
        window = make_batch([long], 8, rng)
        first = int(np.array(window.tokens)[0, 0]) - 100
        assert 12 <= first <= 32  # starts at most half a window before the trained part
        assert np.array(window.target_mask)[0].sum() >= 3


def test_text_windows_and_draft_vocabulary():
    windows = text_samples(list(range(10)), 4)
    assert [w.token_ids for w in windows] == [(0, 1, 2, 3), (4, 5, 6, 7), (8, 9)]
    data = [Sample((1, 9, 9, 9, 7, 7, 3), loss_start=4), Sample((4, 4, 4, 4))]
    # Counted from loss_start (or 1): 7, 7, 3 and 4, 4, 4; the stop token 2 is always kept.
    assert draft_vocabulary(data, 3, always=[2]) == [2, 4, 7]


def test_generated_samples_are_the_models_own_continuations(trunk: Trunk, samples):
    assert len(samples) == 16
    for sample in samples:
        prompt = sample.token_ids[: sample.loss_start]
        continuation = sample.token_ids[sample.loss_start :]
        assert prompt[0] == 1 and 1 <= len(continuation) <= 24
        assert 2 not in continuation[:-1]  # a stop token ends the sample


def test_fitting_cuts_the_loss_and_lifts_acceptance(trunk: Trunk, samples):
    config = FitConfig(steps=40, batch=8, seq_len=32, lr=3e-3, warmup=4, draft_vocab_size=0)
    head = init_head(trunk, config, None)
    before = evaluate_teacher_forced(trunk, head, samples, config, num_batches=2)
    result = fit_head(trunk, head, samples, config)
    after = evaluate_teacher_forced(trunk, head, samples, config, num_batches=2)
    assert result.steps == 40 and len(result.losses) == 40
    assert np.mean(result.losses[-5:]) < 0.7 * np.mean(result.losses[:3])
    for depth in range(3):
        assert after["depth_kl"][depth] < before["depth_kl"][depth]
        assert after["depth_acceptance_t1"][depth] > before["depth_acceptance_t1"][depth] + 0.3
    sampled = SamplingParams(temperature=1.0, seed=0)
    prompts = [list(s.token_ids[: s.loss_start]) for s in samples[:4]]
    random_head = init_head(trunk, FitConfig(seed=9), None)
    fitted = measure_acceptance(trunk, head, prompts, sampled, depth=2, max_tokens=16)
    baseline = measure_acceptance(trunk, random_head, prompts, sampled, depth=2, max_tokens=16)
    assert fitted.acceptance_by_depth[0] > baseline.acceptance_by_depth[0] + 0.15


def test_a_draft_vocabulary_keeps_decoding_exact(trunk: Trunk):
    head = init_head(trunk, FitConfig(seed=1), draft_ids=list(range(0, 320, 3)))
    assert head.draft_ids is not None and "_draft_ids" not in dict(tree_flatten(head.parameters()))
    want = decode_plain(trunk.model, PROMPT, GREEDY, 20)
    decoder = MTPDecoder(trunk, head, GREEDY, 3)
    assert list(decoder.generate(PROMPT, 20)) == want
    logits = trunk.draft_logits(mx.random.normal((1, 1, 64)), head.draft_ids)
    outside = np.setdiff1d(np.arange(trunk.vocab_size), np.array(head.draft_ids))
    assert np.all(np.isneginf(np.array(logits)[0, 0, outside]))
    full = np.array(trunk.lm_head(mx.ones((1, 64))))[0]
    rows = np.array(trunk.draft_logits(mx.ones((1, 64)), head.draft_ids))[0]
    np.testing.assert_allclose(
        rows[np.array(head.draft_ids)], full[np.array(head.draft_ids)], rtol=1e-5
    )


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0.6, top_p=0.95, top_k=20),
        SamplingParams(temperature=1.0, top_k=500),  # k beyond the draft vocabulary
        SamplingParams(temperature=0.8, top_p=0.9, min_p=0.05),
        SamplingParams(temperature=1.3),
        SamplingParams(temperature=0.7, repetition_penalty=1.3, presence_penalty=0.5),
    ],
    ids=["greedy", "top_k_top_p", "big_k", "top_p_min_p", "dense", "penalties"],
)
def test_draft_distribution_equals_the_full_vocabulary_transform(trunk: Trunk, params):
    # The sub-vocabulary shortcut must give the very q the full -inf-padded logits give.
    head = init_head(trunk, FitConfig(seed=1), draft_ids=list(range(1, 320, 3)))
    hidden = mx.random.normal((1, 1, 64), key=mx.random.key(4)) * 3
    prompt, output = [5, 9, 14, 9], [14, 31, 9]
    logits = trunk.draft_logits(hidden, head.draft_ids)[0]
    want = np.array(compute_probs(logits, [params], [prompt], [output]))[0]
    got = draft_distribution(trunk, head, hidden, params, prompt, output)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    assert got[np.setdiff1d(np.arange(trunk.vocab_size), head.draft_ids_host)].sum() == 0


def test_fitted_sidecar_round_trips_and_is_loaded(trunk: Trunk, llama_dir: Path, samples, tmp_path):
    folder = shutil.copytree(llama_dir, tmp_path / "model")
    config = FitConfig(steps=3, batch=2, seq_len=16, draft_vocab_size=64)
    ids = draft_vocabulary(samples, config.draft_vocab_size, always=[2])
    head = init_head(trunk, config, ids)
    result = fit_head(trunk, head, samples, config)
    identity = trunk_identity(folder, trunk.model)
    save_fitted_head(head, sidecar_path(folder), config=config, result=result, identity=identity)
    info = read_sidecar_info(sidecar_path(folder))
    assert info["steps"] == 3 and info["fit_config"]["depth"] == 3
    assert info["trunk_fingerprint"] == identity["trunk_fingerprint"]
    assert info["draft_vocab_size"] == len(ids) and len(info["depth_loss"]) == 3
    loaded = load_head(folder, trunk.model)
    assert loaded is not None and np.array(loaded.draft_ids).tolist() == ids
    for (key, got), (_, want) in zip(
        tree_flatten(loaded.parameters()), tree_flatten(head.parameters()), strict=True
    ):
        np.testing.assert_array_equal(np.array(got), np.array(want), err_msg=key)


def test_packaged_head_is_found_by_gguf_source_or_fingerprint(
    trunk: Trunk, llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    folder = shutil.copytree(llama_dir, tmp_path / "model")
    heads = tmp_path / "heads"
    heads.mkdir()
    monkeypatch.setattr(mtp_head, "PACKAGED_HEADS_DIR", heads)
    assert load_head(folder, trunk.model) is None
    head = init_head(trunk, FitConfig(), None)
    fit = {
        "config": FitConfig(),
        "result": fit_head(
            trunk, head, [Sample((1, 2, 3))], FitConfig(steps=1, batch=1, seq_len=4)
        ),
    }
    # A head for some other model is never picked.
    save_fitted_head(head, heads / "other.safetensors", identity={"gguf_sha256": "0" * 64}, **fit)
    assert load_head(folder, trunk.model) is None
    save_fitted_head(
        head, heads / "mine.safetensors", identity=trunk_identity(folder, trunk.model), **fit
    )
    assert load_head(folder, trunk.model) is not None
    # A folder converted from a GGUF is matched by the GGUF's hash, whatever its dtype.
    (heads / "mine.safetensors").unlink()
    record = {
        "converter_version": 1,
        "dtype": "bfloat16",
        "source": {"path": "x.gguf", "size": 1, "mtime_ns": 0, "sha256": "ab" * 32},
    }
    (folder / "gguf_source.json").write_text(json.dumps(record))
    save_fitted_head(head, heads / "gguf.safetensors", identity={"gguf_sha256": "ab" * 32}, **fit)
    found = load_head(folder, trunk.model)
    assert found is not None
    # Shipped as fp16, run in the trunk's fp32 (fp16 matmuls skip BLAS on a CPU).
    save_fitted_head(
        head, heads / "gguf.safetensors", identity={"gguf_sha256": "ab" * 32}, float16=True, **fit
    )
    assert mx.load(str(heads / "gguf.safetensors"))["fc.weight"].dtype == mx.float16
    assert load_head(folder, trunk.model).fc.weight.dtype == mx.float32
    # The model's own sidecar wins over a packaged head.
    mx.random.seed(3)
    own = make_generic_head(trunk.model, num_layers=2)
    mtp_head.save_head(own, folder / SIDECAR_NAME)
    assert len(load_head(folder, trunk.model).layers) == 2
    assert len(load_sidecar_head(heads / "gguf.safetensors", trunk.model).layers) == 1


def test_fit_config_says_what_is_out_of_range():
    with pytest.raises(ValueError, match=r"lr=0, depth=4"):
        FitConfig(depth=4, lr=0)
    with pytest.raises(ValueError, match="minutes=0"):
        FitConfig(minutes=0)


def _cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    mtp_cli.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli_fits_then_evaluates(llama_dir: Path, tmp_path: Path, capsys):
    folder = shutil.copytree(llama_dir, tmp_path / "model")
    text = tmp_path / "notes.txt"
    text.write_text("The capital of France is Paris. " * 20)
    args = _cli(
        [
            "mtp",
            "fit",
            "--model",
            str(folder),
            "--steps",
            "4",
            "--batch",
            "2",
            "--seq-len",
            "32",
            "--samples",
            "4",
            "--gen-tokens",
            "8",
            "--text",
            str(text),
            "--draft-vocab",
            "64",
            "--eval-prompts",
            "2",
            "--eval-tokens",
            "6",
            "--data",
            str(tmp_path / "answers.jsonl"),
        ]
    )
    assert args.run(args) == 0
    out = capsys.readouterr().out
    assert sidecar_path(folder).is_file() and '"saved"' in out
    info = read_sidecar_info(sidecar_path(folder))
    assert info["steps"] == 4 and "acceptance" in info
    model, _ = mlx_lm.load(str(folder))
    first = load_sidecar_head(sidecar_path(folder), model)
    # Again on the saved answers, continuing from the saved head into another file.
    out_path = tmp_path / "more.safetensors"
    fit = ["mtp", "fit", "--model", str(folder), "--steps", "2", "--batch", "2", "--seq-len", "32"]
    evaluate = ["--eval-prompts", "1", "--eval-tokens", "4", "--out", str(out_path)]
    more = ["--data", str(tmp_path / "answers.jsonl"), "--init", str(sidecar_path(folder))]
    args = _cli([*fit, *evaluate, *more])
    assert args.run(args) == 0
    assert '"samples": ' in capsys.readouterr().out
    resumed = load_sidecar_head(out_path, model)
    assert np.array(resumed.draft_ids).tolist() == np.array(first.draft_ids).tolist()
    assert read_sidecar_info(out_path)["steps"] == 2
    assert read_sidecar_info(out_path)["continued_from"]["steps"] == 4
    args = _cli(
        [
            "mtp",
            "eval",
            "--model",
            str(folder),
            "--prompts",
            "2",
            "--tokens",
            "6",
            "--depths",
            "1",
            "2",
        ]
    )
    assert args.run(args) == 0
    lines = [
        json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")
    ]
    modes = {(line["sampling"], line["mode"]) for line in lines}
    assert ("greedy", "d2") in modes and ("t0.6_p0.95_k20", "ar") in modes
    assert all(
        len(line["acceptance_by_depth"]) == int(line["mode"][1])
        for line in lines
        if line["mode"] != "ar"
    )


def test_draft_rows_of_a_quantized_trunk_match_its_lm_head(llama_dir: Path):
    model, _ = mlx_lm.load(str(llama_dir))
    nn.quantize(model, group_size=32, bits=4)
    trunk = Trunk(model)
    ids = mx.array([0, 5, 17, 200], dtype=mx.int32)
    hidden = mx.random.normal((1, 64))
    want = np.array(trunk.lm_head(hidden))[0, np.array(ids)]
    got = np.array(trunk.draft_logits(hidden, ids))[0, np.array(ids)]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
