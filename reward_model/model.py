"""A reward model: the causal LM's backbone with a scalar head read at the last token of
prompt + response (Llama 2, Sec. 3.2.2), and the scoring API later stages use.

The weights are a plain Hugging Face ``*ForSequenceClassification`` model (``num_labels=1``),
so ``AutoModelForSequenceClassification.from_pretrained(model_dir)`` loads what we save. It is
built from a causal-LM checkpoint by moving the loaded LM's backbone into it rather than by
``AutoModelForSequenceClassification.from_pretrained(lm_dir)``: a checkpoint that stores tied
input/output embeddings once (as ``lm_head.weight``) would leave the classifier's input
embeddings randomly initialised that way.

A policy's samples are read as it generated them (``score_generated``: its prompt and response
ids) by a reward model that shares its tokens (``reads_tokens_of``: vocabulary, EOS, chat
template), else decoded and re-rendered (``score``), which changes the ids wherever the text does
not re-tokenize to them (``scoring``, ``sample_probabilities``).

``RewardModel`` wraps those weights with a packed forward: sequences share rows with restarting
position ids (``rlhf.packing``) and each sequence's reward is read at its last token, so chosen
and rejected are scored in one forward. Rows are as long as the longest sequence (``pack_rows``):
the short sequences fill the rows instead of padding, and attention, computed over a whole row
by the sdpa and eager kernels, costs no more than one padded sequence would.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Sequence

import torch

from rlhf.artifacts import InputError, model_dir
from rlhf.data.chat import render, unfinished
from rlhf.data.records import Message
from rlhf.models import load_policy, load_tokenizer
from rlhf.packing import length_chunks, pack_rows, packed_hidden

REWARD_CONFIG = "reward_config.json"  # chat template and max length the model was trained with


def response_ids(prompt: Sequence[Message], response: str, tokenizer: Any, template: str = "llama2",
                 finished: bool = True) -> list[int]:
    """Token ids of a prompt conversation followed by the assistant's ``response``; without the
    EOS closing it when it was not ``finished`` (cut at the token limit: ``chat.unfinished``)."""
    rendered = render([*prompt, Message("assistant", response)], tokenizer, template)
    return (rendered if finished else unfinished(rendered, tokenizer.eos_token_id)).ids


def answer_close(tokenizer: Any, template: str) -> list[int] | None:
    """The ids ``template`` puts after the EOS that closes an answer (llama2: none); None when
    it closes answers without an EOS, so a generated answer cannot be closed as it would be."""
    full = render([Message("user", "a"), Message("assistant", "b")], tokenizer, template)
    cut = unfinished(full, tokenizer.eos_token_id)
    return None if cut.ids == full.ids else full.ids[len(cut.ids) + 1 :]


def classifier_pad_id(tokenizer: Any) -> int:
    """The pad id for a Hugging Face classifier, which reads each row at its rightmost token that
    is not padding: the tokenizer's pad token unless it is EOS (every rendered response ends in
    EOS, which would then be skipped), else UNK, else 0."""
    for token_id in (tokenizer.pad_token_id, tokenizer.unk_token_id):
        if token_id is not None and token_id != tokenizer.eos_token_id:
            return token_id
    return 0


def init_reward_model(source: str | Path, pad_token_id: int, seed: int = 0, **load_kwargs: Any) -> torch.nn.Module:
    """A ``*ForSequenceClassification`` model (one output) whose backbone holds every weight of
    the causal LM at ``source`` and whose head is new (normal, std ``initializer_range``)."""
    from transformers import AutoModelForSequenceClassification

    lm, _ = load_policy(source, **load_kwargs)
    config = lm.config
    config.num_labels, config.architectures, config.pad_token_id = 1, None, pad_token_id
    with torch.device("meta"):  # only the head is allocated; the backbone is the LM's
        model = AutoModelForSequenceClassification.from_config(config)
    backbone = getattr(lm, lm.base_model_prefix)
    setattr(model, model.base_model_prefix, backbone)
    weight = next(backbone.parameters())
    model.score = torch.nn.Linear(config.hidden_size, 1, bias=False, device=weight.device, dtype=weight.dtype)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head = torch.randn(model.score.weight.shape, generator=generator) * config.initializer_range
        model.score.weight.copy_(head)
    left = [name for name, p in model.named_parameters() if p.is_meta]
    if left:
        raise ValueError(f"{source}: cannot build a reward model for {type(lm).__name__}: {left[:3]} unset")
    return model


class RewardModel(torch.nn.Module):
    """Scores responses to prompts: ``score`` gives logits r (N,), ``probabilities`` sigmoid(r).

    ``model`` is the Hugging Face classifier (possibly with LoRA adapters); sequences are
    rendered with the chat ``template`` and cut to their last ``max_length`` tokens.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, template: str = "llama2", max_length: int | None = None):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.max_length = max_length or model.config.max_position_embeddings

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """Rewards of packed sequences (see ``PackedRows``).

        input_ids, position_ids: (R, T) sequences back to back, positions restarting at 0
        ends:                    (N, 2) (row, index) of each sequence's last token, or (N,)
                                 indices into a single row (R = 1); any position may be read
                                 (a critic reads one value per response token)
        returns:                 (N,) float32 rewards
        """
        hf = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        hidden = packed_hidden(getattr(hf, hf.base_model_prefix), input_ids, position_ids)  # (R, T, H)
        picked = hidden[ends[:, 0], ends[:, 1]] if ends.ndim == 2 else hidden[0, ends]  # (N, H)
        return hf.score(picked).squeeze(-1).float()  # (N,)

    def encode(self, prompt: Sequence[Message], response: str, finished: bool = True) -> list[int]:
        """Token ids of prompt + response (without an EOS unless ``finished``), cut to the last
        ``max_length`` tokens."""
        return response_ids(prompt, response, self.tokenizer, self.template, finished)[-self.max_length :]

    def reads_tokens_of(self, tokenizer: Any, template: str) -> bool:
        """Whether this model reads a policy's samples as they were generated: the policy has
        this model's vocabulary and EOS and renders its prompts with this model's ``template``,
        which closes an answer with EOS (as a finished sample ends)."""
        return (template == self.template and tokenizer.eos_token_id == self.tokenizer.eos_token_id
                and tokenizer.get_vocab() == self.tokenizer.get_vocab() and self._close is not None)

    @functools.cached_property
    def _close(self) -> list[int] | None:
        return answer_close(self.tokenizer, self.template)

    def encode_generated(self, prompt_ids: Sequence[int], response_ids: Sequence[int], finished: bool = True) -> list[int]:
        """A sampled response as generated: the prompt's ids and the response's (ending with its
        EOS when ``finished``), closed as ``template`` closes an answer when finished, cut to the
        last ``max_length`` tokens. ``encode`` of the decoded text, where it re-tokenizes to the
        generated ids (``reads_tokens_of``)."""
        return [*prompt_ids, *response_ids, *(self._close if finished else [])][-self.max_length :]

    @torch.no_grad()
    def score_ids(self, seqs: Sequence[Sequence[int]], batch_tokens: int = 8192) -> torch.Tensor:
        """Rewards (N,) of token sequences: longest first, about ``batch_tokens`` tokens a forward."""
        rewards = torch.empty(len(seqs))
        for chunk in length_chunks([len(s) for s in seqs], batch_tokens):
            packed = pack_rows([seqs[i] for i in chunk])
            rewards[chunk] = self(*(t.to(self.device) for t in packed)).cpu()
        return rewards

    def score(self, prompts: Sequence[Sequence[Message]], responses: Sequence[str], batch_tokens: int = 8192,
              finished: Sequence[bool] | None = None) -> torch.Tensor:
        """Reward logits r (N,) of ``responses[i]`` to ``prompts[i]`` (a conversation ending with
        a user turn). ``finished[i]`` False: the response was cut at the token limit and is read
        at its last token, without the EOS it never generated (default: all finished)."""
        if len(prompts) != len(responses):
            raise ValueError(f"score: {len(prompts)} prompts but {len(responses)} responses")
        finished = [True] * len(responses) if finished is None else finished
        return self.score_ids([self.encode(p, r, f) for p, r, f in zip(prompts, responses, finished)], batch_tokens)

    def score_generated(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                        finished: Sequence[bool] | None = None, batch_tokens: int = 8192) -> torch.Tensor:
        """Reward logits r (N,) of responses as a policy with this model's tokens generated them
        (``encode_generated``; ``finished`` as in ``score``)."""
        if len(prompt_ids) != len(response_ids):
            raise ValueError(f"score_generated: {len(prompt_ids)} prompts but {len(response_ids)} responses")
        finished = [True] * len(response_ids) if finished is None else finished
        return self.score_ids([self.encode_generated(p, r, f) for p, r, f in zip(prompt_ids, response_ids, finished)],
                              batch_tokens)

    def probabilities(self, prompts: Sequence[Sequence[Message]], responses: Sequence[str], batch_tokens: int = 8192,
                      finished: Sequence[bool] | None = None) -> torch.Tensor:
        """sigmoid(r) (N,): the scale of the PPO safety gate."""
        return torch.sigmoid(self.score(prompts, responses, batch_tokens, finished))

    # Saving, in the shape ``rlhf.training.save_model`` expects of a model

    def save_pretrained(self, out_dir: str | Path, state_dict: dict | None = None, **kwargs: Any) -> None:
        if state_dict is not None:  # keys of this wrapper: "model.<key of the HF model>"
            state_dict = {k.removeprefix("model."): v for k, v in state_dict.items()}
        self.model.save_pretrained(out_dir, state_dict=state_dict, **kwargs)
        info = {"template": self.template, "max_length": self.max_length}
        (Path(out_dir) / REWARD_CONFIG).write_text(json.dumps(info, indent=2) + "\n")

    def merge_and_unload(self) -> "RewardModel":
        """LoRA adapters merged into the weights (the head was trained in full)."""
        return RewardModel(self.model.merge_and_unload(), self.tokenizer, self.template, self.max_length)


