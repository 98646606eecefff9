"""Real data without friction (issue 16): HH-RLHF transcripts and hub-style formats straight into
every stage, with errors that say the way out. Tests reading ``../shared/realdata`` skip without it."""

from pathlib import Path

import pytest

from tiny import hh_rows

from rlhf.data import DataConfig, DataError, Message, PreferencePair, SourceConfig, load_data, load_source

HH_PAIRS = [
    (["hi", "hello!", "what is 2 + 3?"], "5", "6"),
    (["say hello"], "hello", "no"),
]


# 1. HH-RLHF transcripts feed the SFT stage (the chosen dialogue) and prompt stages (its prefix)

def test_hh_transcripts_give_sft_dialogues_and_prompts(tmp_path):
    path = hh_rows(tmp_path / "hh.jsonl", HH_PAIRS)
    sft = load_source(SourceConfig(path=path), "sft")
    assert sft.problems == []
    assert sft.records[0].messages == [Message("user", "hi"), Message("assistant", "hello!"),
                                       Message("user", "what is 2 + 3?"), Message("assistant", "5")]
    prompts = load_source(SourceConfig(path=path, format="hh-rlhf", is_safety=False), "prompts")
    assert prompts.problems == []
    assert [p.messages[-1].content for p in prompts.records] == ["what is 2 + 3?", "say hello"]
    assert load_source(SourceConfig(path=path), "preference").records[0].chosen == "5"


def test_hh_sft_names_an_empty_turn(tmp_path):
    path = hh_rows(tmp_path / "hh.jsonl", [(["hi", " ", "more"], "ok", "no")])
    problems = load_source(SourceConfig(path=path), "sft").problems
    assert [str(p) for p in problems] == [f"{path}:1: chosen: turn 2 (assistant) is empty"]


def test_real_hh_rlhf_reads_as_sft(realdata):
    loaded = load_source(SourceConfig(path=realdata / "hh-rlhf/helpful-base.test.jsonl.gz"), "sft")
    assert (loaded.rows, len(loaded.records)) == (2354, 2353)
    assert [p.line for p in loaded.problems] == [121]  # an empty middle assistant turn


# 2. a failing stage says how to skip the bad rows

def test_fail_names_on_error_skip(tmp_path):
    path = hh_rows(tmp_path / "hh.jsonl", [*HH_PAIRS, (["hi"], "same", "same")])
    with pytest.raises(DataError) as err:
        load_data(DataConfig(sources=[SourceConfig(path=path)]), "preference", seed=0)
    assert str(err.value).splitlines()[-1] == ("set data.on_error=skip to drop these 1 rows; they are "
                                               "counted in the manifest")
    skipped = load_data(DataConfig(sources=[SourceConfig(path=path)], on_error="skip"), "preference", seed=0)
    assert skipped.sources["hh"]["skipped"] == 1


# 6. data.max_length is checked against the model's positions in every stage

HH_WORDS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "hi", "hello!", "what", "is", "2", "+", "3?",
            "5", "6", "say", "hello", "no"]


@pytest.fixture
def hh_sft_recipe(tmp_path):
    """An SFT recipe on an HH-RLHF file (no hook) and a tiny Llama of 64 positions."""
    import yaml
    from tiny import save_with_tokenizer, tiny_llama, word_tokenizer

    save_with_tokenizer(tmp_path / "base", tiny_llama(len(HH_WORDS), max_positions=64), word_tokenizer(HH_WORDS))
    recipe = {"stage": "sft", "output_dir": str(tmp_path / "sft"), "model_from": str(tmp_path / "base"),
              "data": {"sources": [{"path": str(hh_rows(tmp_path / "hh.jsonl", HH_PAIRS))}]},
              "train": {"batch_size": 1, "micro_batch_size": 1, "max_steps": 1}}
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(recipe))
    return tmp_path / "sft.yaml"


def test_max_length_over_the_model_stops_the_stage(hh_sft_recipe, capsys):
    from rlhf.cli import main

    assert main(["run", str(hh_sft_recipe)]) == 2
    err = capsys.readouterr().err
    assert "data.max_length 4096 exceeds the model's max_position_embeddings 64" in err
    assert "data.longer_than_model=clamp" in err and "Traceback" not in err


