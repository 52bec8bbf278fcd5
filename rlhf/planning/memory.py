"""Memory per GPU of each stage's training step, from a model's shape and the run's settings.

Pure arithmetic on :class:`rlhf.planning.shapes.ModelShape` (no torch): every term counts the
tensors a stage's code holds at its peak. ``N`` is tokens in a pass (sequences x length), ``a``
the activation bytes (2 for ``bf16``, i.e. ``bf16-mixed`` with a bf16 frozen base, 4 for
``fp32``). The terms and why they are what they are: ``docs/scaling.md#memory-planner``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rlhf.planning.shapes import (
    PROJECTIONS,
    ModelShape,
    embedding_params,
    largest_linear,
    linear_params_per_layer,
    lora_params,
    lora_params_per_layer,
    total_params,
)

GIB = 2**30
STAGES = ("sft", "rm", "dpo", "ppo", "rejection")
SAMPLING_STAGES = ("ppo", "rejection")
#: Assumed, not measured: CUDA context, cuBLAS and NCCL workspaces and caching-allocator slack
#: per process. ``--overhead-gib`` replaces it.
CUDA_OVERHEAD_GIB = 2.0
# Code defaults the planner mirrors (tests/test_plan.py checks each against the code):
HEAD_CHUNK_POSITIONS = 128  # rlhf.models.logprobs: response positions per LM-head call
HEAD_CHUNK_POSITIONS_HALF = 64  # ... when the head's matmul runs in bf16
HEAD_VOCAB_BLOCK = 8192  # rlhf.models.logprobs: vocabulary rows per bf16 head matmul
PPO_SAMPLES_PER_PROMPT = 1  # PPOModule(samples_per_prompt)
REJECTION_SAMPLES_PER_PROMPT = 4  # RejectionSamplingModule(samples_per_prompt)
REJECTION_MINIBATCH = 8  # RejectionSamplingModule(minibatch_size); micro-batch = minibatch
# bitsandbytes nf4 with double quantization (rlhf.models.loading.bnb_config): 4 bits a weight,
# a uint8 absmax per 64-weight block, a float32 absmax per 256 blocks.
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)


@dataclass
class PlanSettings:
    """One planned run, per GPU. ``batch`` is sequences per training pass for ``sft``,
    comparisons (two sequences each) for ``rm`` and ``dpo``, and prompts per rollout for
    ``ppo`` and ``rejection``; lengths are in tokens."""

    gpus: int = 1
    gpu_mem_gib: float = 80.0
    strategy: Literal["ddp", "fsdp2", "fsdp"] = "ddp"
    lora_r: int = 16
    lora_targets: tuple[str, ...] = PROJECTIONS
    quant: Literal["none", "8bit", "4bit"] = "none"
    precision: Literal["bf16", "fp32"] = "bf16"
    batch: int = 8
    prompt: int = 512
    response: int = 512
    samples_per_prompt: int | None = None
    critic: Literal["shared", "adapter"] = "shared"
    reward: Literal["shared", "separate"] = "shared"
    ppo_micro_batch: int | None = None
    rejection_micro_batch: int | None = None
    device: Literal["cuda", "cpu"] = "cuda"
    overhead_gib: float | None = None
    padded: bool = True

    def __post_init__(self) -> None:
        checks = {"gpus": self.gpus, "lora_r": self.lora_r, "batch": self.batch, "prompt": self.prompt,
                  "response": self.response, "samples_per_prompt": self.samples_per_prompt or 1,
                  "ppo_micro_batch": self.ppo_micro_batch or 1, "rejection_micro_batch": self.rejection_micro_batch or 1}
        bad = [f"{k} = {v}" for k, v in checks.items() if v < 1]
        if bad or self.gpu_mem_gib <= 0:
            raise ValueError(f"must be >= 1: {', '.join(bad)}" if bad else "gpu_mem_gib must be > 0")
        for key, allowed in (("strategy", ("ddp", "fsdp2", "fsdp")), ("quant", ("none", "8bit", "4bit")),
                             ("precision", ("bf16", "fp32")), ("critic", ("shared", "adapter")),
                             ("reward", ("shared", "separate")), ("device", ("cuda", "cpu"))):
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} must be one of {', '.join(allowed)}, got {getattr(self, key)!r}")

    @property
    def act_bytes(self) -> int:
        return 2 if self.precision == "bf16" else 4

    @property
    def sharded(self) -> bool:
        return self.strategy in ("fsdp2", "fsdp") and self.gpus > 1

    @property
    def overhead_bytes(self) -> int:
        default = CUDA_OVERHEAD_GIB if self.device == "cuda" else 0.0
        return int((default if self.overhead_gib is None else self.overhead_gib) * GIB)


@dataclass
class StagePlan:
    """One stage's memory per GPU: ``resident`` terms held all step, the training pass's
    ``train`` terms without and ``train_checkpointed`` with gradient checkpointing, and the
    ``no_grad`` terms of the passes without gradients (generation, reference, reward); bytes each."""

    stage: str
    resident: dict[str, int] = field(default_factory=dict)
    train: dict[str, int] = field(default_factory=dict)
    train_checkpointed: dict[str, int] = field(default_factory=dict)
    no_grad: dict[str, int] = field(default_factory=dict)
    overhead: int = 0
    notes: list[str] = field(default_factory=list)

    def total(self, checkpointing: bool) -> int:
        """Resident + the larger of the training and no-grad phases + overhead."""
        train = self.train_checkpointed if checkpointing else self.train
        return sum(self.resident.values()) + max(sum(train.values()), sum(self.no_grad.values())) + self.overhead


# -- weights -------------------------------------------------------------------------------------
def base_weight_bytes(shape: ModelShape, quant: str, precision: str) -> int:
    """The frozen base: every parameter at 2 (bf16) or 4 (fp32) bytes; quantized, the layers'
    projections at nf4 (:data:`NF4_BYTES_PER_PARAM`) or int8 (1 byte + a float32 scale per
    output row), while embeddings, LM head and norms stay unquantized and
    ``prepare_model_for_kbit_training`` casts them to float32."""
    a = 2 if precision == "bf16" else 4
    if quant == "none":
        return total_params(shape) * a
    linear = shape.layers * linear_params_per_layer(shape)
    rest = (total_params(shape) - linear) * 4
    if quant == "4bit":
        return int(linear * NF4_BYTES_PER_PARAM) + rest
    rows = shape.layers * (shape.heads * shape.head_dim + 2 * shape.kv_heads * shape.head_dim + 2 * shape.hidden
                           + 2 * shape.intermediate)  # output features of the seven projections
    return linear + rows * 4 + rest


def fsdp_gathered_bytes(shape: ModelShape, s: PlanSettings) -> int:
    """FSDP's unsharded copies during a pass: the root (embeddings, tied or untied LM head,
    final norm; FSDP2 keeps the root unsharded from forward to backward) and two decoder
    layers (the one running and the one prefetched)."""
    if not s.sharded or s.quant != "none":
        return 0
    w = s.act_bytes
    layer = (linear_params_per_layer(shape) + 2 * shape.hidden) * w
    layer += lora_params_per_layer(shape, s.lora_r, s.lora_targets) * 4
    return (embedding_params(shape) + shape.hidden) * w + 2 * layer


# -- activations of a pass with gradients --------------------------------------------------------
def layer_saved_per_token(shape: ModelShape, s: PlanSettings, seq: int) -> int:
    """Bytes one decoder layer keeps for backward per token (frozen base, LoRA on
    ``s.lora_targets``, SDPA attention): each RMSNorm's float32 input and ``rsqrt``; the
    LoRA inputs (the norms' outputs, the down projection's input) and each adapter's ``[r]``
    middle; attention's q, k, v (repeated to all heads when a padding mask is passed), output
    and float32 log-sum-exp; a padding mask as a float ``[seq]`` row per token; the MLP's gate,
    SiLU and up outputs."""
    h, i, a, t = shape.hidden, shape.intermediate, s.act_bytes, set(s.lora_targets)
    qd, kvd = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    norms = 2 * (4 * h + 4)
    lora_inputs = a * h * bool(t & {"q_proj", "k_proj", "v_proj"}) + a * h * bool(t & {"gate_proj", "up_proj"})
    lora_inputs += a * i * ("down_proj" in t) + a * s.lora_r * len(t)
    kv = qd if s.padded else kvd
    attention = a * (2 * qd + 2 * kv) + 4 * shape.heads + (a * seq if s.padded else 0)
    return norms + lora_inputs + attention + 3 * a * i


def autocast_adapter_copies(shape: ModelShape, s: PlanSettings, adapters: int = 1) -> int:
    """bf16 autocast keeps a bf16 copy of every float32 LoRA weight a pass used, for backward."""
    return 2 * adapters * lora_params(shape, s.lora_r, s.lora_targets) if s.precision == "bf16" else 0


def trunk_saved_bytes(shape: ModelShape, s: PlanSettings, sequences: int, seq: int) -> int:
    """Saved for backward by a decoder pass over ``sequences x seq`` tokens without gradient
    checkpointing: every layer's :func:`layer_saved_per_token` (layer 0's input norm keeps
    nothing, the final norm its input), the rotary cos/sin and the bf16 adapter copies, less
    those of layer 0's q/k/v ``A`` matrices (its input needs no gradient, so neither do they)."""
    n = sequences * seq
    first = len(set(s.lora_targets) & {"q_proj", "k_proj", "v_proj"}) * s.lora_r * shape.hidden
    copies = autocast_adapter_copies(shape, s) - (2 * first if s.precision == "bf16" else 0)
    return shape.layers * layer_saved_per_token(shape, s, seq) * n + 2 * s.act_bytes * shape.head_dim * n + copies


