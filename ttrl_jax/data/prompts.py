"""Questions → chat-templated prompt token ids → left-padded prompt buckets.

The question is the user turn of the tokenizer's chat template (with the template's default
system turn unless data.system_prompt replaces it). A prompt longer than data.max_prompt_tokens
is an error naming the item, or is skipped and counted with data.skip_long_prompts.

Shape suffixes: ttrl_jax/__init__.py.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from ttrl_jax.data import benchmarks as data_lib

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Task:
    """The prompts of one benchmark, tokenized."""

    name: str
    items: list[data_lib.Item]
    prompt_ids: list[list[int]]

    @property
    def golds(self) -> list[str | None]:
        return [it.get("answer") for it in self.items]


def load_task(name_or_path: str, tokenizer: Any, d: Any) -> Task:
    """A benchmark's items and prompt ids under the data section `d` (config.DataSection)."""
    items = data_lib.load_benchmark(name_or_path, d.split)
    prompt_ids, items, _ = build_prompts(
        items, tokenizer, d.system_prompt, d.max_prompt_tokens, d.skip_long_prompts,
        d.enable_thinking, template=d.prompt_template,
    )  # fmt: skip
    if not items:
        raise ValueError(f"{name_or_path}: no prompt fits data.max_prompt_tokens")
    return Task(name_or_path, items, prompt_ids)


def chat_prompt_text(
    question: str,
    tokenizer: Any,
    system_prompt: str | None,
    enable_thinking: bool | None = None,
    template: str = "{question}",
) -> str:
    """The chat template applied to one question as the user turn, ready for the assistant.

    `template` wraps the question first: its "{question}" is replaced by it (plain text
    replacement, so LaTeX braces such as \boxed{} need no escaping).
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)!r} has no "
            "chat template; use a checkpoint whose tokenizer_config.json defines chat_template"
        )
    messages = [{"role": "user", "content": template.replace("{question}", question)}]
    if system_prompt is not None:
        messages.insert(0, {"role": "system", "content": system_prompt})
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **kwargs
    )


def build_prompts(
    items: Sequence[data_lib.Item],
    tokenizer: Any,
    system_prompt: str | None,
    max_prompt_tokens: int,
    skip_long: bool,
    enable_thinking: bool | None = None,
    template: str = "{question}",
    limit_name: str = "data.max_prompt_tokens",
    fix: str = (
        "raise data.max_prompt_tokens (with a sample.prompt_buckets entry that large) or set "
        "data.skip_long_prompts=true"
    ),
) -> tuple[list[list[int]], list[data_lib.Item], int]:
    """Token ids of each item's chat prompt, checked against the prompt budget.

    Args:
      items: from `load_benchmark`.
      tokenizer: a transformers tokenizer with a chat template.
      system_prompt: the system turn; None keeps the template's default (Qwen2.5-Math's asks
        for the final answer in \\boxed{}).
      max_prompt_tokens: the longest prompt allowed.
      skip_long: drop longer prompts (and count them) instead of raising.
      enable_thinking: passed to templates that know it (Qwen3); None = template default.
      template: the user turn, "{question}" replaced by each item's question.
      limit_name, fix: how the too-long-prompt error names the limit and the remedy.

    Returns:
      (prompt_ids, kept_items, n_skipped): ids per kept item, the kept items in order, and
      how many were skipped as too long.

    Raises:
      ValueError: a prompt is longer than max_prompt_tokens and skip_long is False.
    """
    texts = [
        chat_prompt_text(it["prompt"], tokenizer, system_prompt, enable_thinking, template)
        for it in items
    ]
    # The template already holds any BOS token, so the tokenizer must not add another.
    all_ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    prompt_ids, kept, n_skipped = [], [], 0
    for item, ids in zip(items, all_ids):
        if len(ids) > max_prompt_tokens:
            if not skip_long:
                raise ValueError(
                    f"prompt of item '{item['id']}' has {len(ids)} tokens, more than "
                    f"{limit_name}={max_prompt_tokens}. Fix: {fix}"
                )
            n_skipped += 1
            continue
        prompt_ids.append(list(ids))
        kept.append(item)
    if n_skipped:
        logger.warning(
            "skipped %d of %d prompts longer than %d tokens",
            n_skipped,
            len(items),
            max_prompt_tokens,
        )
    return prompt_ids, kept, n_skipped


def bucket_and_pad(
    prompt_ids: Sequence[Sequence[int]], buckets: Sequence[int], pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads a batch of prompts to the smallest bucket that holds its longest prompt.

    Args:
      prompt_ids: P token-id lists, none empty.
      buckets: allowed padded lengths.
      pad_id: id written into padding positions.

    Returns:
      (tokens_PT int32, mask_PT bool) with T the chosen bucket; mask is True on real tokens,
      which sit at the right end of each row.
    """
    if not prompt_ids:
        raise ValueError("bucket_and_pad needs at least one prompt")
    lengths = [len(ids) for ids in prompt_ids]
    if min(lengths) == 0:
        raise ValueError(f"prompt {lengths.index(0)} of the batch is empty")
    longest = max(lengths)
    fitting = [b for b in buckets if b >= longest]
    if not fitting:
        raise ValueError(
            f"the longest prompt of the batch has {longest} tokens but the largest prompt bucket "
            f"is {max(buckets, default=0)}; add a bucket >= {longest} to sample.prompt_buckets "
            "or lower data.max_prompt_tokens"
        )
    t = min(fitting)
    tokens_PT = np.full((len(prompt_ids), t), pad_id, dtype=np.int32)
    mask_PT = np.zeros((len(prompt_ids), t), dtype=bool)
    for p, ids in enumerate(prompt_ids):
        tokens_PT[p, t - len(ids) :] = ids
        mask_PT[p, t - len(ids) :] = True
    return tokens_PT, mask_PT
