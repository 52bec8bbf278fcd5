"""The "hydra" value branch (trlx): a trained copy of a causal LM's top ``k`` decoder layers.

A critic between a linear head on the policy's features (a probe) and a second LoRA adapter
(a second full trunk pass): the policy's trunk runs once, and the branch reads the hidden
states that trunk pass makes at layer ``L - k`` (``L`` decoder layers; the input of layer
``L - k``, ``output_hidden_states[L - k]`` in transformers' numbering) and runs its own copy of
the top ``k`` layers and the final norm on them. Its cost is ``k`` layers forward and backward;
its memory is ``k / L`` of the base's layers (in the trained dtype) plus their optimizer state.

The hidden states are taken with a forward hook on layer ``L - k - 1``
(:func:`recorded_layer_outputs`): only that layer's output is kept, not every layer's, and the
same hook records them while ``generate`` decodes with its KV cache (the prefill's ``[B, P, H]``,
then ``[B, 1, H]`` a step), so values can come from generation too.

Shapes: ``B`` sequences, ``T`` tokens, ``H`` hidden size; prompts left-padded, every response
starting at column ``P`` (``response_start``), ``R`` response tokens.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from rlhf.distributed import decoder_layers
from rlhf.models.forward import position_ids_from_mask

__all__ = ["ValueBranch", "check_branch_layers", "recorded_layer_outputs"]

# Where decoders keep their block list (as rlhf.distributed.decoder_layers looks for it).
_LAYER_LISTS = ("layers", "h", "blocks")
# The check that the copied decoder, fed hidden states, computes what the trunk's top layers do.
_CHECK_TOKENS = 8
_CHECK_TOLERANCE = 1e-3


def check_branch_layers(layers: int, depth: int, model_name: str) -> None:
    """Raise ``ValueError`` unless ``1 <= layers < depth``: the branch copies the top ``layers``
    of a ``depth``-layer decoder and reads the hidden state below them, so at least one layer
    must stay shared (``layers == depth`` would be a second full network)."""
    if not 1 <= layers < depth:
        raise ValueError(
            f"model.init_args.critic_layers must be in 1..{depth - 1} for {model_name} ({depth} decoder "
            f"layers): the hydra critic copies the top critic_layers layers and reads the hidden state "
            f"below them (got {layers})"
        )


def _layer_list_name(decoder: nn.Module) -> str:
    for name in _LAYER_LISTS:
        if isinstance(getattr(decoder, name, None), nn.ModuleList):
            return name
    raise ValueError(f"cannot find the decoder layers of {type(decoder).__name__} (no layers/h/blocks list)")


def _attribute_of(parent: nn.Module, child: nn.Module) -> str:
    for name, module in parent.named_children():
        if module is child:
            return name
    raise ValueError(f"{type(child).__name__} is not a direct child of {type(parent).__name__}")


def _layer_output(output: torch.Tensor | tuple) -> torch.Tensor:
    """A decoder layer's hidden states: the output itself (Llama in transformers 5) or its
    first element (layers that return a tuple)."""
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def recorded_layer_outputs(model: nn.Module, index: int) -> Iterator[list[torch.Tensor]]:
    """While the block runs, append the output hidden states of decoder layer ``index`` of
    ``model`` (a causal LM, through peft wrappers) to the yielded list: one ``[B, T, H]`` from a
    full forward; from ``generate``, the prefill's ``[B, P, H]`` and one ``[B, 1, H]`` a step.

    The hook is removed when the block ends, so a backward that recomputes the layer
    (activation checkpointing) records nothing; the tensors are kept as computed (in the
    autograd graph when it is on: detach them to stop gradients there).
    """
    outputs: list[torch.Tensor] = []

    def keep(module: nn.Module, args: tuple, output: torch.Tensor | tuple) -> None:
        outputs.append(_layer_output(output))

    handle = decoder_layers(model)[index].register_forward_hook(keep)
    try:
        yield outputs
    finally:
        handle.remove()


class ValueBranch(nn.Module):
    """A copy of the top ``layers`` decoder layers of a causal LM, with its final norm, run on
    the hidden states at layer ``L - layers`` of that LM's trunk.

    Build it with :meth:`from_top_layers`. The copy is the LM's own decoder class holding only
    the top layers (no input embeddings), fed the hidden states as ``inputs_embeds``: the
    decoder makes the causal mask and the rotary position embeddings from the attention mask
    and position ids exactly as the trunk does. :meth:`from_top_layers` checks that on a short
    input, so a decoder that changes ``inputs_embeds`` before its layers (GPT-2 adds position
    embeddings, Granite multiplies them by ``embedding_multiplier``) is refused, not silently
    wrong.

    Attributes:
        decoder: the copied decoder (top layers, final norm, rotary embedding).
        source_layer: ``L - layers``, the index of the trunk's hidden state the branch reads
            (0 = the embeddings): the output of decoder layer ``source_layer - 1``.
    """

    def __init__(self, decoder: nn.Module, source_layer: int) -> None:
        super().__init__()
        self.decoder = decoder
        self.source_layer = source_layer

    @classmethod
    def from_top_layers(cls, lm: nn.Module, layers: int, model_name: str = "the model") -> ValueBranch:
        """Copy the top ``layers`` decoder layers and the final norm of ``lm`` (a plain causal
        LM: build the branch before LoRA is applied, so it starts from the base weights) in the
        LM's dtype, trainable. The embeddings and the lower layers are never copied. Raises
        ``ValueError`` for ``layers`` outside ``1..L-1`` or a decoder that does not take hidden
        states as ``inputs_embeds`` unchanged."""
        decoder = lm.get_decoder()
        list_name = _layer_list_name(decoder)
        all_layers = getattr(decoder, list_name)
        depth = len(all_layers)
        check_branch_layers(layers, depth, model_name)
        embeddings = decoder.get_input_embeddings()
        embeddings_name = _attribute_of(decoder, embeddings)
        # Deep-copy the decoder with only its top layers and without its embeddings in place,
        # then put them back: the whole decoder is never copied.
        setattr(decoder, list_name, nn.ModuleList(list(all_layers)[depth - layers :]))
        setattr(decoder, embeddings_name, None)
        try:
            branch_decoder = copy.deepcopy(decoder)
        finally:
            setattr(decoder, list_name, all_layers)
            setattr(decoder, embeddings_name, embeddings)
        config = branch_decoder.config
        config.num_hidden_layers = layers
        if isinstance(getattr(config, "layer_types", None), list):  # per-layer attention kinds
            config.layer_types = config.layer_types[depth - layers :]
        branch = cls(branch_decoder, depth - layers)
        branch.requires_grad_(True)
        branch.check_against(lm)
        return branch

    @torch.no_grad()
    def check_against(self, lm: nn.Module) -> None:
        """Raise ``ValueError`` unless the branch, run on ``lm``'s hidden states at layer
        ``source_layer`` of a short input, gives ``lm``'s final hidden states (call it while
        the branch still holds ``lm``'s weights)."""
        param = next(lm.parameters())
        ids = torch.arange(_CHECK_TOKENS, device=param.device).unsqueeze(0) % lm.get_input_embeddings().num_embeddings
        mask = torch.ones_like(ids)
        was_training = lm.training, self.training
        lm.eval()
        self.eval()
        try:
            with recorded_layer_outputs(lm, self.source_layer - 1) as lower:
                expected = lm.get_decoder()(input_ids=ids, attention_mask=mask,
                                            position_ids=position_ids_from_mask(mask), use_cache=False)
            got = self(lower[0], mask)
        finally:
            lm.train(was_training[0])
            self.train(was_training[1])
        want = expected.last_hidden_state.float()
        error = float((got.float() - want).abs().max() / want.abs().max().clamp(min=1e-6))
        if not error <= _CHECK_TOLERANCE:
            raise ValueError(
                f"critic: hydra does not support {type(lm).__name__}: its decoder, fed the hidden states "
                f"at layer {self.source_layer}, does not reproduce its top layers (relative error {error:.3g}); "
                "it changes its inputs_embeds before the layers. Use critic: shared or adapter"
            )

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The copied top layers and final norm on ``hidden`` ``[B, T, H]`` (the trunk's states
        at layer ``source_layer``) under ``attention_mask`` ``[B, T]`` (left padding allowed:
        positions count real tokens, as in the trunk): ``[B, T, H]``."""
        return self.decoder(
            inputs_embeds=hidden.to(self.dtype),
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        ).last_hidden_state

    def response_states(
        self, recorded: Sequence[torch.Tensor], attention_mask: torch.Tensor, response_start: int, length: int
    ) -> torch.Tensor:
        """The branch's final hidden states ``[B, length, H]`` at the positions that predict the
        ``length`` response tokens (columns ``response_start - 1`` to ``response_start + length
        - 2``), from the trunk's layer-``source_layer`` states recorded by
        :func:`recorded_layer_outputs` (one ``[B, T, H]``, or generation's pieces, joined in
        order) and the sequences' ``attention_mask`` ``[B, P + R]``.

        The recorded states are detached: the value loss trains the branch and never reaches
        the policy's trunk. Causal attention makes a position's output depend only on the
        positions before it, so the columns after the last predicting one are not run.
        """
        if not recorded:
            raise RuntimeError("no hidden states were recorded for the hydra value branch")
        end = response_start - 1 + length
        hidden = torch.cat(list(recorded), dim=1)[:, :end].detach()
        if hidden.shape[1] < end:
            raise RuntimeError(f"recorded {hidden.shape[1]} positions for the hydra value branch, need {end}")
        return self(hidden, attention_mask[:, :end])[:, response_start - 1 :]