def trunk_checkpointed_bytes(shape: ModelShape, s: PlanSettings, sequences: int, seq: int) -> int:
    """The same pass with gradient checkpointing: each layer keeps only its input ``[N, h]``
    (and the boolean padding mask once); backward recomputes one layer at a time, whose saved
    tensors exist again while it runs."""
    n = sequences * seq
    one_layer = layer_saved_per_token(shape, s, seq) * n + autocast_adapter_copies(shape, s) // shape.layers
    mask = sequences * seq * seq if s.padded else 0
    return shape.layers * s.act_bytes * shape.hidden * n + one_layer + (4 * shape.hidden + 4) * n + mask


def backward_transient_bytes(shape: ModelShape, s: PlanSettings, sequences: int, seq: int) -> int:
    """Gradients of one layer's activations while backward runs through it: the MLP's three
    ``[N, intermediate]`` and two ``[N, hidden]`` (the residual stream's and a norm's)."""
    return sequences * seq * s.act_bytes * (3 * shape.intermediate + 2 * shape.hidden)


# -- the LM head -----------------------------------------------------------------------------------
def sft_logits_bytes(shape: ModelShape, s: PlanSettings, sequences: int) -> int:
    """SFT's head runs on the ``sequences x response`` labelled positions at once
    (:func:`rlhf.sft.loss.labelled_nll`): float32 log-softmax kept for backward, then in
    backward the NLL's ``[n, V]`` gradient and the log-softmax's: three float32 ``[n, V]``."""
    return 12 * sequences * s.response * shape.vocab


