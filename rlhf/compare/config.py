"""The comparison config: shared inputs, held-out evaluation settings, seeds and methods.

    out: outputs/compare                    # where runs, evaluations and the report go
    seeds: [0, 1, 2]
    reference: outputs/quickstart/sft       # the SFT policy: every method's start, the KL reference
    proxy: outputs/gold/rm                  # the proxy reward model
    gold: vader                             # the gold function (rlhf.gold.GOLD_FUNCTIONS)
    fit_args: [--trainer.limit_val_batches=0]   # optional: given to every 'fit' method, before its args
    eval: {data: [...], schema: hh_rlhf, split: val, ...}    # see EvalSettings
    methods:
      sft: {reference: true}                # the SFT policy itself, sampled
      bon4: {best_of_n: 4}                  # best of 4 SFT samples under the proxy
      ppo:
        fit: configs/gold/ppo.yaml          # python -m rlhf.fit --config ...
        args: [--model.init_args.critic=adapter]
        snapshot_every: 10                  # evaluate the policy every 10 training steps too
        budget: 30 iterations x 8 prompts   # stated in the report's table
      ppo_odin:
        fit: configs/gold/ppo.yaml
        args: [--model.init_args.reward.model=outputs/gold/rm_odin]
        rewards: [outputs/gold/rm_odin]     # optimises another RM (trained on the proxy's labels)

:func:`load_config` refuses a bad config with the file, the key and what is wrong.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from rlhf import fit_config
from rlhf.fit_config import FitConfigError

TOP_KEYS = ("out", "seeds", "reference", "proxy", "gold", "eval", "methods")
OPTIONAL_TOP_KEYS = ("fit_args",)
METHOD_KEYS = ("fit", "args", "snapshot_every", "budget", "best_of_n", "reference", "rewards")
METHOD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Arguments the comparison sets for each run itself: a method may not set them.
RESERVED_ARGS = ("--seed_everything", "--model.init_args.output_dir", "--trainer.default_root_dir",
                 "--trainer.logger", "--ckpt_path")


class CompareConfigError(ValueError):
    """A comparison config that cannot be run (names the file, the key and the problem)."""


@dataclass(frozen=True)
class EvalSettings:
    """How every policy is evaluated: the held-out prompts and the sampling.

    Attributes:
        data: prompt files (read as :class:`rlhf.data.PromptDataModule` reads them).
        schema: their schema (``fields``, ``hh_rlhf``, ``alpaca``).
        split, val_fraction, split_seed: which prompts (``val``: exactly those a prompt data
            module with the same files, fraction and seed holds out; ``all``: every prompt).
        limit: keep the first ``limit`` prompts (``None``: all).
        max_length, max_prompt_length, long_prompts: tokenisation as the data module's.
        batch_size: prompts per sampling batch.
        samples_per_prompt: responses per prompt and policy (best-of-n draws ``n`` times that).
        max_new_tokens, temperature: sampling (no top-k / top-p: KL is taken at ``temperature``).
        seed: the sampling seed of seed ``s`` is ``seed + s``, the same for every method.
        precision: ``bf16-mixed`` or ``32``; device: ``auto``, ``cpu``, ``cuda``, ...
    """

    data: tuple[str, ...]
    schema: str = "fields"
    split: str = "val"
    val_fraction: float = 0.05
    split_seed: int = 0
    limit: int | None = None
    max_length: int = 512
    max_prompt_length: int = 256
    long_prompts: str = "truncate"
    batch_size: int = 16
    samples_per_prompt: int = 1
    max_new_tokens: int = 64
    temperature: float = 1.0
    seed: int = 0
    precision: str = "bf16-mixed"
    device: str = "auto"

    def as_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}


@dataclass(frozen=True)
class Method:
    """One compared method.

    Attributes:
        name: its key under ``methods`` (a directory name).
        kind: ``fit`` (a training run), ``best_of_n`` (``n`` SFT samples, best by the proxy)
            or ``reference`` (the SFT policy itself).
        fit: the ``rlhf.fit`` config (``fit`` only); args: extra arguments to it (the config's
            ``fit_args`` first, then the method's own).
        n: ``best_of_n`` only.
        snapshot_every: ``fit`` only: also evaluate the policy every this many training steps
            (``None``: only the final policy).
        budget: the method's compute budget in words, for the report.
        rewards: ``fit`` only: the reward models it optimises when they are not the proxy
            (an ensemble's members, an ODIN RM trained on the proxy's labels); its fit config
            must name exactly these. The evaluation still scores every policy with the proxy.
    """

    name: str
    kind: str
    fit: Path | None = None
    args: tuple[str, ...] = ()
    n: int | None = None
    snapshot_every: int | None = None
    budget: str = ""
    rewards: tuple[Path, ...] = ()


@dataclass(frozen=True)
class CompareConfig:
    """A parsed comparison config (see the module doc)."""

    path: Path
    out: Path
    seeds: tuple[int, ...]
    reference: Path
    proxy: Path
    gold: str
    eval: EvalSettings
    methods: dict[str, Method] = field(default_factory=dict)


# ------------------------------------------------------------------------------- parsing
def _int(value: Any, where: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CompareConfigError(f"{where}: expected an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise CompareConfigError(f"{where}: must be >= {minimum}, got {value}")
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise CompareConfigError(f"{where}: expected a non-empty string, got {value!r}")
    return value


def parse_eval(data: Any, where: str) -> EvalSettings:
    """:class:`EvalSettings` from the ``eval`` mapping; each prompt file must exist."""
    if not isinstance(data, dict):
        raise CompareConfigError(f"{where}: expected a mapping of evaluation settings")
    known = {f.name: f for f in fields(EvalSettings)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise CompareConfigError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(known)}")
    if "data" not in data:
        raise CompareConfigError(f"{where}.data: missing (the held-out prompt files)")
    files = data["data"] if isinstance(data["data"], list) else [data["data"]]
    for i, path in enumerate(files):
        _str(path, f"{where}.data[{i}]")
        if not Path(path).exists():
            raise CompareConfigError(f"{where}.data[{i}]: prompt file {path} does not exist")
    values: dict[str, Any] = {"data": tuple(files)}
    for key, value in data.items():
        if key == "data":
            continue
        default = known[key].default
        at = f"{where}.{key}"
        if key == "limit":
            values[key] = None if value is None else _int(value, at, 1)
        elif key == "precision":
            values[key] = str(value)
        elif isinstance(default, str):
            values[key] = _str(value, at)
        elif isinstance(default, int):
            values[key] = _int(value, at, 0 if key in ("seed", "split_seed") else 1)
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise CompareConfigError(f"{at}: expected a number, got {value!r}")
            values[key] = float(value)
    settings = EvalSettings(**values)
    choices = {"split": ("val", "train", "all"), "schema": ("fields", "hh_rlhf", "alpaca"),
               "long_prompts": ("truncate", "drop"), "precision": ("32", "bf16-mixed")}
    for key, allowed in choices.items():
        if getattr(settings, key) not in allowed:
            raise CompareConfigError(f"{where}.{key}: {getattr(settings, key)!r} is not one of {list(allowed)}")
    if settings.temperature <= 0:
        raise CompareConfigError(f"{where}.temperature: must be > 0, got {settings.temperature}")
    if not 0 < settings.val_fraction < 1 and settings.split != "all":
        raise CompareConfigError(f"{where}.val_fraction: must be in (0, 1), got {settings.val_fraction}")
    return settings


def parse_args(value: Any, where: str) -> tuple[str, ...]:
    """A list of ``rlhf.fit`` arguments, none of them one the comparison sets per run."""
    value = value or []
    if not isinstance(value, list) or not all(isinstance(a, (str, int, float)) for a in value):
        raise CompareConfigError(f"{where}: expected a list of strings, got {value!r}")
    args = tuple(str(a) for a in value)
    for arg in args:
        if arg.split("=", 1)[0] in RESERVED_ARGS or arg.startswith("--trainer.logger"):
            raise CompareConfigError(f"{where}: {arg.split('=', 1)[0]} is set by the comparison for each "
                                     f"run (seed, output and log directories); remove it")
    return args


def parse_method(name: Any, data: Any, where: str, shared_args: tuple[str, ...] = ()) -> Method:
    """One ``methods`` entry; a ``fit`` config must exist. A ``fit`` method's args are
    ``shared_args`` (the config's ``fit_args``) followed by its own."""
    if not isinstance(name, str) or not METHOD_NAME.match(name):
        raise CompareConfigError(f"{where}: method name {name!r} must be letters, digits, '_', '.' or '-' "
                                 f"(it names a directory)")
    where = f"{where}.{name}"
    if not isinstance(data, dict):
        raise CompareConfigError(f"{where}: expected a mapping (fit / best_of_n / reference, ...)")
    unknown = sorted(set(data) - set(METHOD_KEYS))
    if unknown:
        raise CompareConfigError(f"{where}: unknown key(s) {unknown}; expected some of {list(METHOD_KEYS)}")
    kinds = [k for k in ("fit", "best_of_n", "reference") if data.get(k) not in (None, False)]
    if len(kinds) != 1:
        raise CompareConfigError(f"{where}: give exactly one of 'fit' (a training config), 'best_of_n' "
                                 f"(n) or 'reference: true' (the SFT policy), got {kinds or 'none'}")
    budget = data.get("budget", "")
    if not isinstance(budget, str):
        raise CompareConfigError(f"{where}.budget: expected a string, got {budget!r}")
    kind = kinds[0]
    if kind != "fit":
        extra = sorted(k for k in ("args", "snapshot_every", "rewards") if k in data)
        if extra:
            raise CompareConfigError(f"{where}: {extra} only apply to a 'fit' method")
    if kind == "best_of_n":
        return Method(name, kind, n=_int(data["best_of_n"], f"{where}.best_of_n", 1), budget=budget)
    if kind == "reference":
        if data["reference"] is not True:
            raise CompareConfigError(f"{where}.reference: expected true, got {data['reference']!r}")
        return Method(name, kind, budget=budget)
    fit = Path(_str(data["fit"], f"{where}.fit"))
    if not fit.is_file():
        raise CompareConfigError(f"{where}.fit: config file {fit} does not exist")
    args = shared_args + parse_args(data.get("args"), f"{where}.args")
    every = data.get("snapshot_every")
    every = None if every is None else _int(every, f"{where}.snapshot_every", 1)
    rewards = data.get("rewards") or []
    rewards = rewards if isinstance(rewards, list) else [rewards]
    rewards = tuple(Path(_str(r, f"{where}.rewards[{i}]")) for i, r in enumerate(rewards))
    return Method(name, kind, fit=fit, args=args, snapshot_every=every, budget=budget, rewards=rewards)


def _same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))


