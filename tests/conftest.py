"""Shared fixtures: tiny random Llama models saved once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_models import build_tiny_llama, build_tiny_tokenizer


def _build(tmp_path_factory: pytest.TempPathFactory, name: str, chat_template: bool) -> Path:
    out = tmp_path_factory.mktemp(name)
    tokenizer = build_tiny_tokenizer(out, chat_template=chat_template)
    build_tiny_llama(out, tokenizer)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory with a tiny Llama + ChatML tokenizer (chat template set)."""
    return _build(tmp_path_factory, "tiny-llama-chat", chat_template=True)


@pytest.fixture(scope="session")
def tiny_model_dir_plain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory with a tiny Llama whose tokenizer has no chat template."""
    return _build(tmp_path_factory, "tiny-llama-plain", chat_template=False)


@pytest.fixture(scope="session")
def tiny_policy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with a peaked output distribution (init std 0.5, entropy ~1.7 nats): a
    default-init tiny model is near-uniform over its vocabulary, and LoRA on its inner layers
    barely moves its logits, so RL tests use this one."""
    out = tmp_path_factory.mktemp("tiny-llama-policy")
    tokenizer = build_tiny_tokenizer(out, chat_template=True)
    build_tiny_llama(out, tokenizer, initializer_range=0.5)
    return out
