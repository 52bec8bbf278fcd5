"""Model shapes for the memory planner: named presets, a model's ``config.json`` (local folder or
Hugging Face cache, never its weights), and the parameter counts that follow from a shape.

Only Llama-style decoders are planned (GQA attention with ``q/k/v/o_proj``, a SwiGLU MLP with
``gate/up/down_proj``, two RMSNorms per layer, a final norm, an LM head tied or not to the
embeddings): the formulas in :mod:`rlhf.planning.memory` count their tensors one by one.
"""

from __future__ import annotations

import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

#: ``model_type`` values whose decoder is the Llama layout the planner counts.
LLAMA_STYLE = ("llama", "mistral")
#: The seven projections of a layer, in the order :data:`rlhf.models.loading.LORA_TARGETS` names them.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ModelShapeError(ValueError):
    """``--model`` names no preset, no readable local config, no cached Hub config, or a model
    whose layout the planner does not know."""


@dataclass(frozen=True)
class ModelShape:
    """A Llama-style decoder: ``hidden`` size, ``layers``, attention ``heads`` and ``kv_heads``
    (GQA) of ``head_dim`` each, MLP ``intermediate`` size, ``vocab`` size, and whether the LM
    head is the embedding matrix (``tied``). ``source`` says where the numbers come from."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    source: str = ""

    def __post_init__(self) -> None:
        for key in ("hidden", "layers", "heads", "kv_heads", "head_dim", "intermediate", "vocab"):
            if getattr(self, key) < 1:
                raise ModelShapeError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.heads % self.kv_heads:
            raise ModelShapeError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


#: Named shapes (``--model 8b``). Numbers copied from each model's published ``config.json``.
PRESETS: dict[str, ModelShape] = {
    "135m": ModelShape(576, 30, 9, 3, 64, 1536, 49152, True,
                       "HuggingFaceTB/SmolLM2-135M-Instruct config.json (copy: models/SmolLM2-135M-Instruct)"),
    "1b": ModelShape(2048, 16, 32, 8, 64, 8192, 128256, True, "meta-llama/Llama-3.2-1B config.json"),
    "8b": ModelShape(4096, 32, 32, 8, 128, 14336, 128256, False, "meta-llama/Llama-3.1-8B config.json"),
    "70b": ModelShape(8192, 80, 64, 8, 128, 28672, 128256, False, "meta-llama/Llama-3.1-70B config.json"),
}


def projection_shapes(shape: ModelShape) -> dict[str, tuple[int, int]]:
    """``{projection: (in_features, out_features)}`` of one decoder layer."""
    h, q, kv, i = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim, shape.intermediate
    return {
        "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
        "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
    }


def linear_params_per_layer(shape: ModelShape) -> int:
    """Weights of a layer's seven projections (no biases in the Llama layout)."""
    return sum(n_in * n_out for n_in, n_out in projection_shapes(shape).values())


def embedding_params(shape: ModelShape) -> int:
    """The input embedding plus an untied LM head: ``vocab * hidden`` once or twice."""
    return shape.vocab * shape.hidden * (1 if shape.tied else 2)


def norm_params(shape: ModelShape) -> int:
    """RMSNorm weights: two per layer and the final norm."""
    return shape.hidden * (2 * shape.layers + 1)


def total_params(shape: ModelShape) -> int:
    """Every parameter of the causal LM (a tied head counted once)."""
    return shape.layers * linear_params_per_layer(shape) + embedding_params(shape) + norm_params(shape)


def lora_params_per_layer(shape: ModelShape, r: int, targets: tuple[str, ...]) -> int:
    """LoRA ``A`` (``r x in``) and ``B`` (``out x r``) of each targeted projection of one layer."""
    shapes = projection_shapes(shape)
    unknown = sorted(set(targets) - set(shapes))
    if unknown:
        raise ModelShapeError(f"unknown LoRA target(s) {unknown}; the planner knows {', '.join(PROJECTIONS)}")
    return sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)


def lora_params(shape: ModelShape, r: int, targets: tuple[str, ...]) -> int:
    """One LoRA adapter of rank ``r`` on ``targets`` in every layer."""
    return shape.layers * lora_params_per_layer(shape, r, targets)


