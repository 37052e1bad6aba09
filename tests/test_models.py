"""Models and tokenizers by name: tiny, local directories, the bundled SmolLM2."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from rlhf_lightning.models import (
    ModelLoadError,
    disable_dropout,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    resolve,
    score_head,
)


def test_tiny_tokenizer_pad_is_not_eos(tiny_tokenizer):
    assert tiny_tokenizer.pad_token == "<|endoftext|>"
    assert tiny_tokenizer.eos_token == "<|im_end|>"
    assert tiny_tokenizer.pad_token_id != tiny_tokenizer.eos_token_id
    assert len(tiny_tokenizer) == 259
    assert load_tokenizer("tiny:llama").get_vocab() == tiny_tokenizer.get_vocab()


def test_tiny_tokenizer_round_trips_bytes(tiny_tokenizer):
    text = "héllo wörld\n\t✓"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))
    assert tiny_tokenizer.decode(ids) == text


def test_tiny_chat_template_renders(tiny_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tiny_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert (
        text
        == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    no_gen = tiny_tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert no_gen == text[: -len("<|im_start|>assistant\n")]


def test_tiny_causal_lm_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = load_causal_lm("tiny:llama")
    assert torch.equal(torch.rand(3), expected)
    second = load_causal_lm("tiny:llama")
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert first.config.hidden_size == 64 and first.config.num_hidden_layers == 2
    assert first.config.vocab_size == 259
    assert first.config.pad_token_id == 256 and first.config.eos_token_id == 257
    ids = torch.tensor([[258, 10, 20, 30]])
    assert first(ids).logits.shape == (1, 4, 259)


def test_unknown_tiny_model():
    with pytest.raises(ModelLoadError, match="unknown tiny model 'tiny:gpt9'"):
        load_causal_lm("tiny:gpt9")


def test_resolve_missing_local_dir(tmp_path):
    missing = tmp_path / "no_model_here"
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve(str(missing))
    with pytest.raises(ModelLoadError, match=r"model directory './runs/nothing' does not exist"):
        resolve("./runs/nothing")


def test_resolve_dir_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="is not a Hugging Face model directory: it has no config.json"):
        resolve(str(tmp_path))
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_causal_lm(str(tmp_path))


@pytest.mark.parametrize("name", ["", None, 3])
def test_resolve_rejects_non_names(name):
    with pytest.raises(ModelLoadError, match="non-empty string"):
        resolve(name)


def test_resolve_passes_names_through(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve(str(tmp_path)) == str(tmp_path)
    assert resolve("tiny:llama") == "tiny:llama"
    assert resolve("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_unknown_bundled_model():
    with pytest.raises(ModelLoadError, match="unknown bundled model 'bundled:Nope'"):
        resolve("bundled:Nope")


def test_tiny_reward_head_init_scale():
    model = load_reward_model("tiny:llama")
    head = score_head(model)
    assert model.config.num_labels == 1 and head.out_features == 1
    expected = 1 / (64 + 1) ** 0.5
    assert head.weight.std().item() == pytest.approx(expected, rel=0.3)
    again = score_head(load_reward_model("tiny:llama"))
    assert torch.equal(head.weight, again.weight)


@pytest.fixture(scope="module")
def wide_causal_dir(tmp_path_factory):
    """A 1-layer causal LM of width 512 saved in Hugging Face format (a local directory)."""
    path = tmp_path_factory.mktemp("wide_causal")
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=512,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=8,
        num_key_value_heads=8,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_reward_head_from_causal_checkpoint_has_unit_scale(wide_causal_dir):
    model = load_reward_model(str(wide_causal_dir), pad_token_id=7)
    head = score_head(model)
    assert head.weight.shape == (1, 512)
    assert head.weight.std().item() == pytest.approx(1 / 513**0.5, rel=0.15)
    assert head.weight.mean().abs().item() < 4 / 513**0.5 / 512**0.5  # zero-mean: within 4 standard errors
    assert head.bias is None or torch.equal(head.bias, torch.zeros_like(head.bias))
    assert model.config.pad_token_id == 7 and model.config.num_labels == 1
    # the backbone weights are the checkpoint's
    causal = LlamaForCausalLM.from_pretrained(wide_causal_dir)
    assert torch.equal(model.model.embed_tokens.weight, causal.model.embed_tokens.weight)


def test_reward_checkpoint_keeps_its_trained_head(wide_causal_dir, tmp_path):
    model = load_reward_model(str(wide_causal_dir))
    with torch.no_grad():
        score_head(model).weight.fill_(0.25)
    model.save_pretrained(tmp_path)
    reloaded = load_reward_model(str(tmp_path))
    assert torch.equal(score_head(reloaded).weight, torch.full((1, 512), 0.25))


def test_disable_dropout_zeroes_modules_and_config():
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        attention_dropout=0.3,
    )
    model = LlamaForCausalLM(config)
    model.extra = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    assert disable_dropout(model) is model
    assert model.config.attention_dropout == 0.0
    assert model.extra[1].p == 0.0
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, nn.Dropout))


def test_disable_dropout_makes_train_mode_deterministic():
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        attention_dropout=0.5,
    )
    model = disable_dropout(LlamaForCausalLM(config)).train()
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(ids).logits, model(ids).logits)


def test_loaded_tiny_models_have_dropout_off():
    for model in (load_causal_lm("tiny:llama"), load_reward_model("tiny:llama")):
        assert model.config.attention_dropout == 0.0
        model.train()
        ids = torch.tensor([[1, 2, 3, 4]])
        out = model(ids).logits
        assert torch.equal(out, model(ids).logits)


@pytest.mark.slow
def test_bundled_smollm2_answers_paris():
    from rlhf_lightning.lm import sample

    name = "bundled:SmolLM2-135M-Instruct"
    tokenizer = load_tokenizer(name)
    model = load_causal_lm(name)
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.eos_token == "<|im_end|>"
    assert model.config.pad_token_id == tokenizer.pad_token_id
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert prompt.endswith("<|im_start|>assistant\n")
    encoded = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    responses, mask = sample(
        model,
        encoded["input_ids"],
        encoded["attention_mask"],
        max_new_tokens=24,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    assert responses.shape == mask.shape == (1, 24)
    answer = tokenizer.decode(responses[0][mask[0]], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_keep_bottom_layers_makes_a_smaller_model_that_exports_and_reloads(tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification

    from rlhf_lightning.models import decoder_layers, keep_bottom_layers, save_hf, tiny_tokenizer

    full = load_reward_model("tiny:llama")
    ids = torch.tensor([[5, 6, 7, 8]])
    small = keep_bottom_layers(load_reward_model("tiny:llama"), 1)
    assert len(decoder_layers(small)) == 1 and small.config.num_hidden_layers == 1
    # the kept block is the full model's first one: same hidden states after it
    after_first = full.model.layers[0]
    assert after_first is not small.model.layers[0]
    save_hf(small, tiny_tokenizer(), tmp_path / "small")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "small")
    assert reloaded.config.num_hidden_layers == 1
    torch.testing.assert_close(reloaded(ids).logits, small.eval()(ids).logits)
    with pytest.raises(ModelLoadError, match="num_layers"):
        keep_bottom_layers(load_reward_model("tiny:llama"), 3)


def test_train_top_layers_freezes_embeddings_and_lower_blocks():
    from rlhf_lightning.models import decoder_layers, train_top_layers

    model = train_top_layers(load_causal_lm("tiny:llama"), 1)
    layers = decoder_layers(model)
    assert not any(p.requires_grad for p in layers[0].parameters())
    assert all(p.requires_grad for p in layers[1].parameters())
    assert not model.get_input_embeddings().weight.requires_grad
    assert model.model.norm.weight.requires_grad
