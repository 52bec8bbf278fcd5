"""The memory planner (``python -m rlhf.plan``): parameter counts against real models, the byte
terms against hand-computed values, autograd's saved tensors and bitsandbytes' storage, the
planner's copies of code defaults, and the command line."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
from pathlib import Path

import pytest
import torch

from rlhf.plan import main
from rlhf.planning import memory
from rlhf.planning.memory import (
    PlanSettings,
    base_weight_bytes,
    kv_cache_bytes,
    plan_stage,
    resident_terms,
    trunk_saved_bytes,
)
from rlhf.planning.shapes import (
    PRESETS,
    PROJECTIONS,
    ModelShape,
    ModelShapeError,
    linear_params_per_layer,
    load_shape,
    lora_params,
    lora_params_per_layer,
    total_params,
)

REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = REPO / "models" / "SmolLM2-135M-Instruct"
# h=8, 1 layer, 2 heads of 4 (q: 8 features), 1 kv head (k, v: 4 features each), MLP 16, vocab 10.
SMALL = ModelShape(hidden=8, layers=1, heads=2, kv_heads=1, head_dim=4, intermediate=16, vocab=10, tied=True)


# -- parameter counts -----------------------------------------------------------------------------
def test_small_shape_counts_by_hand():
    # q 8x8 + k 8x4 + v 8x4 + o 8x8 + gate 8x16 + up 8x16 + down 16x8 = 64+32+32+64+128+128+128
    assert linear_params_per_layer(SMALL) == 576
    # + embedding 10x8 (tied: once) + norms 8 * (2 + 1)
    assert total_params(SMALL) == 576 + 80 + 24
    # r=2: r * (in + out) per projection: 2*16 + 2*12 + 2*12 + 2*16 + 2*24 + 2*24 + 2*24
    assert lora_params_per_layer(SMALL, 2, PROJECTIONS) == 256
    assert lora_params_per_layer(SMALL, 2, ("q_proj", "v_proj")) == 32 + 24
    with pytest.raises(ModelShapeError, match="unknown LoRA target"):
        lora_params(SMALL, 2, ("c_attn",))


@pytest.mark.parametrize("name, params", [("1b", 1_235_814_400), ("8b", 8_030_261_248), ("70b", 70_553_706_496)])
def test_llama_presets_have_the_published_parameter_counts(name, params):
    assert total_params(PRESETS[name]) == params


def test_param_count_of_the_tiny_test_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from rlhf.models.loading import LoraSettings, apply_lora

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), local_files_only=True)
    shape = load_shape(str(tiny_model_dir))
    assert total_params(shape) == sum(p.numel() for p in model.parameters())
    lora = apply_lora(model, LoraSettings(r=4))  # the stages' default targets
    assert lora_params(shape, 4, PROJECTIONS) == sum(p.numel() for p in lora.parameters() if p.requires_grad)


def test_param_count_of_the_135m_config_on_the_meta_device():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(SMOLLM2), local_files_only=True)
    with torch.device("meta"):  # shapes only: no weights are read or allocated
        model = AutoModelForCausalLM.from_config(config)
    shape = load_shape(str(SMOLLM2))
    assert shape == dataclasses.replace(PRESETS["135m"], source=shape.source)  # the preset is this config
    assert total_params(shape) == sum(p.numel() for p in model.parameters()) == 134_515_008
    peft = get_peft_model(model, LoraConfig(r=16, target_modules=list(PROJECTIONS)))
    assert lora_params(shape, 16, PROJECTIONS) == sum(p.numel() for p in peft.parameters() if p.requires_grad)


# -- bytes by hand -----------------------------------------------------------------------------------
def test_base_bytes_and_sharding():
    params = total_params(SMALL)
    assert base_weight_bytes(SMALL, "none", "bf16") == 2 * params
    assert base_weight_bytes(SMALL, "none", "fp32") == 4 * params
    # 4-bit: projections at nf4 (0.5 byte + a uint8 absmax per 64 + a float32 absmax per 64*256),
    # everything else float32 (prepare_model_for_kbit_training casts it).
    assert base_weight_bytes(SMALL, "4bit", "bf16") == int(576 * (0.5 + 1 / 64 + 4 / 16384)) + (params - 576) * 4
    # 8-bit: a byte per weight plus a float32 scale per output row (8+4+4+8+16+16+8 rows).
    assert base_weight_bytes(SMALL, "8bit", "bf16") == 576 + 64 * 4 + (params - 576) * 4

    one = PlanSettings(gpus=1, strategy="fsdp2")
    fsdp, ddp = PlanSettings(gpus=4, strategy="fsdp2"), PlanSettings(gpus=4, strategy="ddp")
    shape = PRESETS["8b"]
    whole = resident_terms(shape, one, "sft")[0]
    sharded, replicated = resident_terms(shape, fsdp, "sft")[0], resident_terms(shape, ddp, "sft")[0]
    assert sharded["base weights"] == whole["base weights"] // 4
    assert sharded["AdamW state"] == whole["AdamW state"] // 4
    assert replicated["base weights"] == whole["base weights"]
    assert replicated["DDP gradient buckets"] == replicated["gradients"]
    assert "FSDP unsharded root + 2 layers" in sharded and "FSDP unsharded root + 2 layers" not in whole


def test_optimizer_and_adapter_terms():
    s = PlanSettings(lora_r=2)
    terms = resident_terms(SMALL, s, "sft")[0]
    trainable = lora_params(SMALL, 2, PROJECTIONS)
    assert terms["adapters (float32)"] == 4 * trainable
    assert terms["gradients"] == 4 * trainable
    assert terms["AdamW state"] == 8 * trainable  # two float32 moments, no master copy
    # PPO with an adapter critic trains two adapters and a value head (hidden + 1), and holds
    # the frozen reward adapter beside them.
    ppo = resident_terms(SMALL, PlanSettings(lora_r=2, critic="adapter"), "ppo")[0]
    assert ppo["gradients"] == 4 * (2 * trainable + 9)
    assert ppo["adapters (float32)"] == 4 * (3 * trainable + 9)


def test_kv_cache_with_grouped_query_attention():
    shape = ModelShape(hidden=16, layers=2, heads=4, kv_heads=2, head_dim=4, intermediate=32, vocab=10, tied=True)
    s = PlanSettings(precision="bf16", prompt=6, response=4)
    # keys and values x layers x kv heads x head_dim x bytes x sequences x tokens
    assert kv_cache_bytes(shape, s, 3) == 2 * 2 * 2 * 4 * 2 * 3 * 10
    assert kv_cache_bytes(PRESETS["8b"], PlanSettings(prompt=512, response=512), 1) == 128 * 2**20


def test_a_quantized_base_shares_the_reward_adapter_and_separate_is_asked_for():
    shared = resident_terms(SMALL, PlanSettings(quant="none"), "ppo")[0]
    quantized = resident_terms(SMALL, PlanSettings(quant="4bit"), "ppo")[0]
    separate = resident_terms(SMALL, PlanSettings(quant="4bit", reward="separate"), "ppo")[0]
    assert "reward model (separate)" not in shared
    assert "reward model (separate)" not in quantized
    assert "reward model (separate)" in separate


def test_checkpointing_and_verdict():
    s = PlanSettings(gpus=8, strategy="fsdp2", gpu_mem_gib=80)
    plan = plan_stage(PRESETS["8b"], s, "sft")
    assert plan.total(True) < plan.total(False)
    assert plan.train_checkpointed["activations"] < plan.train["activations"] / 5
    small_gpu = PlanSettings(gpus=8, strategy="fsdp2", gpu_mem_gib=plan.total(True) / 2**30 + 0.01)
    plan = plan_stage(PRESETS["8b"], small_gpu, "sft")
    assert plan.total(True) <= small_gpu.gpu_mem_gib * 2**30 < plan.total(False)


# -- against what torch and bitsandbytes hold ----------------------------------------------------------
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("padded", [True, False])
def test_trunk_activations_equal_autograds_saved_tensors(precision, padded):
    """The planner's activation bytes are what autograd keeps for backward in a LoRA pass."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf.models.forward import adapter_inputs_left_to_autocast, trunk_hidden

    shape = ModelShape(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=50, tied=True)
    config = LlamaConfig(vocab_size=50, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=True)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = get_peft_model(LlamaForCausalLM(config).to(dtype), LoraConfig(r=4, target_modules=list(PROJECTIONS)))
    ids = torch.randint(0, 50, (2, 12))
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :3] = 0
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    with hooks, autocast, adapter_inputs_left_to_autocast(model, "cpu"):
        trunk_hidden(model, ids, mask)
    planned = trunk_saved_bytes(shape, PlanSettings(precision=precision, lora_r=4, padded=padded), 2, 12)
    assert planned == sum(saved.values())


