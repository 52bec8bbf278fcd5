"""Shared fixtures: tiny random Llama models saved once per session.

The tests run offline unless the environment says otherwise: huggingface_hub reads
``HF_HUB_OFFLINE`` once, when imported, so it is set here, before anything imports it. Tests
that check the unset case (``test_no_network.py``) remove both from their subprocess's env.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from tiny_models import build_tiny_llama, build_tiny_tokenizer  # noqa: E402


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


@pytest.fixture(scope="session")
def tiny_quickstart(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict:
    """SFT -> RM -> PPO on the tiny model in the quickstart's layout (``runs/``, ``outputs/``);
    see :func:`run_builders.build_tiny_quickstart`."""
    from run_builders import build_tiny_quickstart

    return build_tiny_quickstart(tmp_path_factory.mktemp("tiny-quickstart"), tiny_model_dir)


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict:
    """A 2-trial offline ``rlhf.sweep`` of a tiny reward-model config (grid over lr x LoRA
    rank): ``{"spec", "out", "trials"}``."""
    pytest.importorskip("sweeps", reason="W&B's sweep engine: pip install -e '.[sweeps]'")
    from run_builders import write_tiny_rm_sweep

    from rlhf.sweep import run_sweep

    root = tmp_path_factory.mktemp("tiny-sweep")
    spec = write_tiny_rm_sweep(root, tiny_model_dir)
    out = root / "sweep"
    with pytest.MonkeyPatch.context() as env:  # the trials' offline W&B runs are checked
        env.setenv("WANDB_MODE", "offline")
        trials = run_sweep(spec, count=2, out_dir=out, cwd=root, timeout=300)
    return {"spec": spec, "out": out, "trials": trials}


@pytest.fixture(autouse=True)
def _no_shared_wandb_service(monkeypatch: pytest.MonkeyPatch) -> None:
    """``wandb.init`` in a test publishes its wandb-core service in ``WANDB_SERVICE``, and child
    processes attach to it: a later test's ``rlhf.fit`` subprocesses would share one service
    (a resumed run then fails with 'run ID is in use'). Each test starts without one."""
    monkeypatch.setenv("WANDB_SERVICE", "")
