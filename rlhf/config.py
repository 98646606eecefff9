"""The shared config vocabulary (torch-free): the base of every config model, the user-error
type, the groups every stage shares, and ``StageConfig``.

Errors are ``RecipeError`` with one line per problem: ``FILE: key.path: message``. The CLI
prints them and exits 2.
"""

from __future__ import annotations

import hashlib
import json
import string
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

class RecipeError(Exception):
    """A user mistake in a recipe or an override; the message is ready to print."""


class Strict(BaseModel):
    """Base of every config model: unknown keys are errors, and so are non-finite numbers
    (``lr: .inf`` would train to NaN weights, ``epochs: 1e400`` is inf) and true/false where a
    number belongs (pydantic would read ``max_steps: true`` as 1)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, data: Any) -> Any:
        for name, value in data.items() if isinstance(data, dict) else ():
            field = cls.model_fields.get(name)
            if isinstance(value, bool) and field is not None and _is_number(field.annotation):
                raise ValueError(f"{name}: expected a number, got {str(value).lower()}")
        return data


def _is_number(annotation: Any) -> bool:
    """Whether a field takes numbers and not booleans: int, float, or an optional/union of them."""
    kinds = set(get_args(annotation)) or {annotation}
    return bool(kinds & {int, float}) and bool not in kinds


# How a stage is logged, not what it computes: outside the config hash (and the model card).
TRACKING_KEYS = ("report_to", "wandb_project", "run_name")
Tracker = Literal["tensorboard", "wandb"]

# Stages whose output is a policy (a causal LM) another stage may start from; "hf" is a plain
# Hugging Face checkpoint directory.
POLICY_KINDS = ("base_model", "sft", "rejection_sampling", "ppo", "gatt", "context_distillation", "hf")
REWARD_MODEL_KINDS = ("reward_model",)
PAIRS = "pairs.jsonl"  # a preferences stage's pairs, read by a reward_model stage's pairs_from


def _gate_threshold(value: Any) -> Any:
    """A number in [0, 1] (numeric strings too: PyYAML reads 1e-2 as one), or ``calibrated``."""
    if value == "calibrated":
        return value
    try:
        number = float("nan") if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not 0 <= number <= 1:  # NaN too
        raise ValueError(f"expected a number in [0, 1] or calibrated, got {describe(value)}")
    return number


# The safety gate of Llama 2 (Sec. 3.2.2): a response whose safety reward (probability scale)
# is below this is scored by the safety reward model even on a helpfulness prompt.
GateThreshold = Annotated[float | Literal["calibrated"], BeforeValidator(_gate_threshold), Field(description=(
    "Safety gate on R_s (probability scale, a number in [0, 1]): a response scoring below it is judged by the "
    "safety reward model, also on a helpfulness prompt. Llama 2's 0.15 was the operating point of its own "
    "safety reward model (recall 0.55, precision 0.89 on its safety test set); another reward model's scale "
    "differs. calibrated: the threshold the safety reward model's evaluation derived the same way "
    "(gate_threshold in its manifest, where eval.gate_recall of its held-out unsafe responses score below "
    "it), read when the stage starts and recorded in its manifest's metrics."))]
# Chat format: Llama 2's [INST] format, or the tokenizer's own chat template.
Template = Literal["llama2", "tokenizer"]
# A response cut at sampling.max_new_tokens (no EOS) is scored by the reward models without an EOS;
# this lowers its R_c further (TRL's missing_eos_penalty, rlhf.rewards.penalize_truncated).
MissingEosPenalty = Annotated[float | None, Field(gt=0, description=(
    "Penalty, in reward-model logits, for a response cut at sampling.max_new_tokens (no EOS): its "
    "R_c becomes sigmoid(logit(R_c) - penalty) after the gate, as TRL subtracts missing_eos_penalty "
    "from the score (TRL's examples use 1.0). null: no penalty; truncated responses are still "
    "scored without the EOS they never generated."))]


# ---------------------------------------------------------------------------------------------
# Groups shared by the training stages


class LoraConfig(Strict):
    """LoRA adapters (peft). Off unless ``enabled``."""

    enabled: bool = Field(False, description="Train LoRA adapters instead of every weight.")
    r: int = Field(8, gt=0, description="Rank of the adapters.")
    alpha: float = Field(16.0, description="LoRA alpha: the adapters' update is scaled by alpha / r.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapters' input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Modules that get adapters: `all-linear` (every linear layer but the "
        "output head), or module names, e.g. [q_proj, v_proj].")
    merge: bool = Field(True, description="Save the merged model (a plain Hugging Face checkpoint) "
                        "instead of the adapter with its base recorded.")




class ModelConfig(Strict):
    """How the model is held in memory and which attention kernel runs it."""

    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="Attention kernel; every one keeps packed sequences apart (position ids "
        "restarting per sequence; flash_attention_2 gets one flattened row per forward).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward "
                                         "pass: less memory, about a third more compute.")
    lora: LoraConfig = LoraConfig()


class SamplingConfig(Strict):
    """How a policy's answers are sampled (``rlhf.generation``)."""

    max_new_tokens: int = Field(128, gt=0, description="Tokens generated per answer at most; an answer "
                                "cut there has no EOS (counted as truncated).")
    temperature: float = Field(0.7, ge=0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: draw from the most probable "
                         "tokens whose probabilities sum to top_p (1 = the whole distribution).")
    batch_size: int = Field(32, gt=0, description="Rows (answers) per generation call on each process.")

    def at_temperature(self, temperature: float) -> "SamplingConfig":
        return self.model_copy(update={"temperature": temperature})