def test_quantized_base_bytes_match_bitsandbytes(tiny_model_dir):
    """What stays unquantized (embeddings, norms: float32 after prepare_model_for_kbit_training)
    and the bytes of the quantized projections, against the loaded model."""
    from rlhf.models.loading import (
        LoraSettings,
        ModelSettings,
        apply_lora,
        load_causal_lm,
    )

    shape = load_shape(str(tiny_model_dir))
    for quant in ("4bit", "8bit"):
        model = apply_lora(load_causal_lm(ModelSettings(str(tiny_model_dir), dtype="bfloat16", quantization=quant)),
                           LoraSettings(r=4))
        plain = quantized = 0
        for name, p in model.named_parameters():
            if "lora_" in name:
                continue
            state = getattr(p, "quant_state", None)
            if state is None and getattr(p, "SCB", None) is None:
                assert p.dtype == torch.float32, name
                plain += p.numel() * 4
                continue
            quantized += p.untyped_storage().nbytes()
            if state is not None:
                quantized += state.absmax.untyped_storage().nbytes()
                quantized += state.state2.absmax.untyped_storage().nbytes() if state.state2 is not None else 0
            else:
                quantized += p.SCB.untyped_storage().nbytes()
        planned = base_weight_bytes(shape, quant, "bf16")
        unquantized = (total_params(shape) - shape.layers * linear_params_per_layer(shape)) * 4
        assert plain == unquantized
        assert planned - unquantized == pytest.approx(quantized, rel=0.002)