def test_max_length_clamped_with_a_warning_and_hh_sft_runs(hh_sft_recipe, capsys):
    from rlhf.artifacts import read_manifest
    from rlhf.cli import main

    assert main(["run", str(hh_sft_recipe), "data.longer_than_model=clamp"]) == 0
    assert "using data.max_length=64" in capsys.readouterr().out
    manifest = read_manifest(hh_sft_recipe.parent / "sft")
    assert manifest["status"] == "complete" and manifest["data"]["examples_used"] == 2


def test_reward_model_stage_checks_max_length(tmp_path):
    from reward_model.config import RewardModelConfig
    from reward_model.stage import run
    from rlhf.artifacts import InputError
    from tiny import save_with_tokenizer, tiny_llama, word_tokenizer

    save_with_tokenizer(tmp_path / "base", tiny_llama(len(HH_WORDS), max_positions=64), word_tokenizer(HH_WORDS))
    cfg = RewardModelConfig(output_dir=tmp_path / "rm", model_from=tmp_path / "base",
                            data={"sources": [{"path": hh_rows(tmp_path / "hh.jsonl", HH_PAIRS)}]})
    with pytest.raises(InputError, match=": data.max_length 4096 exceeds the model.s max_position_embeddings 64"):
        run(cfg)


# 5. SFT can keep the end of an overlong dialogue: earliest exchanges dropped whole

def sft_cfg(**data):
    from sft.config import SFTDataConfig

    return SFTDataConfig(sources=[{"path": "unused.jsonl"}], loss_on="last", **data)


def test_keep_end_drops_earliest_exchanges_keeps_the_system_prompt():
    from sft.data import build_rows, without_first_exchange
    from rlhf.data import SFTExample
    from tiny import word_tokenizer

    words = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "sys", "q1", "a1", "q2", "a2", "q3", "a3"]
    turns = [Message("system", "sys")] + [Message(r, f"{c}{i}") for i in (1, 2, 3) for r, c in (("user", "q"), ("assistant", "a"))]
    assert without_first_exchange(turns) == [turns[0], *turns[3:]]
    assert without_first_exchange(turns[:1] + turns[-2:]) is None
    tok, example = word_tokenizer(words), SFTExample(turns)
    full = len(build_rows([example], tok, sft_cfg(max_length=64, packing=False))[0][0].input_ids)
    rows, counts = build_rows([example], tok, sft_cfg(max_length=full - 2, overlong="keep_end", packing=False))
    assert (counts["kept_end"], counts["truncated"], counts["examples_used"]) == (1, 0, 1)
    kept = tok.convert_ids_to_tokens(rows[0].input_ids.tolist())
    assert "sys" in kept and "q1" not in kept and "a1" not in kept and kept[-2:] == ["a3", "</s>"]


def test_keep_end_keeps_real_hh_answers_truncate_dropped(realdata):
    from rlhf.models import load_tokenizer
    from sft.data import build_rows

    records = load_source(SourceConfig(path=realdata / "hh-rlhf/helpful-base.test.jsonl.gz"), "sft").records
    tokenizer = load_tokenizer(realdata / "models/tinystories-656k")
    _, start = build_rows(records, tokenizer, sft_cfg(max_length=512))
    _, end = build_rows(records, tokenizer, sft_cfg(max_length=512, overlong="keep_end"))
    assert (start["examples_used"], start["dropped_no_loss"]) == (2171, 182)
    assert (end["examples_used"], end["kept_end"], end["truncated"]) == (2353, 332, 14)


# 3. every command checks --format the same way: a usage line, exit 2, no traceback

@pytest.mark.parametrize("command", [["eval-rm", "model", "pairs.jsonl"], ["data", "validate", "pairs.jsonl",
                                                                          "--kind", "preference"]])