def largest_linear(shape: ModelShape) -> int:
    """Weights of the largest projection (what a quantized matmul dequantizes at once)."""
    return max(n_in * n_out for n_in, n_out in projection_shapes(shape).values())


# -- reading a model's config ------------------------------------------------------------------
def shape_from_config(config: Any, source: str) -> ModelShape:
    """A :class:`ModelShape` from a transformers config (its text config for multimodal ones)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(text, "model_type", None)
    if model_type not in LLAMA_STYLE:
        raise ModelShapeError(
            f"{source}: model_type {model_type!r} is not a Llama-style decoder the planner counts "
            f"({', '.join(LLAMA_STYLE)}); use a preset ({', '.join(PRESETS)}) of a similar size"
        )
    for key in ("attention_bias", "mlp_bias"):
        if getattr(text, key, False):
            raise ModelShapeError(f"{source}: {key} = true is not in the planner's Llama layout")
    heads = int(text.num_attention_heads)
    return ModelShape(
        hidden=int(text.hidden_size),
        layers=int(text.num_hidden_layers),
        heads=heads,
        kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(text, "head_dim", None) or text.hidden_size // heads),
        intermediate=int(text.intermediate_size),
        vocab=int(text.vocab_size),
        tied=bool(getattr(config, "tie_word_embeddings", getattr(text, "tie_word_embeddings", False))),
        source=source,
    )


def _hub_offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in {"1", "ON", "YES", "TRUE"}


def _download_config(repo_id: str, timeout: float) -> str:
    """``config.json`` of ``repo_id`` from the Hub, bounded by ``timeout`` (a daemon thread: a
    DNS lookup that hangs does not hang the planner)."""
    from huggingface_hub import hf_hub_download

    out: dict[str, Any] = {}

    def fetch() -> None:
        try:
            out["path"] = hf_hub_download(repo_id, "config.json", etag_timeout=timeout)
        except BaseException as err:  # noqa: BLE001 - reported below in the caller's thread
            out["error"] = err

    thread = threading.Thread(target=fetch, name="rlhf-plan-config", daemon=True)
    thread.start()
    thread.join(timeout)
    if "path" in out:
        return out["path"]
    why = f"{type(out['error']).__name__}: {out['error']}" if "error" in out else f"no answer in {timeout:.0f}s"
    raise ModelShapeError(f"--model {repo_id!r}: not a preset or local folder, not in the HF cache, and the Hub "
                          f"lookup of its config.json failed ({why})")


def load_shape(model: str, timeout: float = 10.0) -> ModelShape:
    """The shape ``--model`` names: a preset (:data:`PRESETS`, case-insensitive), a local model
    folder (its ``config.json`` only), or a Hub id (its config from the HF cache, else from the
    Hub unless ``HF_HUB_OFFLINE`` is set). Raises :class:`ModelShapeError` saying which."""
    preset = PRESETS.get(model.lower())
    if preset is not None:
        return preset
    from transformers import AutoConfig

    path = Path(os.path.expanduser(model))
    if path.exists() or model.startswith((".", "/", "~")):
        if not (path / "config.json").is_file():
            what = "has no config.json" if path.is_dir() else "is not a folder" if path.exists() else "does not exist"
            raise ModelShapeError(f"--model {model!r}: {path} {what} (presets: {', '.join(PRESETS)})")
        try:
            config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        except Exception as err:  # a malformed or unknown config
            raise ModelShapeError(f"--model {model!r}: cannot read {path / 'config.json'}: {err}") from err
        return shape_from_config(config, str(path / "config.json"))
    try:
        config = AutoConfig.from_pretrained(model, local_files_only=True)
        return shape_from_config(config, f"{model} (HF cache)")
    except (OSError, ValueError) as err:  # not in the cache (OSError), or not a readable config
        if isinstance(err, ModelShapeError):
            raise
        if _hub_offline():
            raise ModelShapeError(
                f"--model {model!r}: not a preset ({', '.join(PRESETS)}), not a local folder, and its "
                "config is not in the HF cache (HF_HUB_OFFLINE is set, so the Hub was not asked)"
            ) from None
    config = AutoConfig.from_pretrained(os.path.dirname(_download_config(model, timeout)), local_files_only=True)
    return shape_from_config(config, f"{model} (Hub config.json)")
