"""`rag mtp fit` and `rag mtp eval`: fit an MTP draft head for a chat model that has none, and
measure how often its drafts stand and what that does to decode speed.

fit:  the model answers built-in chat prompts (and RAG-shaped prompts over --text files) at
      temperature 0.7; the head is fitted on those answers and the texts (inference.mtp_fit),
      measured on held-out prompts, and saved as the model folder's `mtp_head.safetensors`
      (or --out) with how it was fitted in its metadata.
eval: plain decoding against the MTP lane at depth 1..3 on held-out prompts, greedy and at
      0.6 / top_p 0.95 / top_k 20: acceptance per depth, tokens per cycle, decode tok/s.

Both print one JSON object per line. Everything past argument handling and prompt wording lives
in inference.mtp_fit and its mtp_fit_data / mtp_fit_loss / mtp_fit_measure.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import time
from pathlib import Path
from typing import Any

from inference.chat_model import ModelNotFoundError, resolve_chat_model
from inference.mtp_fit import (
    FitConfig,
    evaluate_teacher_forced,
    fit_head,
    init_head,
    load_trunk,
    resume_head,
    save_fitted_head,
    trunk_identity,
)
from inference.mtp_fit_data import (
    chat_prompt_ids,
    draft_vocabulary,
    generate_samples,
    load_samples,
    save_samples,
    stop_ids,
    text_samples,
)
from inference.mtp_fit_measure import compare_modes
from inference.mtp_head import (
    HeadLoadError,
    load_head,
    load_sidecar_head,
    read_sidecar_info,
    sidecar_path,
)
from inference.sampling import SamplingParams

from rag.prompt import Passage, assemble_prompt

_FIT = FitConfig()
SETTINGS = {
    "greedy": SamplingParams(temperature=0.0, seed=0),
    "t0.6_p0.95_k20": SamplingParams(temperature=0.6, top_p=0.95, top_k=20, seed=0),
}
# A grid of topics x templates (x system prompts): diverse enough that the head learns the model,
# not these prompts' answers. Separated by ";" to keep the lists compact.
_TOPICS = tuple(
    " ".join(t.split())
    for t in """photosynthesis; the French Revolution; black holes; machine learning; the water
    cycle; volcanoes; the immune system; climate change; the Roman Empire; recursion in
    programming; SQL indexes; the stock market; honey bees; the printing press; plate tectonics;
    vaccines; electric cars; the moon landing; compound interest; sleep; coffee; the Great Wall
    of China; DNA; rainbows; public libraries; solar panels; the internet; chess openings;
    healthy breakfasts; time management; learning a new language; gardening tomatoes; bicycles;
    the Pythagorean theorem; hash tables; Git branches; HTTP caching; writing a cover letter;
    job interviews; museums; telescopes; renewable energy; the ocean tides; earthquakes; the
    human heart; Shakespeare; jazz music; baking bread; first aid for burns; recycling; ancient
    Egypt; the Renaissance; the Industrial Revolution; World War II; the Cold War; democracy;
    inflation; supply and demand; taxes; budgeting; saving for retirement; credit cards;
    starting a small business; marketing; negotiation; public speaking; leadership; teamwork;
    remote work; email etiquette; writing a novel; poetry; photography; painting with
    watercolors; playing the guitar; learning the piano; classical music; film making; video
    games; board games; football; basketball; running a marathon; yoga; strength training;
    nutrition; vitamins; drinking water; the common cold; allergies; diabetes; mental health;
    meditation; stress; friendship; parenting; pets; dogs; cats; birds; sharks; whales;
    rainforests; deserts; mountains; rivers; glaciers; weather forecasts; hurricanes; the solar
    system; Mars; the Sun; stars; galaxies; gravity; electricity; magnets; light; sound; atoms;
    chemical reactions; acids and bases; the periodic table; evolution; cells; bacteria;
    viruses; genetics; the brain; memory; Python lists; JavaScript promises; Linux commands;
    databases; REST APIs; unit testing; code review; encryption; passwords; computer networks;
    cloud computing; operating systems; compilers; sorting algorithms; binary search; graphs
    and trees; spreadsheets; statistics; probability; fractions; algebra; geometry; calculus;
    maps; travel in Japan; visiting Paris; camping; cooking pasta; vegetarian recipes; making
    soup; knitting; woodworking; fixing a leaky tap; saving energy at home; moving house;
    learning to drive; airplanes; trains; ships; bridges; skyscrapers; architecture; the
    history of writing; languages of the world; philosophy; ethics; happiness""".split(";")  # noqa: SIM905 (a prose list reads better)
)
_TEMPLATES = (
    "Explain {t} in simple terms.",
    "Write a short paragraph about {t}.",
    "What are three interesting facts about {t}?",
    "Give me a few practical tips related to {t}.",
    "Summarize the history of {t} in a few sentences.",
    "What is the most common misconception about {t}?",
    "How would you explain {t} to a ten-year-old?",
    "List the pros and cons of {t}.",
    "Write a short quiz with answers about {t}.",
    "Why does {t} matter? Answer briefly.",
    "I am a beginner. Where should I start with {t}?",
    "Compare {t} with something similar and explain the difference.",
    "Write a short story that involves {t}.",
    "What questions do people often ask about {t}? Answer two of them.",
    "Give a step-by-step explanation of {t}.",
    "Tell me something surprising about {t}.",
    "Write a tweet about {t}.",
    "What would an expert say about {t}?",
    "Describe {t} in one paragraph, then give one example.",
    "Can you help me understand {t}? Keep it short.",
)
_SYSTEM_PROMPTS = (
    None,  # the chat template's own default
    "You are a helpful assistant. Answer clearly and concisely.",
    "You are a friendly teacher who explains things with examples.",
    "You are an expert assistant. Be precise and brief.",
)
_RAG_QUESTIONS = (
    "What are the main points of these sources?",
    "Summarize what the sources say.",
    "What does source [1] say?",
    "Which details in the sources are the most important for a visitor?",
    "What dates, prices or numbers do the sources mention?",
)
# Held out: never used for fitting.
EVAL_PROMPTS = (
    "How does a refrigerator keep food cold?",
    "Write a haiku about autumn and explain it.",
    "What should I pack for a weekend hiking trip?",
    "Explain how a hash table handles collisions, with an example in Python.",
    "What is the difference between weather and climate?",
    "Give me a simple recipe for pancakes.",
    "Why is the sky blue?",
    "How do I write a good email to ask for a deadline extension?",
    "What is a prime number? Give examples.",
    "Describe the main causes of the First World War.",
    "How do noise-cancelling headphones work?",
    "Suggest three names for a bakery and say why.",
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "mtp", help="fit and evaluate an MTP draft head for a chat model (speculative decoding)"
    )
    actions = parser.add_subparsers(dest="mtp_action", metavar="ACTION", required=True)
    fit = actions.add_parser(
        "fit",
        help="fit a draft head on the model's own answers (self-distillation)",
        description="Freeze the model, let it answer prompts, and fit a draft head that predicts "
        "what the model would say one, two and three tokens ahead.",
    )
    _model_argument(fit)
    fit.add_argument("--steps", type=int, default=_FIT.steps, help="default: %(default)s")
    fit.add_argument(
        "--minutes", type=float, help="training time budget (the schedule shrinks to fit it)"
    )
    fit.add_argument(
        "--out", type=Path, help="where to write the head (default: MODEL/mtp_head.safetensors)"
    )
    fit.add_argument("--batch", type=int, default=_FIT.batch, help="default: %(default)s")
    fit.add_argument("--seq-len", type=int, default=_FIT.seq_len, help="default: %(default)s")
    fit.add_argument("--lr", type=float, default=_FIT.lr, help="default: %(default)s")
    fit.add_argument(
        "--depth", type=int, default=_FIT.depth, help="unrolled depth (default: %(default)s)"
    )
    fit.add_argument(
        "--draft-vocab",
        type=int,
        default=_FIT.draft_vocab_size,
        help="tokens the head drafts from, most frequent first; 0 = all (default: %(default)s)",
    )
    fit.add_argument("--seed", type=int, default=_FIT.seed)
    fit.add_argument(
        "--samples", type=int, default=256, help="answers to generate (default: %(default)s)"
    )
    fit.add_argument(
        "--gen-tokens", type=int, default=192, help="tokens per answer (default: %(default)s)"
    )
    fit.add_argument(
        "--gen-batch", type=int, default=16, help="answers generated at once (default: %(default)s)"
    )
    fit.add_argument(
        "--gen-minutes", type=float, help="stop generating after this long, keep what is done"
    )
    fit.add_argument(
        "--data",
        type=Path,
        help="a JSONL file of generated answers: read if it exists, else written after generating",
    )
    fit.add_argument(
        "--text",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="a text file to fit on and to build RAG-style prompts from (repeatable)",
    )
    fit.add_argument(
        "--init", type=Path, help="continue fitting this head file instead of a fresh head"
    )
    fit.add_argument("--fp16", action="store_true", help="store the weights as float16")
    fit.add_argument(
        "--eval-prompts", type=int, default=4, help="held-out prompts measured after fitting"
    )
    fit.add_argument("--eval-tokens", type=int, default=64)
    fit.set_defaults(run=run_fit)

    evaluate = actions.add_parser(
        "eval",
        help="acceptance per depth and decode tok/s: plain vs MTP depth 1..3",
        description="Decode held-out prompts plainly and with the MTP lane at each depth, greedy "
        "and at temperature 0.6 / top_p 0.95 / top_k 20.",
    )
    _model_argument(evaluate)
    evaluate.add_argument("--head", type=Path, help="a head file (default: the model's own)")
    evaluate.add_argument("--prompts", type=int, default=6, help="held-out prompts (max 12)")
    evaluate.add_argument("--tokens", type=int, default=64, help="tokens per answer")
    evaluate.add_argument("--depths", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3])
    evaluate.set_defaults(run=run_eval)


def _model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", help="chat model: a folder, a .gguf, or a name in $RAG_MODEL_DIR (default model)"
    )


def _print(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def fit_chats(num: int, texts: list[str], seed: int) -> list[list[dict[str, str]]]:
    """num chats: the topic x template grid in a shuffled order, one in four RAG-shaped over
    passages of the texts when there are any."""
    rng = random.Random(seed)
    grid = [t.format(t=topic) for topic, t in itertools.product(_TOPICS, _TEMPLATES)]
    rng.shuffle(grid)
    passages = [p for text in texts for p in _paragraphs(text)]
    chats: list[list[dict[str, str]]] = []
    for i in range(num):
        if passages and i % 4 == 3:
            start = rng.randrange(len(passages))
            chosen = [
                Passage(
                    chunk_id=j, text=passages[(start + j) % len(passages)], source="doc", rank=j
                )
                for j in range(min(3, len(passages)))
            ]
            question = rng.choice(_RAG_QUESTIONS)
            assembled = assemble_prompt(
                question, chosen, count_tokens=lambda s: len(s) // 4, max_prompt_tokens=1500
            )
            chats.append(assembled.messages)
            continue
        system = rng.choice(_SYSTEM_PROMPTS)
        chat = [{"role": "system", "content": system}] if system else []
        chats.append([*chat, {"role": "user", "content": grid[i % len(grid)]}])
    return chats


def _paragraphs(text: str, size: int = 600) -> list[str]:
    """Blank-line paragraphs merged up to ~size characters."""
    out: list[str] = []
    for paragraph in (p.strip() for p in text.split("\n\n")):
        if not paragraph:
            continue
        if out and len(out[-1]) + len(paragraph) < size:
            out[-1] += "\n\n" + paragraph
        else:
            out.append(paragraph[: 2 * size])
    return out


def eval_chats(num: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": p}] for p in EVAL_PROMPTS[: max(1, num)]]


def run_fit(args: argparse.Namespace) -> int:
    try:
        folder = resolve_chat_model(args.model)
        config = FitConfig(
            steps=args.steps,
            batch=args.batch,
            seq_len=args.seq_len,
            lr=args.lr,
            depth=args.depth,
            draft_vocab_size=args.draft_vocab,
            minutes=args.minutes,
            seed=args.seed,
        )
        texts = [path.read_text(errors="replace") for path in args.text]
    except (ModelNotFoundError, ValueError, OSError) as exc:
        print(f"error: {exc}")
        return 1
    trunk, tokenizer = load_trunk(folder)
    stops = stop_ids(tokenizer)

    start = time.monotonic()
    if args.data is not None and args.data.is_file():
        try:
            samples = load_samples(args.data)
        except ValueError as exc:
            print(f"error: {exc}")
            return 1
    else:
        chats = fit_chats(args.samples, texts, args.seed)
        deadline = start + 60 * args.gen_minutes if args.gen_minutes else None
        samples = generate_samples(
            trunk,
            [chat_prompt_ids(tokenizer, c) for c in chats],
            stop_ids=stops,
            max_tokens=args.gen_tokens,
            batch_size=args.gen_batch,
            seed=args.seed,
            deadline=deadline,
        )
        if args.data is not None:
            save_samples(samples, args.data)
    for text in texts:
        samples += text_samples(tokenizer.encode(text), config.seq_len)
    # Held out by prompt, so it measures answers to prompts the head never saw.
    by_prompt = [hash(s.token_ids[: s.loss_start]) % 10 == 0 for s in samples]
    held_out = [s for s, held in zip(samples, by_prompt, strict=True) if held] or samples[:1]
    train = [s for s, held in zip(samples, by_prompt, strict=True) if not held] or held_out
    num_tokens = sum(len(s.token_ids) - s.loss_start for s in train)
    _print(
        {
            "event": "data",
            "samples": len(train),
            "held_out": len(held_out),
            "trained_tokens": num_tokens,
            "seconds": round(time.monotonic() - start, 1),
        }
    )

    lineage: dict[str, Any] = {}
    if args.init is not None:
        try:
            head = resume_head(trunk, args.init)  # keeps its own draft vocabulary
            earlier = read_sidecar_info(args.init)
        except (HeadLoadError, OSError) as exc:
            print(f"error: {exc}")
            return 1
        keep = ("steps", "seconds", "trained_tokens", "continued_from")
        lineage = {"continued_from": {k: earlier[k] for k in keep if k in earlier}}
    else:
        draft_ids = None
        if config.draft_vocab_size:
            draft_ids = draft_vocabulary(train, config.draft_vocab_size, always=stops)
        head = init_head(trunk, config, draft_ids)
    result = fit_head(trunk, head, train, config, log=lambda r: _print({"event": "step", **r}))
    held = evaluate_teacher_forced(trunk, head, held_out, config, num_batches=2)
    _print({"event": "held_out", **held})

    eval_prompts = [chat_prompt_ids(tokenizer, c) for c in eval_chats(args.eval_prompts)]
    acceptance = {}
    for name, params in SETTINGS.items():
        modes = compare_modes(trunk, head, eval_prompts, params, [3], args.eval_tokens)
        stats = modes["d3"].stats
        assert stats is not None
        acceptance[name] = {
            "d3_acceptance_by_depth": [round(a, 3) for a in stats.acceptance_by_depth],
            "d3_tokens_per_cycle": round(stats.tokens_per_cycle, 3),
        }
    _print({"event": "acceptance", **acceptance})

    out = args.out or sidecar_path(folder)
    save_fitted_head(
        head,
        out,
        config=config,
        result=result,
        identity=trunk_identity(folder, trunk.model),
        extra={
            "trained_tokens": num_tokens,
            "held_out": held,
            "acceptance": acceptance,
            "eval_tokens": args.eval_tokens,
            "eval_prompts": len(eval_prompts),
            **lineage,
        },
        float16=args.fp16,
    )
    _print({"event": "saved", "path": str(out), "bytes": Path(out).stat().st_size})
    return 0


def run_eval(args: argparse.Namespace) -> int:
    try:
        folder = resolve_chat_model(args.model)
        trunk, tokenizer = load_trunk(folder)
        if args.head:
            head = load_sidecar_head(args.head, trunk.model)
        else:
            head = load_head(folder, trunk.model)
    except (ModelNotFoundError, HeadLoadError, OSError) as exc:
        print(f"error: {exc}")
        return 1
    if head is None:
        print(f"error: {folder} has no MTP head; fit one with `rag mtp fit`")
        return 1
    prompts = [chat_prompt_ids(tokenizer, c) for c in eval_chats(args.prompts)]
    for name, params in SETTINGS.items():
        modes = compare_modes(trunk, head, prompts, params, args.depths, args.tokens)
        baseline = modes["ar"].decode_tok_s
        for mode, result in modes.items():
            record: dict[str, Any] = {
                "bench": "mtp_eval",
                "model": folder.name,
                "sampling": name,
                "mode": mode,
                "prompts": len(prompts),
                "tokens": args.tokens,
                "decode_tok_s": round(result.decode_tok_s, 2),
                "x_ar": round(result.decode_tok_s / max(baseline, 1e-9), 3),
            }
            if result.stats is not None:
                record["acceptance_by_depth"] = [
                    round(a, 3) for a in result.stats.acceptance_by_depth
                ]
                record["tokens_per_cycle"] = round(result.stats.tokens_per_cycle, 3)
                record["cycles"] = result.stats.num_cycles
            _print(record)
    return 0
