"""Compare policies on held-out prompts under a reward model.

    python -m rlhf.evaluate --reward outputs/quickstart/rm --reference outputs/quickstart/sft \\
        --policy sft=outputs/quickstart/sft --policy ppo=outputs/quickstart/ppo \\
        --data data/hh-rlhf/helpful-rejection-sampled/test.jsonl.gz --schema hh_rlhf \\
        --split val --val-fraction 0.03 --split-seed 0 --out outputs/quickstart/eval

Each policy samples ``--samples-per-prompt`` responses to every prompt (the same seed for
every policy). Reported per policy: mean raw RM score and its standard error, KL to the
reference (summed over the response; temperature-scaled log-probs, as PPO's ``kl/mean``),
response length and EOS rate; for every policy after the first, its win rate against the
first under the RM (ties count half) and the mean paired score difference, with standard
errors over prompts. ``--split val`` keeps exactly the prompts a :class:`PromptDataModule`
with the same files, ``val_fraction`` and ``split_seed`` held out from PPO.

Writes ``report.json`` (all numbers and every sampled row) and ``report.md`` (tables and
side-by-side samples) to ``--out``; logs the same numbers to W&B when a run is active.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from rlhf.comparisons import SampleRow, head_to_head, policy_summary
from rlhf.console import quiet_known_warnings
from rlhf.data.datamodules import PromptDataModule
from rlhf.data.records import conversation_text
from rlhf.generation import SamplingSettings
from rlhf.models.loading import resolve_dtype
from rlhf.outputs import atomic_directory
from rlhf.policies import (
    add_prompt_sampling_arguments,
    autocast_for,
    load_policy,
    progress_bar,
    prompt_batches,
    prompt_data_from_args,
    resolve_device,
    resolve_model_dir,
    response_logprob_sums,
    same_model,
    sample_batches,
    sampling_from_args,
)

log = logging.getLogger("rlhf.evaluate")


@dataclass
class Report:
    """Everything an evaluation measured."""

    settings: dict[str, Any]
    policies: dict[str, dict[str, float]]
    comparisons: list[dict[str, Any]]
    rows: list[SampleRow] = field(default_factory=list)

    @classmethod
    def from_rows(cls, rows: Sequence[SampleRow], order: Sequence[str], settings: dict[str, Any]) -> Report:
        """Summaries of each policy in ``order`` and of each later policy against the first."""
        by_policy = {name: [r for r in rows if r.policy == name] for name in order}
        comparisons = [
            {"baseline": order[0], "policy": name, **head_to_head(by_policy[order[0]], by_policy[name])}
            for name in order[1:]
        ]
        return cls(settings, {n: policy_summary(by_policy[n]) for n in order}, comparisons, list(rows))

    def to_json(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "policies": self.policies,
            "comparisons": self.comparisons,
            "rows": [asdict(r) for r in self.rows],
        }

    def to_markdown(self, show: int = 5) -> str:
        """Tables of the summaries and ``show`` side-by-side samples (first sample per prompt)."""
        s = self.settings
        lines = [
            "# Policy evaluation",
            "",
            f"Reward model `{s['reward']}`; reference `{s['reference']}`; "
            f"{s['prompts']} held-out prompts x {s['samples_per_prompt']} samples; "
            f"temperature {s['temperature']}, up to {s['max_new_tokens']} new tokens.",
            "",
            "| policy | RM reward (mean ± SE) | KL to reference | length | EOS rate |",
            "| --- | --- | --- | --- | --- |",
        ]
        for name, p in self.policies.items():
            lines.append(
                f"| {name} | {p['reward_mean']:+.4f} ± {p['reward_se']:.4f} | "
                f"{p['kl_mean']:.3f} ± {p['kl_se']:.3f} | {p['length_mean']:.1f} | {p['eos_rate']:.2f} |"
            )
        if self.comparisons:
            lines += [
                "",
                "| policy vs baseline | win rate under the RM (± SE) | reward difference (± SE) | pairs |",
                "| --- | --- | --- | --- |",
            ]
            for c in self.comparisons:
                lines.append(
                    f"| {c['policy']} vs {c['baseline']} | {c['win_rate']:.3f} ± {c['win_rate_se']:.3f} | "
                    f"{c['reward_diff']:+.4f} ± {c['reward_diff_se']:.4f} | {c['pairs']} |"
                )
                if "lc_win_rate" in c:
                    lines.append(
                        f"| ... length-controlled (logistic fit read at equal length; 95% CI "
                        f"{c['lc_win_rate_ci95_low']:.3f}-{c['lc_win_rate_ci95_high']:.3f}) | "
                        f"{c['lc_win_rate']:.3f} ± {c['lc_win_rate_se']:.3f} | | {c['pairs']} |"
                    )
                if c.get("same_ending_pairs"):
                    lines.append(
                        f"| ... pairs whose replies end alike (both EOS or both cut) | "
                        f"{c['same_ending_win_rate']:.3f} ± {c['same_ending_win_rate_se']:.3f} | "
                        f"{c['same_ending_reward_diff']:+.4f} ± {c['same_ending_reward_diff_se']:.4f} | "
                        f"{c['same_ending_pairs']} |"
                    )
        names = list(self.policies)
        first = {(r.policy, r.prompt_id): r for r in self.rows if r.sample == 0}
        prompt_ids = sorted({r.prompt_id for r in self.rows})[:show]
        if prompt_ids:
            lines += ["", "## Samples", ""]
        for pid in prompt_ids:
            prompt = next(r.prompt for r in self.rows if r.prompt_id == pid)
            lines += [f"### Prompt {pid}", "", _quote(prompt), ""]
            for name in names:
                row = first.get((name, pid))
                if row is not None:
                    lines += [f"**{name}** (reward {row.reward:+.4f}, KL {row.kl:.2f}):", "", _quote(row.response), ""]
        return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    return "\n".join("> " + line for line in (text.strip() or "(empty)").splitlines())


# ---------------------------------------------------------------------------------- sampling
@torch.no_grad()
def sample_policy(
    name: str,
    model: torch.nn.Module,
    reference: torch.nn.Module,
    reward_model: torch.nn.Module,
    tokenizer: Any,
    batches: Sequence[dict[str, torch.Tensor]],
    texts: Sequence[str],
    sampling: SamplingSettings,
    samples_per_prompt: int,
    seed: int,
    device: torch.device,
    precision: str = "32",
    progress: bool = True,
) -> list[SampleRow]:
    """Sample, score and measure KL for one policy over every prompt batch."""
    torch.manual_seed(seed)  # the same random stream for every policy
    rows: list[SampleRow] = []
    with progress_bar(len(texts) * samples_per_prompt, f"sampling {name}", progress) as bar:
        for sample in range(samples_per_prompt):
            for batch, gen in sample_batches(model, tokenizer, batches, sampling, device, precision, bar=bar):
                with autocast_for(device, precision):
                    logp = response_logprob_sums(model, gen, sampling.temperature)
                    ref = logp if reference is model else response_logprob_sums(reference, gen, sampling.temperature)
                    rewards = reward_model(gen.input_ids, gen.attention_mask).float()
                for i in range(len(gen.input_ids)):
                    pid = int(batch["index"][i])
                    rows.append(
                        SampleRow(
                            policy=name,
                            prompt_id=pid,
                            sample=sample,
                            prompt=texts[pid],
                            response=gen.response_text(i, tokenizer),
                            reward=float(rewards[i]),
                            kl=float(logp[i] - ref[i]),
                            length=int(gen.lengths[i]),
                            eos=bool(gen.has_eos[i]),
                        )
                    )
    return rows


def check_reward_tokenizer(reward: str | Path, tokenizer: Any) -> None:
    """Raise when the reward model saved a tokenizer with another vocabulary: scores are read
    from the policies' token ids directly."""
    from transformers import AutoTokenizer

    from rlhf.models.reward import read_reward_model_info

    tokenizer_dir = read_reward_model_info(reward).get("tokenizer_dir")
    if tokenizer_dir and AutoTokenizer.from_pretrained(str(Path(reward) / tokenizer_dir)).get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"the reward model at {reward} uses a different tokenizer than the policies")


