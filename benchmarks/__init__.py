"""Side-by-side benchmarks of rlhf against TRL (``python -m benchmarks.ppo_vs_trl``)."""
