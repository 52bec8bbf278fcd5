"""Turning records into token ids: chat template or plain template, and truncation.

Every stage renders a prompt the same way, so the policy sees at PPO time exactly the prompt
format it was fine-tuned on. With a chat template the response ids are what the template puts
after the generation prompt, cut just after the first EOS (so ``<|im_end|>`` closes the turn and
becomes the token PPO's generation stops on). Without one, a plain dialogue template is used:
``\\n\\nHuman: ...\\n\\nAssistant:`` (the hh-rlhf format) with the response followed by EOS.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from rlhf.data.records import Conversation

PLAIN_ROLE_NAMES = {"system": "System", "user": "Human", "assistant": "Assistant"}


def plain_prompt_text(conversation: Conversation) -> str:
    """The plain (no chat template) rendering of a prompt, ending with ``\\n\\nAssistant:``."""
    turns = "".join(f"\n\n{PLAIN_ROLE_NAMES[t.role]}: {t.content}" for t in conversation)
    return turns + "\n\nAssistant:"


@dataclass(frozen=True)
class EncodedPair:
    """A prompt and one response as token ids, after truncation."""

    prompt_ids: list[int]
    response_ids: list[int]


def truncate_pair(
    prompt_ids: list[int], response_ids: list[int], max_length: int, max_prompt_length: int
) -> EncodedPair:
    """Left-truncate the prompt to ``max_prompt_length``, then right-truncate the response so
    the pair fits ``max_length``. The response keeps its start; the prompt keeps its end (the
    latest turns, which the response answers)."""
    if max_prompt_length >= max_length:
        raise ValueError(
            f"max_prompt_length ({max_prompt_length}) must be smaller than max_length ({max_length})"
        )
    prompt = prompt_ids[-max_prompt_length:] if len(prompt_ids) > max_prompt_length else prompt_ids
    return EncodedPair(list(prompt), list(response_ids[: max_length - len(prompt)]))


class PromptFormatter:
    """Renders conversations and responses to ids for one tokenizer.

    Args:
        tokenizer: a Hugging Face tokenizer with an EOS token.
        use_chat_template: ``None`` uses the tokenizer's chat template when it has one.
        system_prompt: optional system turn put before every prompt that has none.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        use_chat_template: bool | None = None,
        system_prompt: str | None = None,
    ) -> None:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; set tokenizer.eos_token first")
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if use_chat_template and not has_template:
            raise ValueError("use_chat_template=True but the tokenizer has no chat template")
        self.tokenizer = tokenizer
        self.use_chat_template = has_template if use_chat_template is None else use_chat_template
        self.system_prompt = system_prompt
        self.eos_id: int = tokenizer.eos_token_id

    def _messages(self, conversation: Conversation) -> list[dict[str, str]]:
        messages = [{"role": t.role, "content": t.content} for t in conversation]
        if self.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_text(self, conversation: Conversation) -> str:
        """The prompt as the model sees it, ending where the response starts."""
        if self.use_chat_template:
            return self.tokenizer.apply_chat_template(
                self._messages(conversation), tokenize=False, add_generation_prompt=True
            )
        return plain_prompt_text(conversation)

    def prompt_ids(self, conversation: Conversation) -> list[int]:
        """Token ids of the rendered prompt (with BOS where the tokenizer uses one)."""
        ids = self._ids(self.prompt_text(conversation))
        bos = self.tokenizer.bos_token_id
        if (
            not self.use_chat_template
            and bos is not None
            and getattr(self.tokenizer, "add_bos_token", False)
            and (not ids or ids[0] != bos)
        ):
            ids = [bos] + ids
        return ids

    def response_ids(self, conversation: Conversation, response: str) -> list[int]:
        """Token ids of ``response`` as the assistant's reply to ``conversation``, ending in EOS."""
        if self.use_chat_template:
            prompt = self.prompt_text(conversation)
            full = self.tokenizer.apply_chat_template(
                self._messages(conversation) + [{"role": "assistant", "content": response}],
                tokenize=False,
            )
            if full.startswith(prompt):
                ids = self._ids(full[len(prompt) :])
                if self.eos_id in ids:
                    return ids[: ids.index(self.eos_id) + 1]
                return ids + [self.eos_id]
        text = response if self.use_chat_template else " " + response.strip()
        return self._ids(text) + [self.eos_id]

    def decode_response(self, ids: list[int]) -> str:
        """Response ids back to text, without special tokens."""
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()