def scoring(rms: dict[str, RewardModel], tokenizer: Any, template: str) -> dict[str, str]:
    """name -> how that reward model scores the samples of a policy with ``tokenizer`` and
    ``template``: "generated_ids" (``score_generated``) where it shares the policy's tokens, else
    "text" (decoded and re-rendered, ``score``); a stage's manifest records it (``reward_scoring``)."""
    return {name: "generated_ids" if rm.reads_tokens_of(tokenizer, template) else "text" for name, rm in rms.items()}


def sample_probabilities(rm: RewardModel, way: str, prompts: Sequence[Sequence[Message]], texts: Sequence[str],
                         finished: Sequence[bool], prompt_ids: Sequence[Sequence[int]] | None = None,
                         response_ids: Sequence[Sequence[int]] | None = None, batch_tokens: int = 8192) -> torch.Tensor:
    """sigmoid(r) (N,) of a policy's samples, read the ``way`` ``scoring`` says: from the
    generated ids (prompt ids, response ids) or from the texts."""
    if way == "generated_ids":
        return torch.sigmoid(rm.score_generated(prompt_ids, response_ids, finished, batch_tokens))
    return rm.probabilities(prompts, texts, batch_tokens=batch_tokens, finished=finished)


def check_classifier(path: Path) -> None:
    """An InputError unless ``path/config.json`` is a one-label sequence classifier (a causal LM
    would load with a random score head and fail later in a shape mismatch)."""
    config_file = path / "config.json"
    if not config_file.is_file():
        return  # transformers names the missing file
    config = json.loads(config_file.read_text())
    archs = config.get("architectures") or ["unknown"]
    if not any(a.endswith("ForSequenceClassification") for a in archs) or len(config.get("id2label") or {0: ""}) != 1:
        raise InputError(f"{path}: not a reward model (architecture {', '.join(archs)}); expected a reward_model stage "
                         "directory or a Hugging Face sequence classifier with one output (num_labels 1)")