class PromptSamplingConfig(SamplingConfig):
    """Sampling from a set of prompts, the overlong ones left out."""

    max_prompt_length: int = Field(1024, gt=0, description="Prompts of more tokens are left out (counted).")


class JudgeConfig(Strict):
    """An independent judge of a policy's answers, never optimised against: its scores sit beside
    the proxy rewards (metrics, manifest, report). At most one of ``gold``, ``reward_model_from``,
    ``hook``; none set: no judge."""

    gold: bool = Field(False, description="The quickstart world's gold judge (rlhf.world.judge): "
                       "gold helpfulness, or 1/0 for a refusal/compliance on a harmful prompt; every "
                       "prompt must carry the world's meta ({task, answer}).")
    reward_model_from: Path | None = Field(None, description="A reward_model stage the stage does not "
                                           "optimise (e.g. trained on a held-out part of the preference "
                                           "data); its sigmoid(r) is the judge score.")
    hook: str | None = Field(None, pattern=r"^.+:[A-Za-z_]\w*$", description="`module:function` or "
                             "`file.py:function`, called as function(prompts, responses) -> one number per "
                             "response (prompts: rlhf.data.Prompt records; responses: texts), e.g. an "
                             "LLM-as-judge served locally or a rule.")

    @model_validator(mode="after")
    def _one_judge(self) -> "JudgeConfig":
        if sum((self.gold, self.reward_model_from is not None, self.hook is not None)) > 1:
            raise ValueError("set at most one of gold, reward_model_from, hook")
        return self

    @property
    def enabled(self) -> bool:
        return self.gold or self.reward_model_from is not None or self.hook is not None

    def check_independent(self, *proxies: Path) -> None:
        """A judge that is one of the reward models the stage optimises is no judge."""
        if self.reward_model_from is not None and any(Path(self.reward_model_from) == Path(p) for p in proxies):
            raise ValueError(f"judge.reward_model_from: {self.reward_model_from} is a reward model this stage "
                             "optimises; the judge must be another one")


class TrainConfig(Strict):
    """Optimizer, schedule and batching. ``batch_size`` is the global batch in examples
    (sequences for SFT, pairs for reward models); it is split over processes and gradient
    accumulation steps of ``micro_batch_size`` each."""

    lr: float = Field(2e-5, gt=0, description="Peak learning rate (AdamW), reached after warmup.")
    schedule: Literal["cosine", "constant", "linear"] = Field(
        "cosine", description="Learning-rate decay after warmup.")
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="Cosine/linear decay ends at lr * this.")
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="Share of the optimizer steps over "
                                "which the learning rate rises linearly from 0 to lr.")
    min_warmup_steps: int = Field(0, ge=0, description="At least this many warmup steps.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training data; a fraction trains on "
                          "that share of one.")
    max_steps: int | None = Field(None, gt=0, description="Caps the optimizer steps when set.")
    batch_size: int = Field(8, gt=0, description="Global batch per optimizer step, in examples "
                            "(sequences for SFT, pairs for reward models), over all processes.")
    micro_batch_size: int = Field(8, gt=0, description="Examples per forward on each process; gradient "
                                  "accumulation makes up the rest of batch_size.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW (decoupled) weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas (beta1, beta2).")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    grad_clip: float | None = Field(1.0, gt=0, description="Clip the gradient norm to this; null: no clipping.")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "no", description="Autocast precision of the forward and backward (`no`: fp32; fp16 needs a GPU).")
    save_every: int = Field(50, gt=0, description="Checkpoint every N optimizer steps (a killed run "
                            "resumes from the newest).")
    keep_checkpoints: int = Field(1, gt=0, description="Checkpoints kept on disk, the newest ones.")
    log_every: int = Field(1, gt=0, description="Log metrics (metrics.jsonl, trackers) every N optimizer steps.")

    @model_validator(mode="after")
    def _micro_divides_batch(self) -> "TrainConfig":
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size "
                f"({self.micro_batch_size})"
            )
        return self


