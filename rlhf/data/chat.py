"""Chat rendering: a conversation -> token ids and a loss mask (1 = train on this token).

The Llama 2 chat format (Meta's reference ``chat_completion``), with BOS/EOS as token ids:

    <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user 1} [/INST] {answer 1} </s><s>[INST] {user 2} [/INST]

Each finished turn is BOS + ``"[INST] {user} [/INST]"`` + ``" {answer} "`` + EOS; a final user
turn is BOS + ``"[INST] {user} [/INST]"``. Message contents are stripped. The two text segments of
a turn are tokenized separately, without special tokens, so the loss mask falls exactly on the
answer tokens and their EOS, and ``render_prompt(conversation)`` is a prefix of
``render(conversation + [answer])``.

An answer cut off at the token limit never generated the EOS that closes it: ``unfinished``
renders it open, so it is neither scored nor trained as a finished answer.

``template="tokenizer"`` uses the tokenizer's own chat template instead; the mask of each
assistant turn is what rendering that turn adds to the rendered prefix before it.

``llama2_jinja()`` writes the llama2 format as a Jinja chat template, so that a saved model's
``tokenizer.apply_chat_template`` speaks the format it was trained on (``rlhf.chat_template``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence

from rlhf.data.records import Message

Template = Literal["llama2", "tokenizer"]
LossOn = Literal["all", "last"]

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
CHAT_MARKERS = (B_INST, E_INST, B_SYS.strip(), E_SYS.strip())


@dataclass
class Rendered:
    ids: list[int]  # (T,)
    loss_mask: list[int]  # (T,) 1 on answer tokens (and the EOS closing each answer)


def as_messages(messages: Sequence[Message | dict]) -> list[Message]:
    return [m if isinstance(m, Message) else Message(m["role"], m["content"]) for m in messages]


def render(
    messages: Sequence[Message | dict],
    tokenizer: Any,
    template: Template = "llama2",
    loss_on: LossOn = "all",
) -> Rendered:
    """Token ids and loss mask of a conversation. ``loss_on="all"`` trains on every assistant
    turn, ``"last"`` only on the final one (Ghost Attention trains on the last turn only)."""
    messages = as_messages(messages)
    turns = _turns(messages)
    if template == "llama2":
        rendered = _render_llama2(turns, tokenizer)
    elif template == "tokenizer":
        rendered = _render_with_chat_template(messages, tokenizer)
    else:
        raise ValueError(f"unknown chat template {template!r} (expected llama2 or tokenizer)")
    if loss_on == "last":
        rendered.loss_mask = _only_last_span(rendered.loss_mask)
    elif loss_on != "all":
        raise ValueError(f"loss_on: expected 'all' or 'last', got {loss_on!r}")
    return rendered


def render_prompt(
    messages: Sequence[Message | dict], tokenizer: Any, template: Template = "llama2"
) -> list[int]:
    """Token ids that ask the model for the next answer: the conversation must end with a user
    turn; the ids end right after its ``[/INST]`` (or the template's generation prompt)."""
    messages = as_messages(messages)
    if not messages or messages[-1].role != "user":
        raise ValueError("render_prompt: the conversation must end with a user turn")
    if template == "tokenizer":
        return _apply_template(tokenizer, messages, add_generation_prompt=True)
    return render(messages, tokenizer, template).ids


def unfinished(rendered: Rendered, eos_token_id: int) -> Rendered:
    """``rendered`` with its last answer left open (an answer cut at ``max_new_tokens``): cut
    before the last EOS of the last answer's span, so the EOS and whatever the template puts
    after it go. Earlier turns keep theirs; unchanged when the last answer holds no EOS.

    llama2 ``... [/INST] ok no </s>`` -> ``... [/INST] ok no``"""
    last = _only_last_span(rendered.loss_mask)
    closing = [t for t, (i, m) in enumerate(zip(rendered.ids, last)) if m and i == eos_token_id]
    if not closing:
        return rendered
    return Rendered(rendered.ids[: closing[-1]], rendered.loss_mask[: closing[-1]])


def _turns(messages: list[Message]) -> list[tuple[str, str | None]]:
    """[(user text, answer or None)], the system prompt folded into the first user text.
    Raises ValueError unless roles go (system) user assistant user ... ."""
    system = None
    if messages and messages[0].role == "system":
        system, messages = messages[0].content.strip(), messages[1:]
    for i, m in enumerate(messages):
        expected = "a user" if i % 2 == 0 else "an assistant"
        if m.role != expected.split()[1]:
            raise ValueError(
                f"message {i + (system is not None)}: expected {expected} turn, got {m.role!r} "
                "(roles must go: optional system, then user and assistant alternating)"
            )
    if not messages:
        raise ValueError("a conversation needs at least one user turn")
    users = [m.content.strip() for m in messages[0::2]]
    answers = [m.content.strip() for m in messages[1::2]]
    if system is not None:
        users[0] = f"{B_SYS}{system}{E_SYS}{users[0]}"
    return [(u, answers[i] if i < len(answers) else None) for i, u in enumerate(users)]


def llama2_jinja(space_after_bos: bool = False) -> str:
    """The llama2 format as a Jinja chat template: the text ``render`` tokenizes, with
    ``bos_token`` and ``eos_token`` where it puts their ids, the same role checks and stripped
    contents. ``render`` tokenizes each turn's segments apart, and a SentencePiece-style
    tokenizer starts each such segment with a word boundary that one whole string has only at
    its start: ``space_after_bos`` writes that boundary out as a space after each BOS."""
    first = f"' ' + {B_INST!r}" if space_after_bos else repr(B_INST)
    return "\n".join([  # every tag trims the whitespace around it: the newlines are for readers
        "{%- if messages and messages[0]['role'] == 'system' -%}",
        "  {%- set system = messages[0]['content'] | trim -%}{%- set turns = messages[1:] -%}",
        "{%- else -%}{%- set system = none -%}{%- set turns = messages -%}{%- endif -%}",
        "{%- if not turns -%}{{ raise_exception('a conversation needs at least one user turn') }}{%- endif -%}",
        "{%- for m in turns -%}",
        "  {%- if m['role'] != ['user', 'assistant'][loop.index0 % 2] -%}",
        "    {{ raise_exception('roles must go: optional system, then user and assistant alternating') }}",
        "  {%- endif -%}",
        "  {%- if m['role'] == 'user' -%}",
        "    {%- set text = m['content'] | trim -%}",
        "    {%- if loop.first and system is not none -%}",
        f"      {{%- set text = {B_SYS!r} + system + {E_SYS!r} + text -%}}",
        "    {%- endif -%}",
        f"    {{{{- bos_token + {first} + ' ' + text + ' ' + {E_INST!r} -}}}}",
        "  {%- else -%}",
        "    {{- ' ' + (m['content'] | trim) + ' ' + eos_token -}}",
        "  {%- endif -%}",
        "{%- endfor -%}",
    ])


def _render_llama2(turns: list[tuple[str, str | None]], tokenizer: Any) -> Rendered:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None or eos is None:
        raise ValueError("the llama2 chat template needs a tokenizer with BOS and EOS tokens")
    segments = []
    for user, answer in turns:
        segments.append(f"{B_INST} {user} {E_INST}")
        if answer is not None:
            segments.append(f" {answer} ")
    encoded = iter(tokenizer(segments, add_special_tokens=False)["input_ids"])
    ids: list[int] = []
    mask: list[int] = []
    for _, answer in turns:
        prompt_ids = next(encoded)
        ids += [bos] + prompt_ids
        mask += [0] * (1 + len(prompt_ids))
        if answer is not None:
            answer_ids = next(encoded) + [eos]
            ids += answer_ids
            mask += [1] * len(answer_ids)
    return Rendered(ids, mask)


def _apply_template(tokenizer: Any, messages: list[Message], **kwargs: Any) -> list[int]:
    conversation = [{"role": m.role, "content": m.content} for m in messages]
    return list(
        tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=False, **kwargs)
    )


