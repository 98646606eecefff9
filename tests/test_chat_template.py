"""The chat format a model was trained on travels with it: ``apply_chat_template`` on a saved
policy's or reward model's tokenizer gives the toolkit's training ids token for token, and
``pipeline("text-generation")`` answers chat messages. A tokenizer that cannot carry the chat
markers, or data the vocabulary cannot encode, is warned about once per stage."""

import json
from pathlib import Path

import pytest

import tiny
from conftest import REALDATA
from rlhf.data.chat import render
from rlhf.models import train_tokenizer

# Dialogues with and without a system prompt, one or several turns, ending with an answer or
# with a user turn (a generation prompt); contents with spaces to strip, newlines, punctuation.
DIALOGUES = [
    [{"role": "user", "content": "what is 2 + 3?"}, {"role": "assistant", "content": "5"}],
    [{"role": "user", "content": "  hi  "}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "say hello"},
     {"role": "assistant", "content": " hello there "}, {"role": "user", "content": "and again?"}],
    [{"role": "system", "content": "You are\nhelpful."}, {"role": "user", "content": "sort b a c"},
     {"role": "assistant", "content": "a b c"}, {"role": "user", "content": "reverse cat"},
     {"role": "assistant", "content": "tac!\n\n(done)"}],
    [{"role": "user", "content": "name a colour"}, {"role": "assistant", "content": "red"},
     {"role": "user", "content": "another"}, {"role": "assistant", "content": "blue"},
     {"role": "user", "content": "one more"}],
]
CORPUS = [m["content"] for d in DIALOGUES for m in d] * 4
WORDS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "hi", "hello", "what", "is",
         "two", "ok", "name", "a", "colour", "red", "blue", "the", "be", "brief."]


def tokenizers(realdata: Path | None) -> dict:
    """Every kind the toolkit meets: the quickstart's own (chat markers as tokens), a byte-level
    BPE without them, a word-level one, and a real SentencePiece-style one when present."""
    found = {"quickstart": train_tokenizer(CORPUS, 400), "bpe": tiny.bpe_tokenizer(CORPUS, 300),
             "words": tiny.word_tokenizer(WORDS)}
    if realdata is not None and (realdata / "models/tinystories-656k").is_dir():
        from rlhf.models import load_tokenizer

        found["tinystories"] = load_tokenizer(realdata / "models/tinystories-656k")
    return found


def applied(tokenizer, dialogue) -> list[int]:
    return list(tokenizer.apply_chat_template(dialogue, tokenize=True, return_dict=False, add_generation_prompt=True))


def test_saved_llama2_template_gives_the_render_ids_token_for_token(tmp_path):
    from transformers import AutoTokenizer

    from rlhf.chat_template import set_chat_template

    checked = 0
    for name, tokenizer in tokenizers(REALDATA if REALDATA.is_dir() else None).items():
        set_chat_template(tokenizer, "llama2")
        tokenizer.save_pretrained(tmp_path / name)
        reloaded = AutoTokenizer.from_pretrained(tmp_path / name)
        for dialogue in DIALOGUES:
            assert applied(reloaded, dialogue) == render(dialogue, reloaded).ids, (name, dialogue)
            checked += 1
    assert checked >= 3 * len(DIALOGUES)


def test_template_tokenizer_keeps_the_tokenizers_own_template():
    from rlhf.chat_template import set_chat_template

    tokenizer = tiny.bpe_tokenizer(CORPUS, 300)
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    own = tokenizer.chat_template
    set_chat_template(tokenizer, "tokenizer")
    assert tokenizer.chat_template == own


# ---------------------------------------------------------------------------------------------
# Stages: the saved SFT policy and reward model carry the template; pipeline() answers


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A base model with the quickstart's kind of tokenizer, SFT conversations, preference pairs."""
    root = tmp_path_factory.mktemp("chat_world")
    tokenizer = train_tokenizer(CORPUS, 400)
    tiny.save_with_tokenizer(root / "base", tiny.tiny_llama(len(tokenizer), max_positions=128), tokenizer)
    sft = [{"messages": d} for d in DIALOGUES if d[-1]["role"] == "assistant"] * 4
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    pairs = [{"prompt": d[:-1], "chosen": d[-1]["content"], "rejected": "no", "rating": "better"}
             for d in DIALOGUES if d[-1]["role"] == "assistant"] * 4
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    return root


def sft_cfg(world: Path, out: Path, **data):
    from sft.config import SFTConfig

    return SFTConfig(output_dir=out, model_from=world / "base",
                     data={"sources": [{"path": world / "sft.jsonl"}], "max_length": 64, **data},
                     train={"lr": 1e-3, "batch_size": 4, "micro_batch_size": 4, "max_steps": 1})


@pytest.fixture(scope="module")
def sft_dir(world, tmp_path_factory) -> Path:
    from sft.stage import run

    return run(sft_cfg(world, tmp_path_factory.mktemp("sft") / "sft"))


