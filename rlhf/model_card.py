"""The model card, ``model/README.md``, written into every stage directory that saved a model,
before its manifest (so the card is part of the stage's fingerprinted content): what a
Hugging Face user reads first. From the stage's resolved config, its inputs with their
fingerprints and its final metrics (the manifest's facts), and for reward models the accuracy
per rating of ``eval/metrics.json``. Nothing here imports torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rlhf.config import POLICY_KINDS, TRACKING_KEYS, StageConfig, flatten
from rlhf.data.records import RATINGS

CARD = "README.md"
_NOT_SETTINGS = {"stage", "output_dir", *TRACKING_KEYS}  # said elsewhere in the card, or logging only


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str):
        return value
    return json.dumps(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}", *(f"| {' | '.join(r)} |" for r in rows)]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def settings(cfg: StageConfig) -> dict[str, Any]:
    """Every setting of the resolved config as dotted keys, but its inputs, data sources and
    logging (the card lists the inputs apart)."""
    inputs = set(cfg.input_paths())
    return {k: v for k, v in flatten(cfg.model_dump(mode="json")).items()
            if k.split(".")[0] not in _NOT_SETTINGS and k not in inputs and not k.endswith("sources")}


def _inputs(cfg: StageConfig, inputs: dict[str, dict[str, str]]) -> dict[str, list[list[str]]]:
    """Rows (key, absolute path or hub id, fingerprint) of the inputs: ``base`` (policies and model
    directories it starts from), ``models`` (other stages it uses: reward models, pools) and
    ``data`` (files)."""
    found: dict[str, list[list[str]]] = {"base": [], "models": [], "data": []}
    for key, (path, kinds) in cfg.input_paths().items():
        group = "data" if not kinds else "base" if set(kinds) & set(POLICY_KINDS) else "models"
        record = inputs.get(key, {})
        where = f"hub: {record['hub']}" if "hub" in record else Path(path).resolve()
        found[group].append([f"`{key}`", f"`{where}`", f"`{record.get('fingerprint', '?')}`"])
    return found


def _usage(model_dir: Path, reward_model: bool) -> list[str]:
    adapter = _read_json(model_dir / "adapter_config.json")
    if adapter and not reward_model:
        return [f"A LoRA adapter (saved unmerged) on the base model at `{adapter.get('base_model_name_or_path')}`, "
                "recorded by absolute path:", "", "```python", "from peft import AutoPeftModelForCausalLM",
                f"model = AutoPeftModelForCausalLM.from_pretrained({str(model_dir.resolve())!r})", "```"]
    if adapter:
        return ["A LoRA adapter (saved unmerged) of a reward model:", "", "```python",
                "from reward_model.model import load_reward_model",
                f"rm = load_reward_model({str(model_dir.resolve())!r})", "```"]
    if reward_model:
        return ["A scalar reward model (one logit, read at the last token of prompt + response):", "",
                "```python", "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
                f"path = {str(model_dir.resolve())!r}", "rm = AutoModelForSequenceClassification.from_pretrained(path)",
                "tokenizer = AutoTokenizer.from_pretrained(path)",
                'ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}, '
                '{"role": "assistant", "content": "Hello!"}], return_tensors="pt", return_dict=True)',
                "reward = rm(**ids).logits[0, 0]", "```"]
    return ["```python", "from transformers import pipeline",
            f"chat = pipeline(\"text-generation\", model={str(model_dir.resolve())!r})",
            'print(chat([{"role": "user", "content": "Hello!"}], max_new_tokens=64)[0]["generated_text"][-1]["content"])',
            "```"]


def _accuracy_per_rating(evaluation: dict[str, Any]) -> list[str]:
    """The reward model's accuracy per test set and rating (Llama 2, Table 8), with pair counts."""
    tables = {name: r for name, r in evaluation.items() if isinstance(r, dict) and "per_rating" in r}
    if not tables:
        return []
    columns = [*RATINGS, *(["unlabelled"] if any("unlabelled" in r["per_rating"] for r in tables.values()) else [])]
    rows = []
    for name, r in tables.items():
        cells = [f"{r['per_rating'][c]['accuracy']:.3f} ({r['per_rating'][c]['pairs']})" if c in r["per_rating"] else "-"
                 for c in columns]
        rows.append([name, str(r["pairs"]), f"{r['accuracy']:.3f}", *cells])
    header = ["test set", "pairs", "accuracy", *(c.replace("_", " ") for c in columns)]
    return ["## Accuracy per rating", "", "Share of pairs scored chosen > rejected; (pairs).", "",
            *_table(header, rows), ""]


