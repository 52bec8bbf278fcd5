"""Loading tokenizers and causal LMs (optionally quantized), and wrapping them with LoRA.

Model names resolve to a local directory first (:func:`resolve_model_path`), so a missing
model fails in seconds with :class:`ModelNotFoundError` instead of after the Hub client's
retry loop. Everything here is device-agnostic: quantized models go to the current
accelerator (``LOCAL_RANK`` aware), other models load on the CPU and are moved by Lightning.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

PREPARE_HINT = "For the quickstart model run `python -m rlhf.models.prepare` (writes models/SmolLM2-135M-Instruct)."
HUB_PROBE_TIMEOUT_S = float(os.environ.get("RLHF_HUB_PROBE_TIMEOUT", "5"))

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")
# Top-level repo files worth downloading for a transformers model (no ONNX/GGUF/TF/Flax copies).
_HUB_FILE_SUFFIXES = (".json", ".safetensors", ".model", ".txt", ".jinja", ".py", ".tiktoken", ".bin")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")

_ATTN_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_NEOX = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
LORA_TARGETS: dict[str, list[str]] = {
    **{
        t: _ATTN_MLP
        for t in (
            "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
            "gemma3_text", "olmo", "olmo2", "granite", "smollm3", "cohere", "stablelm", "deepseek_v2",
        )
    },
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": _NEOX,
    "falcon": _NEOX,
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gptj": ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"],
    "bloom": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}
_HEAD_NAMES = {"lm_head", "score", "classifier", "v_head", "embed_out", "value_head"}


class ModelNotFoundError(FileNotFoundError):
    """A model is neither a local directory nor reachable in the HF cache / on the Hub."""


@dataclass
class LoraSettings:
    """LoRA hyper-parameters. ``target_modules=None`` picks :func:`default_lora_targets`."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | None = None


@dataclass
class ModelSettings:
    """What to load and how.

    ``dtype="auto"`` is bf16 on a CUDA device with bf16 support, else float32; a frozen base
    (LoRA or quantized) loaded for a bf16 run is bf16 on any device (see :func:`resolve_dtype`).
    ``quantization`` loads the linear layers with bitsandbytes (nf4 + double quant for 4bit).
    ``train_top_layers`` (full fine-tuning only, no ``lora``) trains just the top N decoder
    blocks and what follows them (see :func:`freeze_lower_layers`): backward stops at the
    lowest trained block, so a step costs less than with LoRA on every layer.
    """

    name_or_path: str
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    lora: LoraSettings | None = None
    quantization: Literal["4bit", "8bit"] | None = None
    gradient_checkpointing: bool = False
    revision: str | None = None
    trust_remote_code: bool = False
    train_top_layers: int | None = None

    def __post_init__(self) -> None:
        self.name_or_path = os.fspath(self.name_or_path)  # a Path would not be checkpoint-safe
        if self.train_top_layers is not None:
            if self.train_top_layers < 1:
                raise ValueError(f"train_top_layers must be >= 1 or None, got {self.train_top_layers}")
            if self.lora is not None or self.quantization is not None:
                raise ValueError(
                    "train_top_layers is for full fine-tuning: it cannot be combined with lora or "
                    "quantization (which freeze the whole base)"
                )


def resolve_dtype(name: str, precision: str | None = None) -> torch.dtype:
    """Map a dtype name (``auto``, ``float32``, ``bfloat16``, ``float16`` or bf16/fp16/fp32) to a torch dtype.

    ``auto`` is bf16 on a CUDA device with bf16 support, or when ``precision`` (a Lightning
    precision such as ``bf16-mixed``) is a bf16 one; else float32. Pass ``precision`` only for
    weights that stay frozen: bf16 autocast re-casts a float32 weight that does not require
    grad on every forward (its cast cache keeps only trainable leaves), which on a CPU makes
    memory-bound decoding slower than with bf16 weights; trained weights stay float32.
    """
    if isinstance(name, torch.dtype):
        return name
    key = str(name).lower().removeprefix("torch.")
    if key == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if precision is not None and str(precision).startswith("bf16"):
            return torch.bfloat16
        return torch.float32
    if key not in _DTYPES:
        raise ValueError(f"Unknown dtype {name!r}; expected one of auto, float32, bfloat16, float16.")
    return _DTYPES[key]


def is_complete_model_dir(path: str | os.PathLike, require_tokenizer: bool = True) -> bool:
    """True if ``path`` holds a config.json, all weight files (shards included) and, optionally, a tokenizer."""
    p = Path(path)
    if not (p / "config.json").is_file():
        return False
    has_weights = False
    for name in _WEIGHT_FILES:
        if (p / name).is_file():
            has_weights = True
        index = p / f"{name}.index.json"
        if index.is_file():
            shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
            if not shards or not all((p / s).is_file() for s in shards):
                return False
            has_weights = True
    if not has_weights:
        return False
    return not require_tokenizer or any((p / f).is_file() for f in _TOKENIZER_FILES)


def _hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or env.upper() in {"1", "ON", "YES", "TRUE"}