def load_reward_model(path: str | Path, device: str | torch.device | None = None, **load_kwargs: Any) -> RewardModel:
    """A saved reward model (a reward_model stage directory or its ``model/``), in eval mode.
    A LoRA adapter saved unmerged is applied to a reward model built from its base."""
    from transformers import AutoModelForSequenceClassification

    path = model_dir(Path(path))
    tokenizer = load_tokenizer(path)
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        base = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
        model = PeftModel.from_pretrained(init_reward_model(base, classifier_pad_id(tokenizer), **load_kwargs), path)
    else:
        check_classifier(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True, **load_kwargs)
    info = json.loads((path / REWARD_CONFIG).read_text()) if (path / REWARD_CONFIG).is_file() else {}
    rm = RewardModel(model, tokenizer, info.get("template", "llama2"), info.get("max_length"))
    return rm.to(device).eval() if device is not None else rm.eval()


def load_judge(cfg, device: str | torch.device | None = None):
    """The judge of a ``rlhf.config.JudgeConfig`` (``rlhf.judge``): gold, a user's hook, or a
    reward model read as sigmoid(r) of each (prompt, response) text; None when none is set."""
    from rlhf.judge import text_judge

    if cfg.reward_model_from is None:
        return text_judge(cfg)
    rm = load_reward_model(cfg.reward_model_from, device)

    def scores(prompts, responses) -> list[float]:
        with torch.no_grad():
            return rm.probabilities([p.messages for p in prompts], list(responses)).float().tolist()

    return scores
