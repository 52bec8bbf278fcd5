"""Compare alignment methods over seeds on the gold-labeller task:
``python -m rlhf.compare --config configs/gold/compare.yaml``.

Each (method, seed) trains as an ``rlhf.fit`` child process (or, for best-of-n and the SFT
reference, trains nothing), then every policy it saved along the way is sampled on the same
held-out prompts with the same sampling seed and scored by the gold function and the proxy RM,
with KL to the reference, length and EOS rate. The report (``report.md``, ``report.json``,
``figure.png`` under the config's ``out``) gives each method's gold at the end and at its peak,
proxy, KL, length, EOS rate and wall time with 95% intervals over seeds, and gold and proxy
against sqrt(KL). Completion records make a re-run do only what is missing.

Modules: :mod:`~rlhf.compare.config` (the config), :mod:`~rlhf.compare.runs` (training,
evaluation, records), :mod:`~rlhf.compare.evaluation` (sampling and scoring),
:mod:`~rlhf.compare.snapshots` (the policy every k steps), :mod:`~rlhf.compare.stats` (the
maths), :mod:`~rlhf.compare.report` (table and figure), ``__main__`` (the command).
"""