def head_chunk_positions(s: PlanSettings, sequences: int) -> int:
    """Positions per LM-head call of :func:`rlhf.models.logprobs.response_logprobs`: whole rows,
    ``HEAD_CHUNK_POSITIONS // response`` of them (64 in bf16), at least one."""
    per_call = HEAD_CHUNK_POSITIONS_HALF if s.precision == "bf16" else HEAD_CHUNK_POSITIONS
    return min(sequences, max(1, per_call // s.response)) * s.response


def chunked_logits_bytes(shape: ModelShape, s: PlanSettings, sequences: int, entropy: bool = False) -> int:
    """One head call's float32 ``[n_c, V]`` logits (a second with entropy) and, in bf16, one
    ``[n_c, 8192]`` block of the half-precision matmul."""
    n_c = head_chunk_positions(s, sequences)
    block = 2 * n_c * min(shape.vocab, HEAD_VOCAB_BLOCK) if s.precision == "bf16" else 0
    return 4 * n_c * shape.vocab * (2 if entropy else 1) + block


def head_jacobian_bytes(shape: ModelShape, s: PlanSettings, sequences: int) -> int:
    """A frozen head's backward keeps ``d logp / d hidden`` ``[sequences x response, hidden]``
    in float32 (:func:`rlhf.models.logprobs.head_logprobs`), not the logits."""
    return 4 * sequences * s.response * shape.hidden


# -- passes without gradients, generation ---------------------------------------------------------
def no_grad_pass_bytes(shape: ModelShape, s: PlanSettings, sequences: int, seq: int, keep_hidden: bool = True) -> int:
    """A forward without gradients: the largest layer's temporaries (residual, float32 norm
    input and its output, q/k/v/attention output, the MLP's three ``[N, intermediate]``, a float
    padding mask) and the returned final hidden states."""
    n, a, h = sequences * seq, s.act_bytes, shape.hidden
    qd = shape.heads * shape.head_dim
    layer = n * (2 * a * h + 4 * h + 4 * a * qd + 3 * a * shape.intermediate)
    mask = a * sequences * seq * seq if s.padded else 0
    return layer + mask + (n * a * h if keep_hidden else 0)


def kv_cache_bytes(shape: ModelShape, s: PlanSettings, sequences: int) -> int:
    """Keys and values of every layer for ``sequences x (prompt + response)`` tokens."""
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * s.act_bytes * sequences * (s.prompt + s.response)


def generation_terms(shape: ModelShape, s: PlanSettings, sequences: int) -> dict[str, int]:
    """Sampling ``sequences`` responses with the KV cache: the full cache, plus the larger of the
    prompt's prefill pass and a decoding step (four float32 ``[sequences, V]`` buffers for
    logits and sampler, one layer's cache re-allocated as it grows)."""
    prefill = no_grad_pass_bytes(shape, s, sequences, s.prompt, keep_hidden=False)
    per_layer = kv_cache_bytes(shape, s, sequences) // shape.layers
    decode = 16 * sequences * shape.vocab + per_layer
    record = sequences * s.response * shape.hidden * 4 if s.precision == "fp32" else 0
    return {"kv cache": kv_cache_bytes(shape, s, sequences), "generation temporaries": max(prefill, decode) + record}


# -- the stages ------------------------------------------------------------------------------------
def trainable_adapter_params(shape: ModelShape, s: PlanSettings, stage: str) -> int:
    """Trained parameters: the LoRA adapter, plus PPO's value adapter (``critic: adapter``) and
    value head, or the reward model's score head."""
    count = lora_params(shape, s.lora_r, s.lora_targets)
    if stage == "ppo":
        count += shape.hidden + 1 + (count if s.critic == "adapter" else 0)
    elif stage == "rm":
        count += shape.hidden + 1
    return count


def reward_is_separate(stage: str, s: PlanSettings) -> bool:
    """A sampling stage scores with its own reward model when asked (``--reward separate``);
    otherwise :func:`rlhf.models.scorers.load_scorer` loads the RM adapter on the policy's base,
    quantized or not."""
    return stage in SAMPLING_STAGES and s.reward == "separate"


def resident_terms(shape: ModelShape, s: PlanSettings, stage: str) -> tuple[dict[str, int], list[str]]:
    """What a process holds all step: weights, adapters, gradients, AdamW state (two float32
    moments; the LoRA weights are float32 already, so no master copy), FSDP's unsharded
    copies, DDP's gradient buckets."""
    notes: list[str] = []
    shard = s.gpus if s.sharded else 1
    base = base_weight_bytes(shape, s.quant, s.precision)
    trainable = trainable_adapter_params(shape, s, stage)
    frozen_adapters = lora_params(shape, s.lora_r, s.lora_targets) if stage in SAMPLING_STAGES else 0
    terms = {"base weights": base // (1 if s.quant != "none" else shard)}
    if s.quant != "none":
        notes.append("activations under a quantized base are counted as for an unquantized one (not validated)")
    if s.sharded and s.quant != "none":
        notes.append("a quantized base is counted whole on every GPU: each process loads it onto its GPU "
                     "(device_map), and FSDP sharding of bitsandbytes weights is untested here")
    if reward_is_separate(stage, s):
        # load_scorer gives it the dtype of the policy's first parameter: the embeddings, which
        # prepare_model_for_kbit_training made float32 in a quantized base.
        rm_bytes = 4 if s.quant != "none" else s.act_bytes
        terms["reward model (separate)"] = total_params(shape) * rm_bytes + 4 * (shape.hidden + 1)
        notes.append("the reward model is a separate model (same shape assumed"
                     + (", float32: a quantized base's embeddings are" if s.quant != "none" else "")
                     + "), and FSDP does not shard it: whole on every GPU")
        frozen_adapters = 0
    terms["adapters (float32)"] = 4 * (trainable + frozen_adapters) // shard
    terms["gradients"] = 4 * trainable // shard
    terms["AdamW state"] = 8 * trainable // shard
    if s.strategy == "ddp" and s.gpus > 1:
        terms["DDP gradient buckets"] = 4 * trainable
    if stage == "ppo":
        rows = s.batch * (s.samples_per_prompt or PPO_SAMPLES_PER_PROMPT)
        terms["rollout buffer"] = rows * (16 * (s.prompt + s.response) + 48 * s.response)
    gathered = fsdp_gathered_bytes(shape, s)
    if gathered:
        terms["FSDP unsharded root + 2 layers"] = gathered
    return terms, notes


def train_pass(shape: ModelShape, s: PlanSettings, sequences: int, seq: int, trunks: int,
               head: dict[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    """A forward/backward over ``sequences x seq`` tokens through ``trunks`` decoder passes
    (PPO's adapter critic makes two) with the ``head`` terms; without and with checkpointing."""
    backward = backward_transient_bytes(shape, s, sequences, seq)
    dequant = largest_linear(shape) * s.act_bytes if s.quant != "none" else 0
    extra = {**head, "backward temporaries": backward}
    if dequant:
        extra["dequantized weight"] = dequant
    plain = {"activations": trunks * trunk_saved_bytes(shape, s, sequences, seq), **extra}
    checkpointed = {"activations": trunks * trunk_checkpointed_bytes(shape, s, sequences, seq), **extra}
    return plain, checkpointed


def plan_stage(shape: ModelShape, s: PlanSettings, stage: str) -> StagePlan:
    """The :class:`StagePlan` of ``stage`` (one of :data:`STAGES`) for ``s``."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    seq = s.prompt + s.response
    resident, notes = resident_terms(shape, s, stage)
    plan = StagePlan(stage, resident=resident, overhead=s.overhead_bytes, notes=notes)
    if stage == "sft":
        plan.train, plan.train_checkpointed = train_pass(
            shape, s, s.batch, seq, 1, {"LM-head logits": sft_logits_bytes(shape, s, s.batch)})
    elif stage == "rm":
        plan.train, plan.train_checkpointed = train_pass(shape, s, 2 * s.batch, seq, 1, {})
    elif stage == "dpo":
        n = 2 * s.batch
        head = {"LM-head logits": chunked_logits_bytes(shape, s, n), "LM-head jacobian": head_jacobian_bytes(shape, s, n)}
        plan.train, plan.train_checkpointed = train_pass(shape, s, n, seq, 1, head)
        plan.no_grad = {"reference pass": no_grad_pass_bytes(shape, s, n, seq) + chunked_logits_bytes(shape, s, n)}
    elif stage == "ppo":
        rows = s.batch * (s.samples_per_prompt or PPO_SAMPLES_PER_PROMPT)
        micro = min(rows, s.ppo_micro_batch or rows)
        head = {"LM-head logits": chunked_logits_bytes(shape, s, micro),
                "LM-head jacobian": head_jacobian_bytes(shape, s, micro)}
        plan.train, plan.train_checkpointed = train_pass(
            shape, s, micro, seq, 2 if s.critic == "adapter" else 1, head)
        generation = generation_terms(shape, s, rows)
        passes = no_grad_pass_bytes(shape, s, rows, seq) + chunked_logits_bytes(shape, s, rows, entropy=True)
        plan.no_grad = _no_grad_phase(generation, passes)
    else:  # rejection
        rows = s.batch * (s.samples_per_prompt or REJECTION_SAMPLES_PER_PROMPT)
        micro = s.rejection_micro_batch or min(REJECTION_MINIBATCH, s.batch)
        head = {"LM-head logits": chunked_logits_bytes(shape, s, micro),
                "LM-head jacobian": head_jacobian_bytes(shape, s, micro)}
        plan.train, plan.train_checkpointed = train_pass(shape, s, micro, seq, 1, head)
        generation = generation_terms(shape, s, rows)
        passes = no_grad_pass_bytes(shape, s, rows, seq) + chunked_logits_bytes(shape, s, rows)
        plan.no_grad = _no_grad_phase(generation, passes)
        notes.append(f"samples: {rows} ({s.batch} prompts x {rows // s.batch}); training micro-batch {micro}")
    return plan


def _no_grad_phase(generation: dict[str, int], passes: int) -> dict[str, int]:
    """Generation, then the no-grad passes over the sampled sequences (the cache is freed by
    then): the larger of the two, named by its parts."""
    if sum(generation.values()) >= passes:
        return generation
    return {"no-grad passes (policy, reference, reward)": passes}


def plan_all(shape: ModelShape, s: PlanSettings, stages: tuple[str, ...] = STAGES) -> dict[str, StagePlan]:
    """:func:`plan_stage` for each of ``stages``."""
    return {stage: plan_stage(shape, s, stage) for stage in stages}