def fit_setting(method: Method, dotted: str) -> Any:
    """The value of ``dotted`` (``model.init_args.output_dir``) for a ``fit`` method: its last
    ``--dotted`` argument, else its config file's value, else ``None``."""
    try:
        return fit_config.fit_setting([method.fit], method.args, dotted)  # type: ignore[list-item]
    except FitConfigError as e:
        raise CompareConfigError(f"{method.name}: {e}") from None


def check_fit_inputs(method: Method, reference: Path, proxy: Path, where: str) -> None:
    """A ``fit`` method must start from the reference (its ``base.name_or_path`` is the
    reference or its merged ``model/``) and, when it names a reward model, score with the proxy."""
    base = fit_setting(method, "model.init_args.base.name_or_path")
    if base is None or not (_same_path(base, reference) or _same_path(base, reference / "model")):
        raise CompareConfigError(
            f"{where}: {method.fit} starts from model.init_args.base.name_or_path={base!r}, not the "
            f"reference {reference} (or {reference / 'model'}): KL and best-of-n would be to another policy"
        )
    expected = list(method.rewards) or [proxy]
    for key in ("model.init_args.reward.model", "model.init_args.reward_model"):
        rm = fit_setting(method, key)
        if rm is None:
            continue
        named = rm if isinstance(rm, list) else [rm]
        if len(named) != len(expected) or not all(_same_path(a, b) for a, b in zip(named, expected)):
            what = f"its rewards {[str(r) for r in expected]}" if method.rewards else f"the proxy {proxy}"
            raise CompareConfigError(f"{where}: {method.fit} sets {key}={rm!r}, not {what} (a method that "
                                     f"optimises other reward models lists them under 'rewards')")