def test_a_bad_format_option_is_a_usage_error(command, capsys):
    from rlhf.cli import main

    with pytest.raises(SystemExit) as exit:
        main([*command, "--format", "hh"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "Traceback" not in err
    assert "argument --format: expected one of auto, jsonl, json, csv, parquet, datasets, hh-rlhf, got 'hh'" in err


# 4. eval-rm on a model that is not a reward model says so

def test_eval_rm_on_a_causal_lm_says_not_a_reward_model(tmp_path, capsys):
    from rlhf.cli import main
    from tiny import save_with_tokenizer, tiny_llama, word_tokenizer

    save_with_tokenizer(tmp_path / "lm", tiny_llama(len(HH_WORDS)), word_tokenizer(HH_WORDS))
    assert main(["eval-rm", str(tmp_path / "lm"), str(hh_rows(tmp_path / "hh.jsonl", HH_PAIRS))]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'lm'}: not a reward model (architecture LlamaForCausalLM)" in err


# 8. TRL's conversational preference format and its prompt/completion SFT format

def write_rows(path: Path, rows: list[dict]) -> Path:
    import json

    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def test_trl_conversational_preference_pairs(tmp_path):
    explicit = {"prompt": [msg("user", "2 + 3?")], "chosen": [msg("assistant", "5")],
                "rejected": [msg("assistant", "6")]}
    implicit = {"chosen": [msg("user", "hi"), msg("assistant", "hello"), msg("user", "2 + 3?"), msg("assistant", "5")],
                "rejected": [msg("user", "hi"), msg("assistant", "hello"), msg("user", "2 + 3?"), msg("assistant", "6")]}
    differ = {"chosen": [msg("user", "hi"), msg("assistant", "5")], "rejected": [msg("user", "ho"), msg("assistant", "6")]}
    loaded = load_source(SourceConfig(path=write_rows(tmp_path / "trl.jsonl", [explicit, implicit, differ])), "preference")
    first, second = loaded.records
    assert (first.prompt, first.chosen, first.rejected) == ([Message("user", "2 + 3?")], "5", "6")
    assert [m.content for m in second.prompt] == ["hi", "hello", "2 + 3?"] and second.rejected == "6"
    assert [str(p).split(": ", 1)[1] for p in loaded.problems] == [
        "prompt: chosen and rejected conversations differ before their final assistant turn; the prompt must be shared"]


def test_trl_prompt_completion_sft_rows(tmp_path):
    rows = [{"prompt": "2 + 3?", "completion": "5"},
            {"prompt": [msg("user", "2 + 3?")], "completion": [msg("assistant", "5")]},
            {"prompt": [msg("user", "2 + 3?")], "completion": [msg("user", "5")]}]
    loaded = load_source(SourceConfig(path=write_rows(tmp_path / "sft.jsonl", rows)), "sft")
    assert [r.messages for r in loaded.records] == [[Message("user", "2 + 3?"), Message("assistant", "5")]] * 2
    assert [str(p).split(": ", 1)[1] for p in loaded.problems] == ["completion[0].role: expected assistant, got 'user'"]


# 9. hub names: datasets read through `datasets.load_dataset`; offline errors say what to do

def test_hub_source_reads_a_dataset_in_hub_layout(tmp_path):
    repo = tmp_path / "hub_repo"
    (repo / "data").mkdir(parents=True)
    hh_rows(repo / "data" / "train.jsonl", HH_PAIRS)
    hh_rows(repo / "data" / "test.jsonl", HH_PAIRS[:1])
    train = load_source(SourceConfig(hub=str(repo)), "sft")
    test = load_source(SourceConfig(hub=str(repo), split="test"), "preference")
    assert (len(train.records), len(test.records), train.problems) == (2, 1, [])
    assert train.records[0].source == "hub_repo" and test.records[0].chosen == "5"


def test_an_unreachable_hub_dataset_says_how_to_use_a_local_copy(monkeypatch, capsys):
    from rlhf.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="a hub dataset id that could not be reached or read: offline, "
                       r"point at a local copy instead \(`path:`"):
        load_source(SourceConfig(hub="Anthropic/hh-rlhf"), "preference")
    assert main(["data", "validate", "Anthropic/hh-rlhf", "--kind", "preference"]) == 1
    assert "Anthropic/hh-rlhf: hub: cannot load" in capsys.readouterr().out
    with pytest.raises(DataError, match="give `hub: Anthropic/hh-rlhf` instead of `path:`"):
        load_source(SourceConfig(path=Path("Anthropic/hh-rlhf")), "preference")


def test_a_hub_model_id_says_how_to_point_at_a_local_copy():
    from rlhf.artifacts import InputError, resolve_input

    with pytest.raises(InputError, match="model_from: Qwen/Qwen2.5-0.5B: does not exist as a local directory; "
                       "as a Hugging Face hub model id .* `hf download Qwen/Qwen2.5-0.5B --local-dir "
                       "models/Qwen2.5-0.5B`, and set model_from: models/Qwen2.5-0.5B"):
        resolve_input("model_from", Path("Qwen/Qwen2.5-0.5B"), ("sft", "hf"))


def test_hub_excludes_path():
    with pytest.raises(ValueError, match="give `hub` alone"):
        SourceConfig(hub="Anthropic/hh-rlhf", path=Path("x.jsonl"))


# Rated real data: rating from a score gap, safety labels from the source

UF_GAPS = {"significantly_better": 4, "better": 2, "slightly_better": 1, "negligibly_better": 0.5}
UF_SCORES = {"chosen": "metadata.score_chosen", "rejected": "metadata.score_rejected", "gaps": UF_GAPS}


def test_rating_from_a_score_gap(tmp_path):
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b", "metadata": {"score_chosen": c, "score_rejected": j}}
            for c, j in [(9, 4), (7, 5), (6, 4.5), (5, 4.5), (5, 5), (4, 5), ("x", 1)]]
    loaded = load_source(SourceConfig(path=write_rows(tmp_path / "uf.jsonl", rows), rating_from_scores=UF_SCORES),
                         "preference")
    assert [p.rating for p in loaded.records] == ["significantly_better", "better", "slightly_better",
                                                  "negligibly_better"]
    assert [(p.line, p.field) for p in loaded.problems] == [(5, "rating"), (6, "rating"), (7, "metadata.score_chosen")]
    assert "score gap 0 (metadata.score_chosen 5 - metadata.score_rejected 5) is below every gap" in str(loaded.problems[0])


