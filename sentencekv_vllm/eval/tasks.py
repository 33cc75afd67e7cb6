"""Quality tasks generated locally from a seed (no downloads): NIAH, three synthetic tasks in the spirit of RULER's
categories (multi-key needle, variable tracking, common-word extraction; our own generators and haystack, not
RULER's, so their names do not say ``ruler``), and a small QA set.

Each sample is ``{"task", "prompt", "answers", "meta"}``; a sample scores 1 when any expected answer string occurs
in the model's output (RULER's string-match scoring), or the fraction found for multi-answer tasks.
"""

from __future__ import annotations

import random
import re
from typing import Any

from sentencekv_vllm import fixtures

Sample = dict[str, Any]
WORDS = ("apple river stone cloud tiger lamp silver garden rocket violin ocean maple pepper candle falcon "
         "harbor meadow copper lantern orchid pebble saddle thunder walnut zebra amber basil cedar dune ember").split()


def _chat(tokenizer, content: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)


def _haystack(tokenizer, n_tokens: int, rng: random.Random) -> str:
    text = fixtures.haystack_text(offset=rng.randrange(0, 600_000), n_chars=n_tokens * 6)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens]
    return tokenizer.decode(ids)


def _insert(hay: str, sentence: str, depth: float) -> str:
    cut = hay.rfind(". ", 0, int(len(hay) * depth)) + 2 if depth > 0 else 0
    return hay[:cut] + sentence + " " + hay[cut:]


def niah(tokenizer, ctx: int, depth: float, seed: int) -> Sample:
    rng = random.Random(seed * 7919 + ctx + int(depth * 100))
    value = str(rng.randrange(1000, 9999))
    city = rng.choice(["Lisbon", "Oslo", "Quito", "Hanoi", "Dakar", "Lima", "Perth", "Riga"])
    needle = f"The special magic number for {city} is {value}."
    body = _insert(_haystack(tokenizer, ctx, rng), needle, depth)
    q = f"What is the special magic number for {city}? Answer with the number only."
    return {"task": "niah", "prompt": _chat(tokenizer, f"{body}\n\n{q}"), "answers": [value],
            "meta": {"ctx": ctx, "depth": depth, "seed": seed}}


def multikey_niah(tokenizer, ctx: int, seed: int, n_keys: int = 4) -> Sample:
    rng = random.Random(seed + 101)
    keys = rng.sample(WORDS, n_keys)
    values = [str(rng.randrange(10000, 99999)) for _ in keys]
    hay = _haystack(tokenizer, ctx, rng)
    for k, v in zip(keys, values, strict=True):
        hay = _insert(hay, f"One of the special magic numbers for {k} is: {v}.", rng.random())
    target = rng.randrange(n_keys)
    q = f"What is the special magic number for {keys[target]}? Answer with the number only."
    return {"task": "multikey_niah", "prompt": _chat(tokenizer, f"{hay}\n\n{q}"), "answers": [values[target]],
            "meta": {"ctx": ctx, "seed": seed}}


def variable_tracking(tokenizer, ctx: int, seed: int, hops: int = 3) -> Sample:
    rng = random.Random(seed + 202)
    value = str(rng.randrange(10000, 99999))
    names = ["".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(5)) for _ in range(hops + 1)]
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, hops + 1)]
    hay = _haystack(tokenizer, ctx, rng)
    for i, sentence in enumerate(chain):
        hay = _insert(hay, sentence, (i + 1) / (len(chain) + 1))
    q = f"Which variables are assigned the value {value}? List all their names."
    return {"task": "variable_tracking", "prompt": _chat(tokenizer, f"{hay}\n\n{q}"), "answers": names,
            "meta": {"ctx": ctx, "seed": seed, "multi": True}}


def common_words(tokenizer, ctx: int, seed: int, top: int = 3) -> Sample:
    rng = random.Random(seed + 303)
    frequent = rng.sample(WORDS, top)
    rare = [w for w in WORDS if w not in frequent]
    words = [w for w in frequent for _ in range(max(8, ctx // 60))]
    words += [rng.choice(rare) for _ in range(max(20, ctx // 7))]
    rng.shuffle(words)
    listing = " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))
    q = f"Above is a numbered list of words. What are the {top} most common words in the list? Answer with the words."
    return {"task": "common_words", "prompt": _chat(tokenizer, f"{listing}\n\n{q}"), "answers": frequent,
            "meta": {"ctx": ctx, "seed": seed, "multi": True}}


def speaker_qa(tokenizer, ctx: int, seed: int) -> Sample:
    """Who speaks a given line of a play in the context (answer: the speaker tag, e.g. ``Ham`` for Hamlet)."""
    rng = random.Random(seed + 404)
    hay = _haystack(tokenizer, ctx, rng)
    pattern = r"\n\n([A-Z][A-Za-z]{1,15})\.\n([^\n\[]{30,90})\n"
    turns = [(m.group(1), m.group(2).strip()) for m in re.finditer(pattern, hay)]
    if not turns:
        raise ValueError("no speaker lines in this haystack window")
    speaker, line = turns[rng.randrange(len(turns))]
    q = f'In the text above, which character says: "{line}"? Answer with the character name only.'
    return {"task": "speaker_qa", "prompt": _chat(tokenizer, f"{hay}\n\n{q}"), "answers": [speaker.strip()],
            "meta": {"ctx": ctx, "seed": seed}}


def score(sample: Sample, output: str) -> float:
    out = output.lower()
    hits = [a.lower() in out for a in sample["answers"]]
    return sum(hits) / len(hits) if sample["meta"].get("multi") else float(any(hits))


SYNTHETIC_TASKS = ("multikey_niah", "variable_tracking", "common_words")
QA_TASKS = ("speaker_qa",)


def synthetic_and_qa(tokenizer, contexts: list[int], seeds: list[int]) -> list[Sample]:
    samples = []
    for ctx in contexts:
        for seed in seeds:
            samples += [multikey_niah(tokenizer, ctx, seed), variable_tracking(tokenizer, ctx, seed),
                        common_words(tokenizer, ctx, seed)]
            try:
                samples.append(speaker_qa(tokenizer, ctx, seed))
            except ValueError:
                pass
    return samples