def evaluate(
    policies: dict[str, str],
    reward: str,
    reference: str,
    data: PromptDataModule,
    sampling: SamplingSettings,
    split: str = "val",
    limit: int | None = None,
    samples_per_prompt: int = 1,
    seed: int = 0,
    device: str = "auto",
    precision: str = "bf16-mixed",
    progress: bool = True,
) -> Report:
    """Sample every policy on the same held-out prompts and summarise (see the module doc).

    Args:
        policies: name -> policy (stage output or model dir); the first is the baseline.
        reward: a saved reward model (``rlhf.rm`` output).
        reference: the KL reference policy (usually the SFT output PPO started from).
        data: a prompt data module (its tokenizer must be the policies' and the RM's).
    """
    from rlhf.models.reward import load_reward_model

    if not policies:
        raise ValueError("no policies to evaluate")
    dev = resolve_device(device)
    batches, prompts = prompt_batches(data, split, limit)
    texts = [conversation_text(p) for p in prompts]
    tokenizer = data.tokenizer
    check_reward_tokenizer(reward, tokenizer)
    reward_model = load_reward_model(reward, device=dev, dtype=resolve_dtype("auto", precision))
    ref_model = load_policy(reference, dev, precision=precision)
    rows: list[SampleRow] = []
    for name, path in policies.items():
        log.info("policy %s: %s", name, resolve_model_dir(path))
        model = ref_model if same_model(path, reference) else load_policy(path, dev, precision=precision)
        rows += sample_policy(
            name, model, ref_model, reward_model, tokenizer, batches, texts, sampling,
            samples_per_prompt, seed, dev, precision, progress,
        )
        if model is not ref_model:
            del model
    settings = {
        "policies": dict(policies),
        "reward": str(reward),
        "reference": str(reference),
        "split": split,
        "prompts": len(texts),
        "samples_per_prompt": samples_per_prompt,
        "seed": seed,
        "precision": precision,
        **asdict(sampling),
    }
    return Report.from_rows(rows, list(policies), settings)


