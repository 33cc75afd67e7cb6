"""Every documented option is turned on by at least one end-to-end test: a green suite that never sets an option
proves nothing about it. Server-level keys: some server in ``tests/e2e/servers.py`` sets each one to a value other
than its default. Per-request keys (``vllm_xargs.sentencekv_*``): some end-to-end test sends each one."""

from __future__ import annotations

from pathlib import Path

from sentencekv_vllm.config import REQUEST_ARG_PREFIX, REQUEST_FLAGS, REQUEST_OVERRIDABLE, SentenceKVConfig
from tests.e2e.servers import SERVER_CONFIGS

E2E = Path(__file__).parent / "e2e"


def test_every_config_key_is_set_off_its_default_by_some_e2e_server():
    defaults = SentenceKVConfig().to_dict()
    unset = [key for key, default in defaults.items()
             if not any(key in cfg and cfg[key] != default for cfg in SERVER_CONFIGS.values())]
    assert not unset, f"no end-to-end server turns these options on: {unset}"


def test_server_configs_are_valid_and_known_keys():
    for cfg in SERVER_CONFIGS.values():
        SentenceKVConfig.from_dict(cfg)          # raises naming the key


def test_every_per_request_key_is_sent_by_some_e2e_test():
    sources = "\n".join(p.read_text() for p in E2E.rglob("test_*.py"))
    missing = [REQUEST_ARG_PREFIX + name for name in REQUEST_OVERRIDABLE + REQUEST_FLAGS
               if f"{REQUEST_ARG_PREFIX}{name}=" not in sources and f'"{REQUEST_ARG_PREFIX}{name}":' not in sources]
    assert not missing, f"no end-to-end test sends: {missing}"