def _render_with_chat_template(messages: list[Message], tokenizer: Any) -> Rendered:
    ids: list[int] = []
    mask: list[int] = []
    for i, m in enumerate(messages):
        if m.role != "assistant":
            continue
        prompt = _apply_template(tokenizer, messages[:i], add_generation_prompt=True)
        full = _apply_template(tokenizer, messages[: i + 1])
        if full[: len(prompt)] != prompt or prompt[: len(ids)] != ids:
            raise ValueError(
                "the tokenizer's chat template does not render conversations as extensions of "
                "their prefixes, so no loss mask can be derived; use template: llama2"
            )
        mask += [0] * (len(prompt) - len(ids)) + [1] * (len(full) - len(prompt))
        ids = full
    if messages[-1].role != "assistant":
        tail = _apply_template(tokenizer, messages, add_generation_prompt=True)
        if tail[: len(ids)] != ids:
            raise ValueError("the tokenizer's chat template does not render conversations as "
                             "extensions of their prefixes; use template: llama2")
        mask += [0] * (len(tail) - len(ids))
        ids = tail
    return Rendered(ids, mask)


def _only_last_span(mask: list[int]) -> list[int]:
    """Keep the last run of ones (the final answer), zero the rest."""
    end = len(mask)
    while end and not mask[end - 1]:
        end -= 1
    start = end
    while start and mask[start - 1]:
        start -= 1
    return [0] * start + mask[start:end] + [0] * (len(mask) - end)
