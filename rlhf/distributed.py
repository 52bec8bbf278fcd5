"""Sharding the stage models: FSDP2 (``fully_shard``) under Lightning's ``ModelParallelStrategy``,
FSDP1 under ``FSDPStrategy``, nothing under DDP or one device.

FSDP2 layout (:func:`shard_model`, called at the end of each stage's ``configure_model``)::

    fully_shard(layer) for every decoder layer   # LoRA weights shard with their layer
    fully_shard(head)  for every extra head      # called outside the root (PPO value head, hydra branch)
    fully_shard(root)                            # embeddings, final norm, (tied) LM head, ...

The root's forward all-gathers its parameters (the embedding matrix, the final norm, the LM
head, a reward model's score head); each layer gathers its own during its forward and frees
them after it. Code that calls a part of the root directly (PPO runs the decoder and the LM head
as two calls, skipping the full-vocabulary logits of the prompt) wraps the call in
:func:`root_forward`, which runs FSDP's forward hooks of the root around it.

Every rank must run the same sharded forwards: sampled generation stops at EOS at different
steps on different ranks, so :func:`synced_generation` tells ``generate`` to keep stepping
(``synced_gpus``) until every rank is done.

Checkpoints: :class:`FSDP2Strategy` saves one consolidated file (rank 0), in which the stage
modules keep only the trained tensors, like a one-device run; ``--ckpt_path`` resumes it.
(Lightning's sharded checkpoint directories, ``save_distributed_checkpoint=True``, cannot hold
such a partial state: its loader wants every tensor.)
Outputs: :func:`consolidate_on_rank_zero` gathers the trained weights so rank 0 can write the
stage's ``save_pretrained`` folders.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import nn

if TYPE_CHECKING:
    import lightning as L
    from torch.distributed.device_mesh import DeviceMesh

log = logging.getLogger("rlhf.distributed")

T = TypeVar("T")

# Set on decoder layers by shard_model; fsdp1_auto_wrap_policy wraps the modules carrying it.
FSDP1_UNIT = "_rlhf_fsdp_unit"
# The method shard_model registers on an FSDP2 root for root_forward.
_ROOT_CALL = "_rlhf_root_call"


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` set up for pure FSDP2 data parallelism.

    Differences from the parent: ``data_parallel_size="auto"`` is every process (the
    parent's ``"auto"`` is the number of nodes, with the rest going to tensor parallelism),
    the tensor-parallel size is 1, and checkpoints are always one consolidated file
    (``save_distributed_checkpoint=False``): the stage modules keep only trained tensors in
    checkpoints, and Lightning's sharded-checkpoint loader cannot load such a partial state.

    Args:
        data_parallel_size: processes in the FSDP group; ``"auto"`` = all of them.
        process_group_backend: ``None`` picks ``nccl`` on CUDA, ``gloo`` on CPU.
        timeout: collective timeout.
    """

    def __init__(
        self,
        data_parallel_size: Literal["auto"] | int = "auto",
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(data_parallel_size, tensor_parallel_size=1, save_distributed_checkpoint=False,
                         process_group_backend=process_group_backend, timeout=timeout)

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


def language_model(model: nn.Module) -> nn.Module:
    """The ``*ForCausalLM`` of a model: inside a peft wrapper, or a reward model's backbone."""
    if hasattr(model, "language_model") and not hasattr(model, "get_decoder"):
        model = model.language_model  # rlhf.models.reward.RewardModel
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a causal LM (``model.model.layers`` for Llama, ``transformer.h``
    for GPT-2, ...), through peft and reward-model wrappers."""
    decoder = language_model(model).get_decoder()
    for name in ("layers", "h", "blocks"):
        layers = getattr(decoder, name, None)
        if isinstance(layers, nn.ModuleList) and len(layers):
            return list(layers)
    raise ValueError(f"cannot find the decoder layers of {type(decoder).__name__} (no layers/h/blocks list)")


def _strategy(module: L.LightningModule) -> Any:
    trainer = module._trainer  # None outside a Trainer (configure_model called by hand)
    return trainer.strategy if trainer is not None else None


def _data_parallel_mesh(module: L.LightningModule) -> DeviceMesh | None:
    mesh = module.device_mesh  # set by ModelParallelStrategy before configure_model
    if mesh is None:
        return None
    if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            "tensor parallelism is not supported for the stage models: use rlhf.distributed.FSDP2Strategy "
            "(configs/strategy/fsdp2.yaml), or ModelParallelStrategy with tensor_parallel_size=1 and "
            "data_parallel_size=<processes> (and save_distributed_checkpoint=False to resume)"
        )
    return mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh


def shard_model(
    module: L.LightningModule,
    root: nn.Module,
    model: nn.Module,
    heads: Sequence[nn.Module] = (),
) -> bool:
    """Shard a stage's model for the module's strategy; returns whether FSDP2 was applied.

    Under ``ModelParallelStrategy`` (FSDP2): ``fully_shard`` each decoder layer of ``model``
    (:func:`decoder_layers`), then each of ``heads`` (modules called on their own, outside
    ``root``'s forward), then ``root``, all on the data-parallel mesh. ``root`` must be the
    module whose forward every pass goes through (or :func:`root_forward`). Under
    ``FSDPStrategy`` (FSDP1) the layers are only marked for :func:`fsdp1_auto_wrap_policy`;
    Lightning wraps them after ``configure_model``. Otherwise (one device, DDP) nothing happens.

    Args:
        module: the LightningModule (its strategy and device mesh decide what happens).
        root: the module holding everything not in the layers or ``heads``.
        model: the causal LM (or its peft / reward-model wrapper) whose layers become units.
        heads: further separately called modules, one FSDP unit each.
    """
    strategy = _strategy(module)
    if isinstance(strategy, FSDPStrategy):
        for layer in decoder_layers(model):
            setattr(layer, FSDP1_UNIT, True)
        return False
    mesh = _data_parallel_mesh(module)
    if mesh is None:
        return False
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    layers = decoder_layers(model)
    for unit in [*layers, *heads]:
        fully_shard(unit, mesh=mesh)
    fully_shard(root, mesh=mesh)
    # root_forward's entry point: a method whose calls FSDP treats as forwards of the root.
    setattr(root, _ROOT_CALL, _call.__get__(root, type(root)))
    register_fsdp_forward_method(root, _ROOT_CALL)
    log.info("FSDP2: sharded %d layers + %d heads + root %s over %d processes",
             len(layers), len(heads), type(root).__name__, mesh.size())
    return True


def _call(self: nn.Module, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return fn(*args, **kwargs)


def root_forward(root: nn.Module, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` run as a forward of ``root``: when :func:`shard_model` sharded
    ``root`` with FSDP2, its parameters are all-gathered first and its backward hooks are
    registered on the result. Use it for calls into a part of the root (e.g. the decoder or
    the LM head alone); without FSDP2 it is a plain call."""
    call = getattr(root, _ROOT_CALL, None)
    return call(fn, *args, **kwargs) if call is not None else fn(*args, **kwargs)


def fsdp1_auto_wrap_policy(module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
    """``auto_wrap_policy`` for ``FSDPStrategy``: one FSDP unit per decoder layer (the layers
    :func:`shard_model` marked), the rest in the root unit."""
    return True if recurse else bool(getattr(module, FSDP1_UNIT, False))


def is_sharded(model: nn.Module) -> bool:
    """Whether any submodule of ``model`` is managed by FSDP (1 or 2)."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules())


def synced_generation(model: nn.Module) -> bool:
    """Whether ``generate`` must run with ``synced_gpus=True``: a sharded model in a
    multi-process run, where every forward is a collective, so a rank whose responses all hit
    EOS keeps stepping until every rank is done."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and is_sharded(model)


def consolidate_on_rank_zero(module: L.LightningModule) -> bool:
    """Collective (call on every rank): gather the sharded module's full weights and, on rank 0,
    rebuild ``module.model`` (and the other modules ``configure_model`` builds) unsharded with
    those weights, on the module's device, so rank 0 can save outputs with the usual
    single-process code. Returns whether anything was done (``False`` when not sharded).

    Afterwards rank 0's module is no longer sharded while the others' still are: call it when
    training is over.
    """
    strategy = _strategy(module)
    wrapped = strategy.model if strategy is not None else None
    if wrapped is None or not is_sharded(wrapped):
        return False
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # Full tensors on rank 0 (in CPU memory), an empty dict on the other ranks.
    state = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if module.trainer.is_global_zero:
        mesh, module._device_mesh = module._device_mesh, None
        try:
            module.model = None
            module.configure_model()  # unsharded: no mesh
        finally:
            module._device_mesh = mesh
        missing = [k for k in module.state_dict() if k not in state and not k.startswith("scorer.")]
        if missing:
            raise RuntimeError(f"consolidated state lacks {len(missing)} tensors, e.g. {missing[:3]}")
        module.load_state_dict(state, strict=False)
        module.to(module.device)
    return True