@pytest.mark.parametrize("gaps", [{"better": 1, "slightly_better": 2}, {"better": 0}, {"better": 1, "unsure": 1, "slightly_better": 0.5}])
def test_score_gap_table_is_validated(gaps):
    with pytest.raises(ValueError, match="gaps: expected one positive gap per rating"):
        SourceConfig(path=Path("x.jsonl"), rating_from_scores={**UF_SCORES, "gaps": gaps})


def test_safety_labels_from_the_source(tmp_path):
    path = write_rows(tmp_path / "pku.jsonl", [{"prompt": "q", "chosen": "safe", "rejected": "unsafe"},
                                               {"prompt": "q", "chosen": "a", "rejected": "b", "chosen_safe": "no",
                                                "rejected_safe": "yes"}])
    loaded = load_source(SourceConfig(path=path, chosen_safe=True, rejected_safe=False), "preference")
    assert [(p.chosen_safe, p.rejected_safe) for p in loaded.records] == [(True, False)]
    assert "chosen response is unsafe while the rejected one is safe" in str(loaded.problems[0])


def test_real_ultrafeedback_ratings(realdata):
    src = SourceConfig(path=realdata / "ultrafeedback-binarized/train_clean.jsonl.gz", rating_from_scores=UF_SCORES)
    loaded = load_source(src, "preference")
    from collections import Counter

    # the README's table (173 / 210 / 313 / 193, 111 ties) less 3 identical pairs with different
    # scores and 2 empty responses, which are problems too
    assert Counter(p.rating for p in loaded.records) == {"significantly_better": 172, "better": 210,
                                                         "slightly_better": 310, "negligibly_better": 192}
    assert (loaded.rows, loaded.bad_rows) == (1000, 116)
    assert sum("below every gap" in p.message for p in loaded.problems) == 111


def test_real_pku_saferlhf_with_nested_columns_and_constant_labels(realdata):
    src = SourceConfig(path=realdata / "pku-saferlhf/pku_seferlhf_realign_dpo_5k.json.gz",
                       columns={"chosen": "response.0", "rejected": "response.1"}, chosen_safe=True, rejected_safe=False)
    loaded = load_source(src, "preference")
    assert loaded.rows == 5135 and {(p.chosen_safe, p.rejected_safe) for p in loaded.records} == {(True, False)}
    assert len(loaded.records) == 5135 and len({p.prompt[0].content for p in loaded.records}) == 930