def test_saved_policy_applies_its_training_format(sft_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(sft_dir / "model")
    assert tokenizer.chat_template
    for dialogue in DIALOGUES:
        assert applied(tokenizer, dialogue) == render(dialogue, tokenizer).ids


def test_pipeline_answers_a_chat_message_with_the_saved_policy(sft_dir):
    from transformers import pipeline

    chat = pipeline("text-generation", model=str(sft_dir / "model"), device="cpu")
    out = chat([{"role": "user", "content": "say hello"}], max_new_tokens=4, do_sample=False)
    messages = out[0]["generated_text"]
    assert [m["role"] for m in messages] == ["user", "assistant"] and isinstance(messages[-1]["content"], str)


def test_saved_reward_model_applies_its_training_format(world, tmp_path):
    from transformers import AutoTokenizer

    from reward_model.config import RewardModelConfig
    from reward_model.stage import run

    cfg = RewardModelConfig(output_dir=tmp_path / "rm", model_from=world / "base",
                            data={"sources": [{"path": world / "pairs.jsonl"}], "max_length": 64},
                            train={"lr": 1e-3, "batch_size": 4, "micro_batch_size": 4, "max_steps": 1})
    tokenizer = AutoTokenizer.from_pretrained(run(cfg) / "model")
    pair = DIALOGUES[0]
    assert applied(tokenizer, pair) == render(pair, tokenizer).ids


def test_template_tokenizer_stage_saves_the_template_it_trained_with(world, tmp_path):
    from transformers import AutoTokenizer

    from sft.stage import run

    own = "{% for m in messages %}{{ bos_token + m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}"
    base = AutoTokenizer.from_pretrained(world / "base")
    base.chat_template = own
    base.save_pretrained(world / "base_own")
    for name in ("config.json", "model.safetensors"):
        (world / "base_own" / name).write_bytes((world / "base" / name).read_bytes())
    cfg = sft_cfg(world, tmp_path / "sft", template="tokenizer")
    cfg.model_from = world / "base_own"
    assert AutoTokenizer.from_pretrained(run(cfg) / "model").chat_template == own


# ---------------------------------------------------------------------------------------------
# Item 2: a tokenizer that breaks the markers, characters the vocabulary drops


def test_marker_problems_name_merged_and_lost_markers():
    from rlhf.chat_template import marker_problems

    assert marker_problems(train_tokenizer(CORPUS, 400)) == []
    assert marker_problems(tiny.bpe_tokenizer(CORPUS, 300)) == []  # distinct pieces, round trip
    blind = tiny.word_tokenizer(["<unk>", "<s>", "</s>", "hi", "hello"])  # no marker is a word: all <unk>
    assert marker_problems(blind) == [
        "'[INST]', '[/INST]', '<<SYS>>' and '<</SYS>>' encode to the same ids [0]",
        "'[INST]', '[/INST]', '<<SYS>>' and '<</SYS>>' do not survive encoding and decoding (alone, '[INST]' "
        "decodes as '<unk>', '[/INST]' decodes as '<unk>', '<<SYS>>' decodes as '<unk>' and '<</SYS>>' decodes "
        "as '<unk>')"]


def test_lost_characters_counts_what_the_vocabulary_drops():
    from rlhf.chat_template import lost_characters

    words = tiny.word_tokenizer(["<unk>", "<s>", "</s>", "hi", "there"])
    # "hi there" survives; "café" becomes <unk>: its 4 characters are lost (whitespace never counts)
    assert lost_characters(["hi there", "hi café"], words) == {"c": 1, "a": 1, "f": 1, "é": 1}
    assert lost_characters(["anything at all: é “ ” 中"], tiny.bpe_tokenizer(CORPUS, 300)) == {}


def test_a_stage_warns_about_broken_markers_and_lost_characters(tmp_path, capsys):
    from sft.stage import run

    words = ["<unk>", "<s>", "</s>", "hi", "hello", "there", "ok"]
    tiny.save_with_tokenizer(tmp_path / "base", tiny.tiny_llama(len(words), max_positions=64), tiny.word_tokenizer(words))
    rows = [{"messages": [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello café"}]}] * 4
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = sft_cfg(tmp_path, tmp_path / "sft", max_length=32, packing=False)
    cfg.model_from = tmp_path / "base"
    run(cfg)
    out = capsys.readouterr().out
    assert out.count("the tokenizer cannot carry the llama2 chat markers") == 1  # once per stage
    assert "'[INST]', '[/INST]', '<<SYS>>' and '<</SYS>>' encode to the same ids [0]" in out
    assert f"{tmp_path / 'sft.jsonl'}: 16 of 64 characters" in out  # 4 x "café" of 4 x 16 non-space ones


def test_tinystories_tokenizer_is_warned_about(realdata, capsys):
    from rlhf.chat_template import lost_characters, marker_problems
    from rlhf.models import load_tokenizer

    tokenizer = load_tokenizer(realdata / "models/tinystories-656k")
    problems = "\n".join(marker_problems(tokenizer))
    assert "'[INST]' and '[/INST]' encode to the same ids" in problems
    assert "'<<SYS>>' and '<</SYS>>' encode to the same ids" in problems
    assert set(lost_characters(["a café “quoted” 中"], tokenizer)) == {"é", "“", "”", "中"}
