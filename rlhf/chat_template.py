"""The chat format a model was trained on, saved with it, and what a tokenizer loses of it.

Every saved policy and reward model carries its training format as the tokenizer's Jinja chat
template (``set_chat_template``), so ``tokenizer.apply_chat_template(messages)`` and
``pipeline("text-generation")(messages)`` speak it: for ``template: llama2`` the variant of
``rlhf.data.chat.llama2_jinja`` whose ids equal ``render``'s on probe dialogues (token for token,
BOS/EOS per turn, the system prompt); for ``template: tokenizer`` the tokenizer's own template,
which ``render`` used.

Once per stage, ``warn_chat_format`` says what the tokenizer breaks: chat markers that encode to
the same ids or do not come back from decoding (a real pretrained tokenizer may drop ``[`` and
``/``: ``[INST]`` and ``[/INST]`` both become ``INST``), a template no variant reproduces, and
how many characters of each data file the vocabulary drops. Nothing here imports torch.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Iterable, Sequence

from pydantic import BaseModel

from rlhf.data.chat import CHAT_MARKERS, llama2_jinja, render
from rlhf.data.config import SourceConfig
from rlhf.data.records import Message, PreferencePair

# What a llama2 template is checked on: a system prompt, several turns, a final user turn.
PROBES = [
    [Message("user", "Hi there!"), Message("assistant", "Hello.")],
    [Message("system", "Be brief."), Message("user", "What is 2 + 3?"), Message("assistant", " It is 5. "),
     Message("user", "And (4 + 1)?"), Message("assistant", "5\n\nagain"), Message("user", "thanks")],
]


def _applied(tokenizer: Any, dialogue: Sequence[Message], chat_template: str, tokenize: bool = True) -> Any:
    """``apply_chat_template`` of ``dialogue`` with ``chat_template``: its ids, or its text."""
    conversation = [{"role": m.role, "content": m.content} for m in dialogue]
    out = tokenizer.apply_chat_template(conversation, chat_template=chat_template, tokenize=tokenize, return_dict=False)
    return list(out) if tokenize else out


def llama2_template_for(tokenizer: Any) -> str | None:
    """The llama2 Jinja template whose ``apply_chat_template`` ids equal ``render``'s on
    ``PROBES`` with this tokenizer, or None when no variant does."""
    for space_after_bos in (False, True):
        template = llama2_jinja(space_after_bos)
        if all(_applied(tokenizer, p, template) == render(p, tokenizer).ids for p in PROBES):
            return template
    return None


def set_chat_template(tokenizer: Any, template: str) -> None:
    """Make ``template`` (a recipe's ``data.template``) the tokenizer's chat template, saved with
    it by ``save_pretrained``. ``tokenizer``: its own template is what it trained with, kept."""
    if template == "llama2":
        tokenizer.chat_template = llama2_template_for(tokenizer) or llama2_jinja()
    elif template != "tokenizer":
        raise ValueError(f"unknown chat template {template!r} (expected llama2 or tokenizer)")


# ---------------------------------------------------------------------------------------------
# What a tokenizer breaks


def marker_problems(tokenizer: Any) -> list[str]:
    """What the tokenizer does to the llama2 chat markers: pairs that encode to the same ids,
    and markers missing from a rendered dialogue once its ids are decoded (none: they survive)."""
    ids = {m: tokenizer(m, add_special_tokens=False)["input_ids"] for m in CHAT_MARKERS}
    alike: dict[tuple, list[str]] = {}
    for marker in CHAT_MARKERS:
        alike.setdefault(tuple(ids[marker]), []).append(repr(marker))
    problems = [f"{_listed(same)} encode to the same ids {list(key)}" for key, same in alike.items() if len(same) > 1]
    text = _applied(tokenizer, PROBES[1], llama2_jinja(), tokenize=False)
    decoded = tokenizer.decode(render(PROBES[1], tokenizer).ids)
    lost = [m for m in CHAT_MARKERS if decoded.count(m) < text.count(m)]
    if lost:
        problems.append(f"{_listed([repr(m) for m in lost])} do not survive encoding and decoding (alone, "
                        f"{_listed([f'{m!r} decodes as {tokenizer.decode(ids[m])!r}' for m in lost])})")
    return problems


def _listed(items: Sequence[str]) -> str:
    """"a", "a and b", "a, b and c"."""
    return " and ".join([", ".join(items[:-1]), items[-1]] if len(items) > 1 else items)


def lost_characters(texts: Sequence[str], tokenizer: Any) -> dict[str, int]:
    """Characters of ``texts`` that encoding drops (or turns into an unknown token): how many of
    each are missing once the ids are decoded. Whitespace never counts (decoders re-space)."""
    if not texts:
        return {}
    decoded = tokenizer.batch_decode(tokenizer(list(texts), add_special_tokens=False)["input_ids"],
                                     skip_special_tokens=True)
    lost: Counter = Counter()
    for text, back in zip(texts, decoded):
        if text != back:
            lost += Counter(text) - Counter(back)
    return {c: n for c, n in lost.items() if not c.isspace()}


def record_texts(record: Any) -> list[str]:
    """Every text of an SFT example, a preference pair or a prompt."""
    if isinstance(record, PreferencePair):
        return [m.content for m in record.prompt] + [record.chosen, record.rejected]
    return [m.content for m in record.messages]


def source_files(cfg: Any) -> dict[str, str]:
    """Source name -> file of every data source in a stage config (wherever its groups hold one)."""
    if isinstance(cfg, SourceConfig):
        return {cfg.name: str(cfg.path)} if cfg.path is not None else {}
    children = cfg.__dict__.values() if isinstance(cfg, BaseModel) else cfg if isinstance(cfg, (list, tuple)) else ()
    return {name: path for child in children for name, path in source_files(child).items()}


def data_losses(tokenizer: Any, records: Iterable[Any], files: dict[str, str]) -> list[str]:
    """One line per data source whose characters the vocabulary drops: how many, and which."""
    texts: dict[str, list[str]] = {}
    for record in records:
        texts.setdefault(record.source, []).extend(record_texts(record))
    lines = []
    for source, found in texts.items():
        lost = lost_characters(found, tokenizer)
        if lost:
            total = sum(len("".join(t.split())) for t in found)  # whitespace never counts
            where = files.get(source) or (f"source {source!r}" if source else "generated examples")
            worst = ", ".join(f"{c!r} x{n:,}" for c, n in Counter(lost).most_common(5))
            lines.append(f"{where}: {sum(lost.values()):,} of {total:,} characters ({sum(lost.values()) / total:.2%}) "
                         f"are not in the tokenizer's vocabulary and are lost when encoded ({worst}); the model "
                         "never sees them")
    return lines


def chat_format_warnings(tokenizer: Any, template: str, records: Iterable[Any], files: dict[str, str]) -> list[str]:
    """Everything the tokenizer breaks of the chat format and of the data (see the module doc)."""
    lines = []
    if template == "llama2":
        problems = marker_problems(tokenizer)
        if problems:
            lines.append(f"the tokenizer cannot carry the llama2 chat markers: {'; '.join(problems)}. The model "
                         "cannot tell where a turn starts or ends. Use a tokenizer that holds them as tokens "
                         "(the base_model stage builds one), or add them: tokenizer.add_tokens("
                         f"{list(CHAT_MARKERS)}) and model.resize_token_embeddings(len(tokenizer))")
        if llama2_template_for(tokenizer) is None:
            lines.append("tokenizer.apply_chat_template on the saved model will not give the training ids token "
                         "for token: this tokenizer splits a whole conversation differently from its turns")
    return lines + data_losses(tokenizer, records, files)


def warn_chat_format(print_fn: Callable[[str], Any], stage: str, tokenizer: Any, template: str,
                     records: Iterable[Any], cfg: Any) -> None:
    """Print ``chat_format_warnings`` for the records of a stage whose config is ``cfg``."""
    for line in chat_format_warnings(tokenizer, template, records, source_files(cfg)):
        print_fn(f"[rlhf] warning: {stage}: {line}")