class StageConfig(Strict):
    """Fields every stage has. Subclasses set ``stage`` to a Literal and list their inputs.

    ``INPUTS`` maps the dotted key path of each input field to the stage kinds it accepts.
    An empty tuple means a plain file or directory (a dataset, a Hugging Face checkpoint);
    otherwise the directory must hold a complete manifest of one of those kinds, except that
    kinds listing ``"hf"`` also accept a plain Hugging Face checkpoint directory, and the keys
    in ``HUB_INPUTS`` a hub model id, recorded by id and commit instead of content.
    """

    INPUTS: ClassVar[dict[str, tuple[str, ...]]] = {}
    # Keys of INPUTS that also take a Hugging Face hub model id (``org/name`` that is no local
    # path): where a stage starts from a model, never where it reads another stage's output.
    HUB_INPUTS: ClassVar[tuple[str, ...]] = ()
    # Old key path -> new key path: a recipe that still uses the old one gets an error naming the new.
    RENAMED: ClassVar[dict[str, str]] = {}

    stage: str = Field(description="Which stage this recipe runs; every stage recipe names it.")
    output_dir: Path = Field(Path("runs/stage"), description="The stage directory written (config.yaml, "
                             "metrics.jsonl, model/, manifest.json); in a pipeline: the pipeline's "
                             "output_dir / the stage's name.")
    seed: int = Field(0, description="Seed of everything the stage draws at random (initialisation, "
                      "data order, held-out splits, sampling).")
    report_to: list[Tracker] = Field(
        [], description="Also log to TensorBoard and/or W&B (when installed): the resolved config, then "
        "the metrics; their files go in the stage directory (tensorboard/, wandb/).")
    wandb_project: str = Field("rlhf", description="W&B project (a pipeline's stages default to its name).")
    run_name: str | None = Field(None, description="The trackers' run name; default: `<pipeline>/<stage "
                                 "name>` in a pipeline, else the output directory's name.")

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for old, new in cls.RENAMED.items():
                if get_dotted(data, old) is not None:
                    raise ValueError(f"key {old} was renamed to {new}")
        return data

    def input_paths(self) -> dict[str, tuple[Path, tuple[str, ...]]]:
        """Every input that is set, by dotted key path: the ``INPUTS`` fields, and every
        ``path`` of a nested group (data sources), as (path, accepted stage kinds)."""
        found = {}
        for key, kinds in self.INPUTS.items():
            if key.endswith(".*"):  # a group of named inputs, e.g. policies.*
                group = get_dotted(self, key[:-2]) or {}
                found.update({f"{key[:-2]}.{name}": (Path(v), kinds) for name, v in group.items()})
                continue
            value = get_dotted(self, key)
            if isinstance(value, (list, tuple)):  # a list of input files
                found.update({f"{key}.{i}": (Path(v), kinds) for i, v in enumerate(value)})
            elif value is not None:
                found[key] = (Path(value), kinds)
        for key, value in _nested_paths(self, ""):
            found.setdefault(key, (value, ()))
        return found

    def config_hash(self) -> str:
        """Hash of the resolved config, without where it is written or how it is logged, and
        without where its inputs lie: they are compared by content (``input_paths``)."""
        data = self.model_dump(mode="json", exclude={"output_dir", *TRACKING_KEYS})
        for key in self.input_paths():
            *parents, last = key.split(".")
            node = data
            for part in parents:
                node = node[int(part)] if isinstance(node, list) else node[part]
            node[int(last) if isinstance(node, list) else last] = "<input>"
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _nested_paths(obj: Any, prefix: str) -> list[tuple[str, Path]]:
    """(key path, value) of the ``path`` fields of nested groups and lists of groups."""
    found = []
    items = obj.__dict__.items() if isinstance(obj, BaseModel) else enumerate(obj)
    for name, value in items:
        key = f"{prefix}{name}"
        if isinstance(value, (BaseModel, list, tuple)):
            found += _nested_paths(value, key + ".")
        elif name == "path" and prefix and isinstance(value, Path):
            found.append((key, value))
    return found


def get_dotted(obj: Any, key: str) -> Any:
    for part in key.split("."):
        obj = obj.get(part) if isinstance(obj, dict) else getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Groups as dotted keys, lists as values: {"train": {"lr": 1e-5}} -> {"train.lr": 1e-5}."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat



def placeholders(text: str) -> set[str]:
    """The ``{name}`` fields of a format string: "Act as {value}." -> {"value"}."""
    return {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}


# ---------------------------------------------------------------------------------------------
# Validation with errors a user can act on


def describe(value: Any) -> str:
    return repr(value) if isinstance(value, str) else json.dumps(value, default=str)


_EXPECTED = {
    "float_parsing": "expected a number",
    "float_type": "expected a number",
    "finite_number": "expected a finite number",
    "int_parsing": "expected an integer",
    "int_type": "expected an integer",
    "int_from_float": "expected an integer",
    "bool_parsing": "expected true or false",
    "bool_type": "expected true or false",
    "string_type": "expected a string",
    "list_type": "expected a list",
    "dict_type": "expected a group of keys",
    "model_type": "expected a group of keys",
    "model_attributes_type": "expected a group of keys",
}


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-after"))
        loc = loc or "(top level)"
        kind = err["type"]
        if kind == "extra_forbidden":
            msg = "unknown key"
        elif kind == "missing":
            msg = "required key is missing"
        elif kind in _EXPECTED:
            msg = f"{_EXPECTED[kind]}, got {describe(err.get('input'))}"
        elif kind == "literal_error":
            msg = f"expected {err['ctx']['expected']}, got {describe(err.get('input'))}"
        else:
            msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{source}: {loc}: {msg}")
    return "\n".join(lines)


def validate(model: type[BaseModel], data: dict[str, Any], source: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc, source)) from None

