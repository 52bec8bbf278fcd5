"""The ``hydra`` critic (a trained copy of the policy's top k layers, fed the trunk's detached
hidden states below them) on a tiny 4-layer policy: its values by hand, its isolation from the
policy, learning, checkpoints and outputs, config errors, and (slow) FSDP2 on two processes."""

from __future__ import annotations

import json

import pytest
import torch
from test_ppo_module import fit, make_module, prompts
from tiny_models import build_tiny_llama, build_tiny_tokenizer

from rlhf.models.forward import position_ids_from_mask
from rlhf.models.loading import LoraSettings, ModelSettings, load_causal_lm
from rlhf.ppo.losses import value_loss
from rlhf.ppo.settings import UpdateSettings

LAYERS, K = 4, 2


@pytest.fixture(scope="module")
def tiny_deep_policy_dir(tmp_path_factory):
    """A tiny Llama of 4 layers with a peaked output distribution (as ``tiny_policy_dir``)."""
    out = tmp_path_factory.mktemp("tiny-llama-4-layers")
    tokenizer = build_tiny_tokenizer(out, chat_template=True)
    build_tiny_llama(out, tokenizer, layers=LAYERS, initializer_range=0.5)
    return out


def hydra(model_dir, **kwargs):
    return make_module(model_dir, critic="hydra", critic_layers=K, **kwargs)


def batch():
    """``(input_ids [3, 12], attention_mask, response_start=7)``: row 1 left-padded, row 2's
    response ended early."""
    ids = torch.randint(3, 500, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, 10:] = 0
    return ids, mask, 7


