"""One setting of a ``rlhf.fit`` run, read the way LightningCLI will read it, without running it.

The pipeline needs a fit stage's ``model.init_args.output_dir`` to tell when the stage is
complete; the comparison checks that a method starts from the reference and scores with the
proxy. Both ask the same question of ``--config A.yaml --config B.yaml --key value`` arguments:
the last command-line override wins, else the last config file that sets the key.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml


class FitConfigError(ValueError):
    """A fit config file that is missing or not YAML, or an override that does not parse."""


def override_value(args: Sequence[str], dotted: str) -> Any:
    """The last ``--dotted value`` / ``--dotted=value`` in ``args`` (``None`` if absent); a value
    written as a list (``[a, b]``) is parsed as one."""
    value: Any = None
    for i, arg in enumerate(args):
        if arg == f"--{dotted}" and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(f"--{dotted}="):
            value = arg.split("=", 1)[1]
    if isinstance(value, str) and value.startswith("["):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise FitConfigError(f"--{dotted}={value}: not a valid list: {e}") from None
    return value


def config_value(config: str | Path, dotted: str) -> Any:
    """The value at ``dotted`` (``model.init_args.output_dir``) in the YAML file ``config``, or
    ``None`` when the file does not set it."""
    try:
        node: Any = yaml.safe_load(Path(config).read_text())
    except FileNotFoundError:
        raise FitConfigError(f"fit config {config} does not exist") from None
    except yaml.YAMLError as e:
        raise FitConfigError(f"{config} is not valid YAML: {e}") from None
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def fit_setting(configs: Sequence[str | Path], args: Sequence[str], dotted: str) -> Any:
    """What ``rlhf.fit --config c1 --config c2 ... *args`` would use for ``dotted``: the last
    override in ``args``, else the value of the last config in ``configs`` that sets it, else
    ``None``. Raises :class:`FitConfigError` for a missing or malformed file."""
    value = override_value(args, dotted)
    if value is not None:
        return value
    for config in reversed(configs):
        value = config_value(config, dotted)
        if value is not None:
            return value
    return None
