"""Deterministic prompts built from the packaged haystack text and the real tokenizer."""

from __future__ import annotations

from sentencekv_vllm import fixtures

SHORT_QUESTIONS = [
    "What is the capital of France?",
    "Give me three tips for staying healthy.",
    "Explain what a hash table is in two sentences.",
    "Write a haiku about the sea.",
]
NEEDLE = "The secret passcode of the blue castle is 7291."
NEEDLE_Q = "What is the secret passcode of the blue castle? Answer with the number."


def chat(tokenizer, content: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)


def long_prompt(tokenizer, n_tokens: int, offset: int, task: str = "Summarize the text above in one sentence.") -> str:
    text = fixtures.haystack_text(offset=offset, n_chars=n_tokens * 6)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens]
    return chat(tokenizer, tokenizer.decode(ids) + "\n\n" + task)


def varied_prompts(tokenizer) -> list[str]:
    """8 prompts: 4 short, 3 of ~2k tokens, 1 of ~6k tokens."""
    out = [chat(tokenizer, q) for q in SHORT_QUESTIONS]
    out += [long_prompt(tokenizer, 2000, off) for off in (10_000, 300_000, 600_000)]
    out += [long_prompt(tokenizer, 6000, 100_000)]
    return out


def needle_prompt(tokenizer, n_tokens: int = 4500, depth: float = 0.4, seed: int = 3) -> str:
    return fixtures.needle_prompt(tokenizer, n_tokens, depth, NEEDLE, NEEDLE_Q, seed=seed)