def perturb(module, std=0.05):
    """Move the policy adapter, the branch and the head off their initial values."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name or name.startswith(("value_branch.", "value_head.")):
                p.add_(torch.randn(p.shape, generator=generator) * std)


def by_hand(module, ids, mask, start):
    """Values ``[B, R]``: the policy's hidden state at layer L-k (transformers'
    ``output_hidden_states``), then the branch's layers called one by one with an explicit
    causal-and-padding mask and rotary embeddings, its final norm, the head."""
    out = module.model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                       output_hidden_states=True)
    h = out.hidden_states[LAYERS - K]
    decoder = module.value_branch.decoder
    positions = position_ids_from_mask(mask)
    q = torch.arange(ids.shape[1])
    allowed = (q[None, :] <= q[:, None])[None] & mask.bool()[:, None, :]  # [B, T(query), T(key)]
    allowed |= torch.eye(ids.shape[1], dtype=torch.bool)[None]  # padding queries see themselves (no NaN)
    rotary = decoder.rotary_emb(h, positions)
    for layer in decoder.layers:
        h = layer(h, attention_mask=allowed[:, None], position_embeddings=rotary, position_ids=positions)
    h = decoder.norm(h)
    return module.value_head(h[:, start - 1 : -1]).squeeze(-1)


def test_hydra_values_are_the_copied_top_layers_run_on_the_policys_lower_hidden_state(tiny_deep_policy_dir):
    module = hydra(tiny_deep_policy_dir)
    module.configure_model()
    base = load_causal_lm(ModelSettings(str(tiny_deep_policy_dir)))
    copied = module.value_branch.decoder.layers[0].mlp.up_proj.weight
    assert torch.equal(copied, base.model.layers[LAYERS - K].mlp.up_proj.weight)  # the base's, no LoRA
    assert copied.data_ptr() != base.model.layers[LAYERS - K].mlp.up_proj.weight.data_ptr()
    assert module.value_branch.source_layer == LAYERS - K
    perturb(module)
    module.model.eval()
    ids, mask, start = batch()
    with torch.no_grad():
        _, values, _ = module.policy_forward(ids, mask, start, entropy=False)
        expected = by_hand(module, ids, mask, start)
    on = mask[:, start:].bool()
    torch.testing.assert_close(values[on], expected[on], rtol=0, atol=1e-5)
    assert float(values[on].abs().max()) > 1e-2  # not trivially zero


@pytest.mark.parametrize("old_logprobs, atol", [("generation", 1e-4), ("recompute", 1e-5)])
def test_rollout_values_from_generation_equal_a_full_pass(tmp_path, tiny_deep_policy_dir, old_logprobs, atol):
    # From generation the branch reads the layer-(L-k) states the KV-cached decoding recorded
    # (float rounding apart, the full pass's); recomputed they are the full pass's own.
    torch.manual_seed(0)
    module = hydra(tiny_deep_policy_dir, update=UpdateSettings(ppo_epochs=2, minibatch_size=8,
                                                               old_logprobs=old_logprobs))
    module.configure_model()
    perturb(module)
    data = prompts(tmp_path)
    data.tokenizer_name = str(tiny_deep_policy_dir)
    data.setup("fit")
    rollout = module.make_rollout(next(iter(data.train_dataloader())))
    with torch.no_grad():
        expected = by_hand(module, rollout.input_ids, rollout.attention_mask, rollout.response_start)
    on = rollout.response_mask.bool()
    torch.testing.assert_close(rollout.values[on], expected[on], rtol=0, atol=atol)


def test_a_value_loss_gradient_trains_the_branch_and_never_the_policy(tiny_deep_policy_dir):
    module = hydra(tiny_deep_policy_dir)
    module.configure_model()
    perturb(module)
    ids, mask, start = batch()
    logp, values, _ = module.policy_forward(ids, mask, start, entropy=False)
    values.pow(2).sum().backward()
    named = dict(module.named_parameters())
    policy = {n: p for n, p in named.items() if ".policy." in n}
    critic = {n: p for n, p in named.items() if n.startswith(("value_branch.", "value_head."))}
    assert policy and all(p.grad is None for p in policy.values())
    assert all(p.grad is not None for p in critic.values())
    assert float(named["value_branch.decoder.layers.0.self_attn.q_proj.weight"].grad.abs().max()) > 0
    before = {n: p.detach().clone() for n, p in policy.items()}
    torch.optim.AdamW(module.trainable_parameters(), lr=1e-2).step()
    assert all(torch.equal(p, before[n]) for n, p in policy.items())
    assert logp.requires_grad  # the policy's own loss still reaches the trunk


def test_trainable_parameters_are_the_policy_adapter_k_layers_the_norm_and_the_head(tiny_deep_policy_dir):
    module = hydra(tiny_deep_policy_dir)
    module.configure_model()
    base = load_causal_lm(ModelSettings(str(tiny_deep_policy_dir)))
    hidden = base.config.hidden_size
    branch = sum(p.numel() for p in base.model.layers[LAYERS - K :].parameters()) + base.model.norm.weight.numel()
    lora = sum(p.numel() for n, p in module.named_parameters() if ".policy." in n)
    trained = module.trainable_parameters()
    assert sum(p.numel() for p in trained) == lora + branch + hidden + 1
    assert all(p.dtype == module.value_head.weight.dtype == torch.float32 for p in trained)
    assert not any(n.startswith("value_branch.decoder.embed") for n, _ in module.named_parameters())


def test_the_value_loss_falls_on_a_fixed_rollout(tmp_path, tiny_deep_policy_dir):
    torch.manual_seed(0)
    module = hydra(tiny_deep_policy_dir)
    module.configure_model()
    data = prompts(tmp_path)
    data.tokenizer_name = str(tiny_deep_policy_dir)
    data.setup("fit")
    rollout = module.make_rollout(next(iter(data.train_dataloader())))
    critic = [p for n, p in module.named_parameters() if n.startswith(("value_branch.", "value_head."))]
    optimizer = torch.optim.Adam(critic, lr=3e-3)
    losses = []
    for _ in range(15):
        _, values, _ = module.policy_forward(rollout.input_ids, rollout.attention_mask, rollout.response_start,
                                             entropy=False)
        # A wide value clip: the fixed old values would otherwise cap how far one batch moves them.
        loss, _ = value_loss(values, rollout.values, rollout.returns, rollout.response_mask, 1e6)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses  # 1.93 -> 0.55 here


def test_ppo_iterations_train_the_branch_and_checkpoints_and_outputs_hold_it(tmp_path, tiny_deep_policy_dir):
    torch.manual_seed(0)
    module = hydra(tiny_deep_policy_dir, iterations=4, output_dir=str(tmp_path / "out"))
    history = fit(module, prompts(tmp_path), tmp_path)
    assert len(history) == 4
    assert all(torch.isfinite(torch.tensor(list(h.values()))).all() for h in history)
    assert "value/loss" in history[-1]
    trained = {k: v.detach().clone() for k, v in module.value_branch.state_dict().items()}

    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    kept = set(checkpoint["state_dict"])
    assert {f"value_branch.{k}" for k in trained} <= kept
    assert all(".policy." in k or k.startswith(("value_head.", "value_branch.")) for k in kept)

    fresh = hydra(tiny_deep_policy_dir, iterations=4)
    fresh.configure_model()
    assert any(not torch.equal(v, trained[k]) for k, v in fresh.value_branch.state_dict().items())  # it trained
    result = fresh.load_state_dict(checkpoint["state_dict"], strict=False)
    assert not result.unexpected_keys and not any(k.startswith("value_") for k in result.missing_keys)
    assert all(torch.equal(v, trained[k]) for k, v in fresh.value_branch.state_dict().items())

    saved = torch.load(tmp_path / "out" / "value_branch.pt", weights_only=True)
    assert saved.keys() == trained.keys() and all(torch.equal(saved[k], trained[k]) for k in saved)
    assert (tmp_path / "out" / "value_head.pt").is_file()


@pytest.mark.parametrize("kwargs, message", [
    ({"critic_layers": 0}, "critic_layers must be >= 1"),
    ({"critic_layers": LAYERS}, r"critic_layers must be in 1\.\.3 .*4 decoder layers"),
    ({"critic_layers": 2, "critic": "twin"}, "critic must be one of shared, adapter, hydra"),
])
def test_bad_hydra_settings_fail_at_construction(tiny_deep_policy_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_module(tiny_deep_policy_dir, **{"critic": "hydra", **kwargs})


def test_a_quantised_base_is_refused_for_hydra(tiny_deep_policy_dir):
    base = ModelSettings(str(tiny_deep_policy_dir), lora=LoraSettings(r=8), quantization="4bit")
    with pytest.raises(ValueError, match="critic: hydra trains a full-precision copy"):
        make_module(tiny_deep_policy_dir, base=base, critic="hydra")


@pytest.mark.slow
def test_hydra_under_fsdp2_on_two_processes_resumes_and_equals_the_unsharded_outputs(tmp_path, tiny_deep_policy_dir):
    # The branch is its own FSDP2 unit: its values agree across ranks, its tensors travel in the
    # consolidated checkpoint (a resumed run starts from them) and in the saved outputs.
    from distributed_runs import (
        ROWS,
        ppo_config,
        probe_ppo,
        read_safetensors,
        run_fit,
        stop_after,
        write_data,
    )
    from peft import set_peft_model_state_dict
    from resume_runs import build_tiny_reward_model, one_thread, write_config

    from rlhf.ppo.settings import RewardSettings

    (tmp_path / "data").mkdir()
    data = write_data(tmp_path / "data")
    reward_model = build_tiny_reward_model(tmp_path / "rm", tiny_deep_policy_dir)

    def config(probe, stop_at=None):
        run = ppo_config(tmp_path, tiny_deep_policy_dir, reward_model, data["prompts"], batch_size=ROWS // 2,
                         iterations=2, probe=probe, checkpoint_every=2)
        run["model"]["init_args"].update(critic="hydra", critic_layers=K)
        return write_config(tmp_path / f"{probe}.yaml", stop_after(run, stop_at) if stop_at else run)

    def probe(name):
        record = json.loads((tmp_path / f"{name}.json").read_text())
        first, second = (torch.tensor(r["values"]) for r in record["ranks"])
        torch.testing.assert_close(first, second, rtol=0, atol=1e-6)  # the replicas agree
        return record

    first = run_fit(config("first", stop_at=2), strategy="fsdp2")  # one of two iterations
    assert first.returncode == 0, first.stderr[-4000:]
    assert first.stderr.count("layers + 2 heads") == 2, first.stderr[-3000:]  # value head and branch
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert any(k.startswith("value_branch.decoder.layers.1.") for k in checkpoint["state_dict"])
    second = run_fit(config("second"), "--ckpt_path", "last", strategy="fsdp2")
    assert second.returncode == 0, second.stderr[-4000:]
    stopped, resumed = probe("first-train_end"), probe("second-train_start")
    torch.testing.assert_close(torch.tensor(resumed["values"]), torch.tensor(stopped["values"]), rtol=0, atol=1e-6)
    final = probe("second-train_end")

    with one_thread():
        module = make_module(tiny_deep_policy_dir, base=ModelSettings(str(tiny_deep_policy_dir), lora=LoraSettings(r=4)),
                             reward=RewardSettings(model=str(reward_model)), critic="hydra", critic_layers=K)
        module.scorer = None
        module.configure_model()
        out = tmp_path / "out"
        adapter = read_safetensors(out / "adapter" / "policy" / "adapter_model.safetensors")
        assert not set_peft_model_state_dict(module.model, adapter, adapter_name="policy").unexpected_keys
        module.value_head.load_state_dict(torch.load(out / "value_head.pt", weights_only=True))
        module.value_branch.load_state_dict(torch.load(out / "value_branch.pt", weights_only=True))
        expected = probe_ppo(module)
    torch.testing.assert_close(torch.tensor(final["values"]), torch.tensor(expected["values"]), rtol=0, atol=1e-5)
    assert float(torch.tensor(final["values"]).abs().max()) > 1e-4  # the critic trained