def test_planner_copies_of_code_defaults():
    from rlhf.models import logprobs
    from rlhf.models.loading import LORA_TARGETS
    from rlhf.ppo.module import PPOModule
    from rlhf.rejection.module import RejectionSamplingModule

    assert list(PROJECTIONS) == LORA_TARGETS["llama"]
    assert memory.HEAD_CHUNK_POSITIONS == logprobs.HEAD_CHUNK_POSITIONS
    assert memory.HEAD_CHUNK_POSITIONS_HALF == logprobs.HEAD_CHUNK_POSITIONS_HALF
    assert memory.HEAD_VOCAB_BLOCK == logprobs.HEAD_VOCAB_BLOCK
    ppo = inspect.signature(PPOModule.__init__).parameters
    rejection = inspect.signature(RejectionSamplingModule.__init__).parameters
    assert memory.PPO_SAMPLES_PER_PROMPT == ppo["samples_per_prompt"].default
    assert memory.REJECTION_SAMPLES_PER_PROMPT == rejection["samples_per_prompt"].default
    assert memory.REJECTION_MINIBATCH == rejection["minibatch_size"].default
    assert rejection["micro_batch_size"].default is None  # micro-batch = minibatch


# -- the command --------------------------------------------------------------------------------------
def test_cli_prints_a_verdict_per_stage(tiny_model_dir, capsys):
    assert main(["--model", str(tiny_model_dir), "--gpus", "1", "--gpu-mem", "80"]) == 0
    out = capsys.readouterr().out
    for stage in memory.STAGES:
        assert f"== {stage} ==" in out
    assert out.count("verdict on 80 GiB") == len(memory.STAGES)
    assert "fits" in out and "does not fit" not in out
    # The assumed 2 GiB CUDA overhead alone does not fit in 1 GiB.
    assert main(["--model", str(tiny_model_dir), "--gpu-mem", "1", "--stages", "sft"]) == 0
    assert "does not fit" in capsys.readouterr().out


def test_cli_json_parses(capsys):
    assert main(["--model", "70b", "--gpus", "8", "--strategy", "fsdp2", "--quant", "4bit", "--reward", "separate",
                 "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["model"]["params"] == 70_553_706_496
    assert set(record["stages"]) == set(memory.STAGES)
    ppo = record["stages"]["ppo"]
    assert set(ppo["fits"]) == {"no_checkpointing", "checkpointing"}
    assert ppo["total_bytes"]["checkpointing"] < ppo["total_bytes"]["no_checkpointing"]
    assert "reward model (separate)" in ppo["resident"]


def test_cli_bad_model_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["--model", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--model", "no-such-org/no-such-model"]) == 2
    assert "not in the HF cache" in capsys.readouterr().err
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert main(["--model", str(tmp_path / "gpt2")]) == 2
    assert "not a Llama-style decoder" in capsys.readouterr().err


def test_cli_help_and_bad_stage(capsys):
    with pytest.raises(SystemExit) as exit_help:
        main(["--help"])
    assert exit_help.value.code == 0
    assert "--gpu-mem" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_bad:
        main(["--model", "1b", "--stages", "sft,grpo"])
    assert exit_bad.value.code == 2


@pytest.mark.slow
def test_validation_benchmark_runs_and_agrees_on_the_tiny_sft(tmp_path):
    """``python -m benchmarks.plan_validation`` on its smallest row: the probe and one SFT fit in
    worker subprocesses, the planner's total within 25% of the measured peak."""
    from benchmarks.plan_validation import main as validate

    out = tmp_path / "plan_validation.json"
    validate(["--models", "tiny", "--stages", "sft", "--single-only", "--checkpointing-stages", "",
              "--default-malloc-stages", "", "--work-dir", str(tmp_path / "work"), "--out", str(out)])
    report = json.loads(out.read_text())
    (row,) = report["rows"]
    assert row["stage"] == "sft" and row["processes"] == 1
    assert report["settings"]["overhead_probe_mib"] > 0
    assert row["within_25pct"], row