def _looks_local(name: str) -> bool:
    if name.startswith(("/", ".", "~")) or os.path.exists(name) or not _HUB_ID.match(name):
        return True
    first = name.split("/", 1)[0]
    return "/" in name and os.path.exists(first)  # e.g. "models/Foo" with models/ present


def _cached_snapshot(repo_id: str, revision: str | None) -> str | None:
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(repo_id, revision=revision, local_files_only=True, allow_patterns=["config.json"])
    except Exception:  # LocalEntryNotFoundError, IncompleteSnapshotError, ...
        return None
    return path if is_complete_model_dir(path, require_tokenizer=False) else None


def _probe_hub(repo_id: str, revision: str | None, timeout: float) -> list[str]:
    """List the repo's files, bounded by ``timeout`` even when DNS hangs (the call runs in a daemon thread)."""
    from huggingface_hub import HfApi

    out: dict[str, Any] = {}

    def target() -> None:
        try:
            info = HfApi().model_info(repo_id, revision=revision, timeout=timeout)
            out["files"] = [s.rfilename for s in (info.siblings or [])]
        except BaseException as err:  # noqa: BLE001 - re-raised below in the caller's thread
            out["error"] = err

    thread = threading.Thread(target=target, name="rlhf-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise ModelNotFoundError(
            f"Model {repo_id!r} is not a local directory, not in the HF cache, and the Hub did not answer "
            f"within {timeout:.0f}s (no network?). {PREPARE_HINT}"
        )
    if "error" in out:
        err = out["error"]
        raise ModelNotFoundError(
            f"Model {repo_id!r} is not a local directory, not in the HF cache, and the Hub lookup failed: "
            f"{type(err).__name__}: {err}. {PREPARE_HINT}"
        ) from err
    return out["files"]


def resolve_model_path(name_or_path: str, revision: str | None = None) -> str:
    """Return a local directory for a model: the path itself, the HF cache snapshot, or a fresh Hub download.

    Raises :class:`ModelNotFoundError` quickly for a missing local path, an uncached model when
    ``HF_HUB_OFFLINE=1``, or an unreachable Hub (original error chained).
    """
    name = str(name_or_path)
    expanded = os.path.expanduser(name)
    if _looks_local(name):
        if os.path.isdir(expanded):
            return os.path.abspath(expanded)
        what = "is not a directory" if os.path.exists(expanded) else "does not exist"
        raise ModelNotFoundError(f"Model path {name!r} {what}. {PREPARE_HINT}")

    cached = _cached_snapshot(name, revision)
    if cached is not None:
        return cached
    if _hub_offline():
        raise ModelNotFoundError(
            f"Model {name!r} is not a local directory and not in the HF cache, and HF_HUB_OFFLINE=1 is set. "
            f"{PREPARE_HINT}"
        )

    files = _probe_hub(name, revision, HUB_PROBE_TIMEOUT_S)
    top = [f for f in files if "/" not in f and f.endswith(_HUB_FILE_SUFFIXES)]
    if any(f.endswith(".safetensors") for f in top):
        top = [f for f in top if not f.endswith(".bin")]
    from huggingface_hub import snapshot_download

    log.info("Downloading %s (%d files) from the Hub", name, len(top))
    try:
        return snapshot_download(name, revision=revision, allow_patterns=top or None)
    except Exception as err:
        raise ModelNotFoundError(f"Downloading model {name!r} from the Hub failed: {err}") from err


def load_tokenizer(name_or_path: str, revision: str | None = None) -> PreTrainedTokenizerBase:
    """Load a tokenizer; if it has no pad token, pad = eos (neither is an error naming the
    tokenizer). ``padding_side`` is left as saved."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path, revision)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"Tokenizer {name_or_path} has neither a pad nor an EOS token: set pad_token and "
                "eos_token in its tokenizer_config.json (padding and stopping generation need them)"
            )
        tokenizer.pad_token = tokenizer.eos_token
        log.info("Tokenizer %s has no pad token; using eos %r as pad", name_or_path, tokenizer.eos_token)
    return tokenizer


def _accelerator_device_map() -> dict[str, Any] | None:
    """One device per process for quantized weights: this rank's GPU, or ``None`` (transformers picks)."""
    if torch.cuda.is_available():
        local_rank = os.environ.get("LOCAL_RANK")
        index = int(local_rank) % torch.cuda.device_count() if local_rank else torch.cuda.current_device()
        return {"": index}
    return None


def bnb_config(quantization: Literal["4bit", "8bit"], compute_dtype: torch.dtype) -> Any:
    """bitsandbytes config: nf4 + double quantization for 4bit, LLM.int8 for 8bit."""
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"Unknown quantization {quantization!r}; expected '4bit', '8bit' or None.")