def load_config(path: str | os.PathLike) -> CompareConfig:
    """Parse and check a comparison config (see the module doc); :class:`CompareConfigError`
    names the file, the key and what is wrong."""
    from rlhf.gold import GOLD_FUNCTIONS

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise CompareConfigError(f"comparison config {path} does not exist") from None
    except yaml.YAMLError as e:
        raise CompareConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise CompareConfigError(f"{path}: expected a mapping with keys {list(TOP_KEYS)}")
    unknown = sorted(set(data) - set(TOP_KEYS) - set(OPTIONAL_TOP_KEYS))
    if unknown:
        raise CompareConfigError(f"{path}: unknown top-level key(s) {unknown}; expected {list(TOP_KEYS)} "
                                 f"and optionally {list(OPTIONAL_TOP_KEYS)}")
    missing = [k for k in TOP_KEYS if k not in data]
    if missing:
        raise CompareConfigError(f"{path}: missing key(s) {missing}")
    seeds = data["seeds"]
    if not isinstance(seeds, list) or not seeds:
        raise CompareConfigError(f"{path}: seeds: expected a non-empty list of integers, got {seeds!r}")
    seeds = tuple(_int(s, f"{path}: seeds[{i}]", 0) for i, s in enumerate(seeds))
    if len(set(seeds)) != len(seeds):
        raise CompareConfigError(f"{path}: seeds: {list(seeds)} repeats a seed")
    gold = _str(data["gold"], f"{path}: gold")
    if gold not in GOLD_FUNCTIONS:
        raise CompareConfigError(f"{path}: gold: unknown gold function {gold!r}; known: {sorted(GOLD_FUNCTIONS)}")
    methods_data = data["methods"]
    if not isinstance(methods_data, dict) or not methods_data:
        raise CompareConfigError(f"{path}: methods: expected a non-empty mapping of name -> method")
    reference = Path(_str(data["reference"], f"{path}: reference"))
    proxy = Path(_str(data["proxy"], f"{path}: proxy"))
    shared_args = parse_args(data.get("fit_args"), f"{path}: fit_args")
    methods = {}
    for name, entry in methods_data.items():
        method = parse_method(name, entry, f"{path}: methods", shared_args)
        if method.kind == "fit":
            check_fit_inputs(method, reference, proxy, f"{path}: methods.{name}")
        methods[name] = method
    return CompareConfig(
        path=path,
        out=Path(_str(data["out"], f"{path}: out")),
        seeds=seeds,
        reference=reference,
        proxy=proxy,
        gold=gold,
        eval=parse_eval(data["eval"], f"{path}: eval"),
        methods=methods,
    )