# eval_fraction holds out by prompt: PKU-SafeRLHF has many pairs per prompt, a split by row
# would put a prompt's pairs on both sides

def sides(train: dict, held: dict) -> tuple[set, set]:
    """The prompts trained on and the prompts held out, over every source."""
    return tuple({p.prompt[0].content for rows in pools.values() for p in rows} for pools in (train, held))


def test_held_out_split_keeps_each_prompt_on_one_side():
    from reward_model.data import split_held_out

    # 300 pairs over 100 prompts (1 to 5 pairs each); prompts 0-19 also in a second source
    pairs = [PreferencePair([Message("user", f"q{i}")], f"a{i}.{j}", f"b{i}.{j}") for i in range(100) for j in range(i % 5 + 1)]
    pools = {"main": pairs, "other": [p for p in pairs if int(p.prompt[0].content[1:]) < 20]}
    train, held = split_held_out(pools, 0.2, seed=0)
    trained, held_prompts = sides(train, held)
    assert not trained & held_prompts and trained | held_prompts == {f"q{i}" for i in range(100)}
    assert 0.18 <= len(held["main"]) / len(pairs) <= 0.22  # round(0.2 * 300) = 60, then up to one prompt more
    assert split_held_out(pools, 0.2, seed=0) == (train, held)
    assert sides(*split_held_out(pools, 0.2, seed=1))[1] != held_prompts


def test_real_pku_saferlhf_held_out_by_prompt(realdata):
    from reward_model.data import split_held_out

    src = SourceConfig(path=realdata / "pku-saferlhf/pku_seferlhf_realign_dpo_5k.json.gz",
                       columns={"chosen": "response.0", "rejected": "response.1"})
    pairs = load_source(src, "preference").records
    train, held = split_held_out({"pku": pairs}, 0.2, seed=0)
    trained, held_prompts = sides(train, held)
    assert not trained & held_prompts and len(trained | held_prompts) == 930
    assert abs(len(held["pku"]) - round(0.2 * 5135)) <= 12  # at most one prompt's pairs over


# The shipped real-data recipes (recipes/realdata/): they name files of ../shared/realdata from
# the repository root, and one runs there

REPO = Path(__file__).resolve().parents[1]
REALDATA_RECIPES = sorted((REPO / "recipes" / "realdata").glob("*.yaml"))


@pytest.mark.parametrize("recipe", REALDATA_RECIPES, ids=lambda p: p.name)
def test_realdata_recipes_name_files_that_exist(recipe, realdata, monkeypatch):
    from rlhf.recipe import Pipeline, load_recipe

    monkeypatch.chdir(REPO)
    loaded = load_recipe(recipe)
    stages = loaded.stages if isinstance(loaded, Pipeline) else [(recipe.stem, loaded)]
    for _, cfg in stages:
        paths = cfg.input_paths()
        assert "model_from" in paths and any(key.startswith("data.sources") for key in paths)
        assert [key for key, (path, _) in paths.items() if not path.exists()] == []


@pytest.mark.slow  # 10-20 s: 1,000 pairs read, checked and tokenized, one step, 175 pairs evaluated
def test_realdata_reward_model_recipe_runs(realdata, tmp_path, monkeypatch):
    from rlhf.artifacts import read_manifest
    from rlhf.cli import main

    monkeypatch.chdir(REPO)
    out = tmp_path / "rm"
    assert main(["run", "recipes/realdata/rm_ultrafeedback.yaml", f"output_dir={out}", "train.max_steps=1",
                 "train.batch_size=8", "data.max_length=128"]) == 0
    manifest = read_manifest(out)
    # 1,000 rows less 111 ties, 3 identical pairs with different scores and 2 empty responses
    assert manifest["data"]["sources"]["ultrafeedback"] == {"rows": 1000, "skipped": 116, "used": 884, "held_out": 0}
    assert manifest["metrics"]["steps"] == 1 and manifest["inputs"]["model_from"]["path"].endswith("tinystories-656k")
    assert "eval/ultrafeedback_eval/accuracy" in manifest["metrics"]