def _kept_iteration(metrics: dict[str, Any]) -> list[str]:
    """PPO: which iteration's policy this is, where it is not the last one's."""
    if metrics.get("kept_iteration", metrics.get("last_iteration")) == metrics.get("last_iteration"):
        return []
    return [(f"The policy of PPO iteration {metrics['kept_iteration']} of {metrics['last_iteration']}, its best "
             f"held-out evaluation by `{metrics['kept_by']}` (iteration 0: the policy it started from), not the "
             "last iteration's: the metrics are the kept iteration's, the last iteration's are named `last_*`."), ""]


def model_card(cfg: StageConfig, inputs: dict[str, dict[str, str]], metrics: dict[str, Any], extra: dict[str, Any],
               stage_dir: Path) -> str:
    """The card of ``stage_dir/model`` (see the module doc) from the manifest's facts: ``metrics``
    (PPO's: those of the iteration whose policy it kept), and ``extra``, whose numbers (PPO's
    early-stop record, the round of rejection sampling) count as final metrics too."""
    metrics = {**metrics, **{k: v for k, v in extra.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}}
    model_dir = Path(stage_dir) / "model"
    architectures = _read_json(model_dir / "config.json").get("architectures") or [""]
    adapter = _read_json(model_dir / "adapter_config.json")
    reward_model = architectures[0].endswith("ForSequenceClassification") or adapter.get("task_type") == "SEQ_CLS"
    found, values = _inputs(cfg, inputs), settings(cfg)
    template = values.get("data.template")
    lines = [
        "---", f"library_name: {'peft' if adapter else 'transformers'}",
        f"pipeline_tag: {'text-classification' if reward_model else 'text-generation'}",
        f"tags: [rlhf, {cfg.stage}]", "---", "",
        f"# {Path(stage_dir).name}", "",
        f"A {'reward model' if reward_model else 'policy'} written by the `{cfg.stage}` stage of rlhf-toolkit. "
        "The stage directory that holds this one keeps its full record: `manifest.json`, `config.yaml`, "
        "`metrics.jsonl`.", "",
        "## Use", "", *_usage(model_dir, reward_model), "",
    ]
    if template:
        lines += [f"The tokenizer's chat template is the format it was trained on (`template: {template}`): "
                  "`tokenizer.apply_chat_template(messages)` gives the training token ids (the stage warned "
                  "in its log if this tokenizer cannot).", ""]
    header = ["input", "path", "fingerprint"]
    lines += ["## Base model", "", *(_table(header, found["base"]) if found["base"] else ["None: built from scratch."]), ""]
    for title, group in (("Models used", "models"), ("Data", "data")):
        lines += [f"## {title}", "", *_table(header, found[group]), ""] if found[group] else []
    lines += ["## Hyper-parameters", "", *_table(["key", "value"], [[f"`{k}`", _value(v)] for k, v in values.items()]), ""]
    lines += ["## Final metrics", "", *_kept_iteration(metrics),
              *_table(["metric", "value"], [[f"`{k}`", _value(v)] for k, v in flatten(metrics).items()]), ""]
    return "\n".join(lines + _accuracy_per_rating(_read_json(Path(stage_dir) / "eval" / "metrics.json")))


def needs_card(model_dir: Path) -> bool:
    """Whether a stage's ``model/`` gets our card: a saved model does (an adapter's placeholder
    card from peft is replaced); a checkpoint copied in (base_model) keeps the card it came with."""
    model_dir = Path(model_dir)
    return model_dir.is_dir() and (not (model_dir / CARD).exists() or (model_dir / "adapter_config.json").exists())