def missing_inputs(config: CompareConfig, methods: Sequence[str] | None = None) -> list[str]:
    """What must exist before anything runs, in words (empty when all is there): the
    reference, the proxy and the ``rewards`` of ``methods`` (``None``: every method's) as
    complete stage outputs. A method that is not run needs nothing."""
    from rlhf.outputs import read_stage_marker

    problems = []
    chosen = [config.methods[name] for name in (config.methods if methods is None else methods)]
    rewards = [(f"methods.{m.name}.rewards", path) for m in chosen for path in m.rewards]
    for key, path in (("reference", config.reference), ("proxy", config.proxy), *rewards):
        if not path.is_dir() or read_stage_marker(path) is None:
            problems.append(f"{config.path}: {key}: {path} is not a complete stage output (no "
                            f"rlhf_stage.json there); run the stage that writes it first")
    return problems


def select(config: CompareConfig, methods: list[str] | None, seeds: list[int] | None) -> tuple[list[str], list[int]]:
    """The methods and seeds to run (``None``: all of the config's), refusing names the
    config does not have."""
    names = list(config.methods) if methods is None else methods
    unknown = [m for m in names if m not in config.methods]
    if unknown:
        raise CompareConfigError(f"--methods: unknown method(s) {unknown}; {config.path} has {list(config.methods)}")
    chosen = list(config.seeds) if seeds is None else seeds
    unknown_seeds = [s for s in chosen if s not in config.seeds]
    if unknown_seeds:
        raise CompareConfigError(f"--seeds: {unknown_seeds} not in {config.path}'s seeds {list(config.seeds)}; "
                                 f"add them there (the report covers the config's seeds)")
    return names, chosen