def enable_gradient_checkpointing(model: PreTrainedModel, input_grads: bool = False) -> None:
    """Non-reentrant activation checkpointing; ``input_grads`` makes embeddings outputs require grad (LoRA)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if input_grads and not getattr(model, "_require_grads_hooks", None):
        model.enable_input_require_grads()


def load_causal_lm(settings: ModelSettings, precision: str | None = None) -> PreTrainedModel:
    """Load the base causal LM (no LoRA applied here), quantized and checkpointed as configured.

    ``precision`` is the run's Lightning precision: with ``dtype="auto"`` a base that will be
    frozen (``settings.lora`` or ``quantization`` set) is loaded in bf16 for a bf16 run.
    """
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(settings.name_or_path, settings.revision)
    frozen = settings.lora is not None or settings.quantization is not None
    dtype = resolve_dtype(settings.dtype, precision if frozen else None)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": settings.trust_remote_code}
    if not settings.trust_remote_code:  # remote code may reference other repos
        kwargs["local_files_only"] = True
    if settings.quantization is not None:
        kwargs["quantization_config"] = bnb_config(settings.quantization, dtype)
        kwargs["device_map"] = _accelerator_device_map()
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if settings.train_top_layers is not None:
        freeze_lower_layers(model, settings.train_top_layers)
    if settings.gradient_checkpointing:
        enable_gradient_checkpointing(model, input_grads=settings.lora is not None)
    log.info(
        "Loaded %s (%s, %.1fM params%s)",
        settings.name_or_path,
        dtype,
        sum(p.numel() for p in model.parameters()) / 1e6,
        f", {settings.quantization}" if settings.quantization else "",
    )
    return model


def freeze_lower_layers(model: torch.nn.Module, top_layers: int) -> int:
    """Train only the top ``top_layers`` decoder blocks and every parameter registered after
    them (final norm, an untied LM head); freeze the rest (embeddings, lower blocks).

    Parameters are frozen in registration order up to the first parameter of the lowest
    trained block, so input-side parameters outside the block stack (GPT-2's position
    embeddings) stay frozen too and backward never runs below that block. A LM head tied to
    the input embeddings is that frozen matrix. Returns the number of trainable parameters.
    """
    # Imported here: rlhf.distributed imports Lightning, which plain loading does not need.
    from rlhf.distributed import decoder_layers

    blocks = decoder_layers(model)
    if not 1 <= top_layers <= len(blocks):
        raise ValueError(f"train_top_layers must be in 1..{len(blocks)} for this model, got {top_layers}")
    first_trained = {id(p) for p in blocks[len(blocks) - top_layers].parameters()}
    trainable, count = False, 0
    for parameter in model.parameters():  # registration order, shared tensors once
        trainable = trainable or id(parameter) in first_trained
        parameter.requires_grad_(trainable)
        count += parameter.numel() if trainable else 0
    log.info("Training the top %d of %d decoder blocks: %.1fM trainable params", top_layers, len(blocks), count / 1e6)
    return count


def _linear_module_names(model: torch.nn.Module) -> list[str]:
    from transformers.pytorch_utils import Conv1D

    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    names = set()
    for name, module in model.named_modules():
        if module is out_emb or ".lora_" in name:
            continue
        if name.endswith(".base_layer"):  # a layer that already carries a LoRA adapter
            name = name[: -len(".base_layer")]
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, (torch.nn.Linear, Conv1D)) and leaf not in _HEAD_NAMES:
            names.add(leaf)
    return sorted(names)


def default_lora_targets(model: torch.nn.Module) -> list[str]:
    """All attention + MLP projections for known architectures, else every linear layer except heads."""
    present = _linear_module_names(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    known = [t for t in LORA_TARGETS.get(model_type or "", []) if t in present]
    return known or present


def apply_lora(model: PreTrainedModel | PeftModel, lora: LoraSettings, adapter_name: str = "default") -> PeftModel:
    """Freeze the base model and add a LoRA adapter (a further adapter if ``model`` is already a PeftModel).

    Quantized models go through ``prepare_model_for_kbit_training`` first (checkpointing is left as loaded).
    """
    from peft import LoraConfig, PeftModel, TaskType, get_peft_model, prepare_model_for_kbit_training

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    targets = list(lora.target_modules) if lora.target_modules else default_lora_targets(base)
    arch = type(base).__name__
    task_type = (
        TaskType.CAUSAL_LM
        if arch.endswith("ForCausalLM")
        else TaskType.SEQ_CLS if arch.endswith("ForSequenceClassification") else None
    )
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        bias="none",
        task_type=task_type,
    )
    if isinstance(model, PeftModel):
        model.add_adapter(adapter_name, config)
        return model
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    log.info("LoRA %r on %s: r=%d, %d trainable params", adapter_name, ",".join(targets), lora.r, trainable)
    return peft_model


def save_merged_model(base: ModelSettings, adapter_dir: str | os.PathLike, tokenizer, out_dir: str | os.PathLike) -> None:  # noqa: ANN001
    """Merge the LoRA adapter saved in ``adapter_dir`` into a fresh copy of ``base`` and save the
    merged model and ``tokenizer`` to ``out_dir``. A fresh copy, because the live model keeps its
    adapter (a policy's reference is its base with the adapter off) and its base may be held in
    bf16 for training."""
    from dataclasses import replace

    from peft import PeftModel

    fresh = load_causal_lm(replace(base, lora=None, gradient_checkpointing=False))
    merged = PeftModel.from_pretrained(fresh, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
