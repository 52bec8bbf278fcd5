"""No surprise network: with ``HF_HUB_OFFLINE``/``WANDB_MODE`` unset and every non-local
connection blocked, a tiny run of local models with W&B (offline by default) and CSV logging
opens no connection and resolves no host name."""

from __future__ import annotations

import subprocess
import sys

import yaml
from resume_runs import subprocess_env

from rlhf.outputs import read_stage_marker

BLOCKER = '''"""Installed as sitecustomize by test_no_network: blocks every non-loopback connection and
host-name lookup of this Python process, recording each attempt in $RLHF_BLOCKED_LOG."""
import errno
import ipaddress
import os
import socket

_LOG = os.environ["RLHF_BLOCKED_LOG"]
_connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo


def _local(host):
    if host is None:
        return True
    host = host.decode() if isinstance(host, bytes) else str(host)
    if host in ("", "localhost"):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _blocked(what):
    with open(_LOG, "a") as f:
        f.write(what + "\\n")
    raise OSError(errno.ENETUNREACH, "network blocked by test_no_network: " + what)


def _check(sock, address):
    if sock.family in (socket.AF_INET, socket.AF_INET6) and not _local(address[0]):
        _blocked("connect %r" % (address,))


def connect(self, address):
    _check(self, address)
    return _connect(self, address)


def connect_ex(self, address):
    _check(self, address)
    return _connect_ex(self, address)


def getaddrinfo(host, *args, **kwargs):
    if not _local(host):
        _blocked("resolve %r" % (host,))
    return _getaddrinfo(host, *args, **kwargs)


socket.socket.connect = connect
socket.socket.connect_ex = connect_ex
socket.getaddrinfo = getaddrinfo
'''

ONLINE_SETTINGS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "WANDB_MODE")


def blocked_env(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    env = subprocess_env(offline=False, extra_path=[blocker])
    for name in ONLINE_SETTINGS:
        env.pop(name, None)
    env.update(RLHF_BLOCKED_LOG=str(tmp_path / "blocked.log"), HF_HOME=str(tmp_path / "hf-home"))
    return env


def test_the_blocker_blocks(tmp_path):
    env = blocked_env(tmp_path)
    probe = "import urllib.request; urllib.request.urlopen('https://huggingface.co', timeout=5)"
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "huggingface.co" in (tmp_path / "blocked.log").read_text()


def test_local_model_and_offline_logging_make_no_network_call(tmp_path, tiny_model_dir):
    demos = tmp_path / "demos.jsonl"
    demos.write_text("".join(f'{{"prompt": "q{i}", "response": "answer {i}"}}\n' for i in range(4)))
    run = tmp_path / "run"
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "max_steps": 1, "log_every_n_steps": 1, "limit_val_batches": 0,
            "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(run),
            "logger": [
                {"class_path": "rlhf.tracking.WandbLogger", "init_args": {"project": "tiny", "save_dir": str(run)}},
                {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run), "name": "csv"}},
            ],
        },
        "model": {"class_path": "rlhf.sft.SFTModule", "init_args": {
            "base": {"name_or_path": str(tiny_model_dir), "lora": {"r": 4}},
            "output_dir": str(tmp_path / "out")}},
        "data": {"class_path": "rlhf.data.DemonstrationDataModule", "init_args": {
            "train": {"path": str(demos)}, "val_fraction": 0.0, "batch_size": 2,
            "max_length": 32, "max_prompt_length": 16}},
    }
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "rlhf.fit", "--config", str(path)], cwd=tmp_path,
                            env=blocked_env(tmp_path), capture_output=True, text=True, timeout=300)
    log = tmp_path / "blocked.log"
    assert not log.exists(), log.read_text()
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_stage_marker(tmp_path / "out")["stage"] == "sft"
    assert list((run / "wandb").glob("offline-run-*")), "W&B did not log offline"
    assert list((run / "csv").glob("*/metrics.csv"))