def write_report(report: Report, out: str | Path, show: int = 5) -> Path:
    """Write ``report.json`` and ``report.md`` to ``out`` (atomically); returns ``out``."""
    with atomic_directory(out) as tmp:
        (tmp / "report.json").write_text(json.dumps(report.to_json(), indent=2))
        (tmp / "report.md").write_text(report.to_markdown(show))
    return Path(out)


def log_to_wandb(report: Report) -> bool:
    """Log the summaries and a sample table to the active W&B run, if there is one."""
    try:
        import wandb
    except ImportError:  # pragma: no cover
        return False
    if wandb.run is None:
        return False
    metrics = {f"eval/{name}/{k}": v for name, p in report.policies.items() for k, v in p.items()}
    for c in report.comparisons:
        metrics.update({f"eval/{c['policy']}_vs_{c['baseline']}/{k}": v for k, v in c.items() if isinstance(v, float)})
    columns = ["policy", "prompt_id", "sample", "prompt", "response", "reward", "kl", "length", "eos"]
    metrics["eval/samples"] = wandb.Table(columns=columns, data=[[getattr(r, c) for c in columns] for r in report.rows])
    wandb.log(metrics)
    return True


# ---------------------------------------------------------------------------------- CLI
def _named_policy(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rlhf.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", action="append", type=_named_policy, required=True, metavar="NAME=PATH",
                   help="a policy (stage output or model dir); repeat; the first is the baseline")
    p.add_argument("--reward", required=True, help="saved reward model (rlhf.rm output)")
    p.add_argument("--reference", required=True, help="KL reference policy (the SFT output)")
    add_prompt_sampling_arguments(p, split="val", batch_size=16, temperature=0.7)
    p.add_argument("--samples-per-prompt", type=int, default=1)
    p.add_argument("--show", type=int, default=5, help="side-by-side samples in report.md")
    p.add_argument("--out", required=True, help="output directory (report.json, report.md)")
    p.add_argument("--wandb-project", default=None,
                   help="also log to a W&B run in this project (offline unless WANDB_MODE=online)")
    return p


def main(argv: Sequence[str] | None = None) -> Report:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_known_warnings()
    args = build_parser().parse_args(argv)
    policies = dict(args.policy)
    if len(policies) != len(args.policy):
        raise SystemExit("policy names must be unique")
    data = prompt_data_from_args(args, args.reference)
    sampling = sampling_from_args(args)
    report = evaluate(
        policies, args.reward, args.reference, data, sampling, split=args.split, limit=args.limit,
        samples_per_prompt=args.samples_per_prompt, seed=args.seed, device=args.device,
        precision=args.precision, progress=not args.no_progress,
    )
    out = write_report(report, args.out, args.show)
    if args.wandb_project:
        import wandb

        from rlhf.tracking import resolve_wandb_mode

        with wandb.init(project=args.wandb_project, name="evaluate", mode=resolve_wandb_mode(),
                        dir=str(out), config=report.settings):
            log_to_wandb(report)
    else:
        log_to_wandb(report)  # when called inside an active run
    print(report.to_markdown(show=0))
    print(f"wrote {out / 'report.json'} and {out / 'report.md'}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
