import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf.artifacts import InputError, read_manifest
from rlhf.data import DataError
from rlhf.models import CHAT_MARKERS, build_model, load_policy, load_tokenizer, train_tokenizer
from rlhf.pipeline import run_stage
from rlhf.recipe import load_recipe


def test_tokenizer_encodes_everything_and_keeps_chat_markers_whole(tmp_path):
    tok = train_tokenizer(["What is 2 + 3? It is 5.", "Reverse abc: cba"] * 20, vocab_size=300)
    for marker in CHAT_MARKERS:
        assert len(tok(marker, add_special_tokens=False).input_ids) == 1
    text = "naïve “quotes” 日本"  # bytes the corpus never had still round-trip
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")


def test_base_model_stage_builds_a_loadable_model(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"messages": [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "5"}]}\n')
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"stage: base_model\noutput_dir: {tmp_path / 'out'}\n"
                      f"tokenizer: {{corpus: [{corpus}], vocab_size: 300}}\nmodel: {{size: tiny}}\n")
    out = run_stage(load_recipe(recipe))
    model = AutoModelForCausalLM.from_pretrained(out / "model")  # plain transformers
    tok = load_tokenizer(out / "model")
    assert model.config.vocab_size == len(tok) and model.config.hidden_size == 64
    assert read_manifest(out)["metrics"]["parameters"] == sum(p.numel() for p in model.parameters())
    with pytest.raises(InputError, match=r"tokenizer.corpus.1: .*missing.jsonl: does not exist"):
        run_stage(load_recipe(recipe, [f"tokenizer.corpus=[{corpus},{tmp_path / 'missing.jsonl'}]", "output_dir=x"]))
    corpus.write_text('{"messages": []}\n{"messages": [\n')
    with pytest.raises(DataError, match=r"c.jsonl:2: corpus: JSONDecodeError"):
        run_stage(load_recipe(recipe, ["output_dir=y"]))


def test_same_seed_same_weights():
    a, b = build_model("tiny", 300, seed=3), build_model("tiny", 300, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_real_tinystories_checkpoint_is_copied_in(tmp_path, realdata):
    source = realdata / "models" / "tinystories-656k"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"stage: base_model\noutput_dir: {tmp_path / 'out'}\nfrom_pretrained: {source}\n")
    out = run_stage(load_recipe(recipe))
    (model, _), (original, _) = load_policy(out), load_policy(source)
    assert model.config.tie_word_embeddings
    for (name, p), (_, q) in zip(model.named_parameters(), original.named_parameters()):
        assert torch.equal(p, q), name
    assert load_tokenizer(out / "model").bos_token_id == 1
    with pytest.raises(Exception, match="give either from_pretrained"):
        load_recipe(recipe, ["tokenizer.corpus=[x]"])


def test_corpus_files_are_fingerprinted_inputs(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"stage: base_model\ntokenizer: {{corpus: [{tmp_path / 'a.jsonl'}, {tmp_path / 'b.txt'}]}}\n")
    paths = load_recipe(recipe).input_paths()
    assert paths["tokenizer.corpus.0"] == (tmp_path / "a.jsonl", ()) and "tokenizer.corpus.1" in paths
