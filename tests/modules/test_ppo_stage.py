"""The PPO stage end to end on tiny models: learning a toy reward, logging, LoRA, shared critic, NaN guard."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from rlhf_lightning.data.prompts import PromptDataModule
from rlhf_lightning.errors import ConfigurationError
from rlhf_lightning.models import load_causal_lm, load_reward_model, tiny_tokenizer
from rlhf_lightning.modules.ppo import NonFiniteError, PPOModule
from rlhf_lightning.rewards import RewardFunction

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_PPO_CONFIG = REPO_ROOT / "configs" / "tiny" / "ppo.yaml"
TARGET = "a"  # the token the toy reward asks for
WORDS = ["hello", "tell me", "a story", "why", "what is", "the cat", "dogs", "sky"]


def _save(model, directory: Path) -> str:
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Policy and reward-model exports in Hugging Face format, and data files, shared by the module."""
    root = tmp_path_factory.mktemp("ppo_exports")
    policy = _save(load_causal_lm("tiny:llama"), root / "policy")

    # The same policy nudged to say TARGET now and then (2-3% of sampled tokens instead of 1/259), as an SFT
    # model that sometimes shows the preferred behaviour: a random init almost never samples it, and PPO
    # cannot learn from a reward it never sees in 28 iterations of 8 episodes. A shared offset v on every
    # embedding gives the final hidden states a common direction; adding c * v to TARGET's (tied) row
    # raises its logit everywhere.
    model = load_causal_lm("tiny:llama")
    target = tiny_tokenizer().convert_tokens_to_ids(TARGET)
    embeddings = model.get_input_embeddings().weight
    v = torch.randn(embeddings.shape[1], generator=torch.Generator().manual_seed(0))
    v = v / v.norm()
    with torch.no_grad():
        embeddings += 0.16 * v
        embeddings[target] += 0.45 * v
    boosted = _save(model, root / "policy_boosted")

    reward = _save(load_reward_model("tiny:llama"), root / "reward")

    prompts = root / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": f"{WORDS[i % len(WORDS)]} {i}"}) + "\n" for i in range(32))
    )
    prefs = root / "prefs.jsonl"
    rows = [
        {
            "prompt": [{"role": "user", "content": f"{WORDS[i]}?"}],
            "chosen": f"yes, {WORDS[i]} indeed",
            "rejected": "no",
        }
        for i in range(6)
    ]
    prefs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {
        "policy": policy,
        "boosted": boosted,
        "reward": reward,
        "prompts": str(prompts),
        "prefs": str(prefs),
    }


class TokenRewardPPO(PPOModule):
    """A reward that prefers one token: the fraction of response tokens equal to TARGET."""

    def score(self, input_ids, attention_mask, responses, response_mask, prompt_texts=None):
        target = self.tokenizer.convert_tokens_to_ids(TARGET)
        valid = responses != self.tokenizer.pad_token_id
        scores = ((responses == target) & valid).float().sum(-1) / valid.sum(-1).clamp(min=1)
        return scores, scores


def _trainer(tmp_path: Path, name: str = "ppo", **kwargs) -> Trainer:
    defaults = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 1,
        "logger": TensorBoardLogger(tmp_path, name=name),
        "default_root_dir": tmp_path,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "log_every_n_steps": 1,
        "num_sanity_val_steps": 0,
    }
    return Trainer(**{**defaults, **kwargs})


def _data(exports, batch_size: int = 8, **kwargs) -> PromptDataModule:
    return PromptDataModule(
        train=exports["prompts"], tokenizer=exports["policy"], batch_size=batch_size, max_length=64, **kwargs
    )


def _module(exports, cls=PPOModule, **kwargs) -> PPOModule:
    options = {
        "policy": exports["policy"],
        "reward_model": exports["reward"],
        "max_new_tokens": 8,
        "minibatch_size": 4,
        "ppo_epochs": 1,
        "learning_rate": 1e-3,
        "export_dir": None,
    }
    return cls(**{**options, **kwargs})


def _values(scalars: dict, tag: str) -> list[float]:
    return [value for _, value in scalars[tag]]


def _log_dir(trainer: Trainer) -> Path:
    return Path(trainer.logger.log_dir)


# -- (a) PPO learns a toy reward; the KL coefficient holds the policy near the reference ------------
def _token_reward_run(exports, tmp_path, read_scalars, kl_coef: float) -> dict:
    module = _module(
        exports,
        TokenRewardPPO,
        policy=exports["boosted"],
        max_new_tokens=12,
        ppo_epochs=4,
        temperature=1.0,
        kl_coef=kl_coef,
        lr_scheduler="constant",
    )
    trainer = _trainer(tmp_path, name=f"kl{kl_coef}", max_epochs=7)  # 32 prompts / 8 = 4 iterations an epoch
    trainer.fit(module, _data(exports))
    return read_scalars(_log_dir(trainer))


def test_ppo_learns_token_reward_and_kl_coef_limits_kl(exports, tmp_path, read_scalars):
    free = _token_reward_run(exports, tmp_path, read_scalars, kl_coef=0.0)
    scores, kl = _values(free, "objective/scores"), _values(free, "objective/kl")
    assert len(scores) == 28
    assert all(math.isfinite(x) for x in kl)
    assert kl[0] == pytest.approx(0.0, abs=1e-4)  # the first rollout comes from the reference weights
    # The boosted policy starts at 2-3% TARGET tokens (up to ~15% while lm.sample truncates to the top 50, see
    # test_lm.py); PPO drives it to 55-100% in 28 iterations: over 8 seeds the smallest rise of the 5-iteration
    # mean was +0.66 (+0.44 with the truncated sampler). A rise of 0.25 is ~10x the starting rate: sampling
    # noise of 5 x 96 tokens does not get there without learning.
    first, last = sum(scores[:5]) / 5, sum(scores[-5:]) / 5
    assert first < 0.25
    assert last > first + 0.25, scores

    # Same seed, strong KL penalty: the policy stays much closer to the reference (KL ~1-5 vs ~20-30 nats).
    held = _token_reward_run(exports, tmp_path, read_scalars, kl_coef=1.0)
    held_kl = _values(held, "objective/kl")
    assert all(math.isfinite(x) for x in held_kl)
    assert sum(held_kl[-5:]) / 5 < sum(kl[-5:]) / 5, (held_kl, kl)
    assert _values(held, "objective/kl_coef") == pytest.approx([1.0] * 28)


# -- (b) the real CLI: every TensorBoard tag, and the export -------------------------------------
EXPECTED_SCALARS = [
    "objective/scores",
    "objective/rlhf_reward",
    "objective/kl",
    "objective/entropy",
    "objective/non_score_reward",
    "policy/approxkl_avg",
    "policy/clipfrac_avg",
    "loss/policy_avg",
    "loss/value_avg",
    "val/clipfrac_avg",
    "val/ratio",
    "val/num_eos_tokens",
    "objective/response_length",
    "objective/kl_coef",
    "lr",
    "eval/reward_model_preference_accuracy",
    "eval/policy_preference_accuracy",
]


def test_cli_run_logs_every_tag_and_exports(exports, tmp_path, write_jsonl):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import AutoModelForCausalLM

    from rlhf_lightning.cli import main

    prompts = write_jsonl([{"prompt": f"{w} please"} for w in WORDS * 2], "prompts.jsonl")  # 16: 2 iterations
    export = tmp_path / "export"
    code = main(
        [
            "ppo",
            "fit",
            "-c",
            str(TINY_PPO_CONFIG),
            f"--model.init_args.policy={exports['policy']}",
            f"--model.init_args.reward_model={exports['reward']}",
            "--model.init_args.max_new_tokens=6",
            "--model.init_args.ppo_epochs=1",
            f"--model.init_args.export_dir={export}",
            f"--data.init_args.train={prompts}",
            f"--data.init_args.val={exports['prefs']}",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
        ]
    )
    assert code == 0
    files = sorted((tmp_path / "runs").rglob("events.out.tfevents.*"))
    assert len(files) == 1, files
    acc = EventAccumulator(str(files[0]))
    acc.Reload()
    tags = acc.Tags()
    missing = [t for t in EXPECTED_SCALARS if t not in tags["scalars"]]
    assert not missing, f"missing scalars {missing}; logged: {sorted(tags['scalars'])}"
    assert len(acc.Scalars("objective/scores")) == 2
    assert any(t.startswith("samples") for t in tags["tensors"]), tags["tensors"]
    assert "objective/raw_scores_hist" in tags["histograms"]
    for tag in EXPECTED_SCALARS:
        assert all(math.isfinite(e.value) for e in acc.Scalars(tag)), tag

    model = AutoModelForCausalLM.from_pretrained(export)
    assert model.config.vocab_size == len(tiny_tokenizer())


# -- (c) batch arithmetic ---------------------------------------------------------------------
def test_minibatch_must_divide_rollout_batch(exports, tmp_path):
    module = _module(exports, minibatch_size=4)
    with pytest.raises(ValueError, match="not a multiple"):
        _trainer(tmp_path, logger=False).fit(module, _data(exports, batch_size=6))


# -- (d) LoRA policy; the reference is the disabled adapter ----------------------------------------
def test_lora_policy_with_adapter_disabled_reference(exports, tmp_path, read_scalars):
    module = _module(exports, lora={"r": 4, "alpha": 8})
    assert module.reference is None
    trainable = [name for name, p in module.named_parameters() if p.requires_grad]
    assert trainable
    assert all(name.startswith(("critic.", "value_head.")) or "lora_" in name for name in trainable), (
        trainable
    )
    assert any("lora_" in name for name in trainable)
    assert all(p.requires_grad for p in module.critic.parameters())
    base_before = {n: p.detach().clone() for n, p in module.policy.named_parameters() if "lora_" not in n}
    lora_before = {n: p.detach().clone() for n, p in module.policy.named_parameters() if "lora_" in n}

    trainer = _trainer(tmp_path, limit_train_batches=1)
    trainer.fit(module, _data(exports))

    assert module.rollouts == 1
    kl = _values(read_scalars(_log_dir(trainer)), "objective/kl")
    assert kl == [pytest.approx(0.0, abs=1e-5)]  # lora_B starts at zero: policy == reference
    after = dict(module.policy.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in base_before.items())
    assert any(not torch.equal(after[n], p) for n, p in lora_before.items())
    optimizer_params = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimizer_params == {id(p) for p in module.parameters() if p.requires_grad}


# -- (e) the value head on the policy's backbone ------------------------------------------------
def test_shared_critic_backbone(exports, tmp_path):
    module = _module(exports, share_critic_backbone=True)
    assert module.critic is None
    assert isinstance(module.value_head, torch.nn.Linear)
    assert module.value_head.in_features == module.policy.config.hidden_size
    head_before = module.value_head.weight.detach().clone()
    trainer = _trainer(tmp_path, limit_train_batches=2)
    trainer.fit(module, _data(exports))
    assert module.rollouts == 2
    assert not torch.equal(module.value_head.weight, head_before)


# -- (f) non-finite rewards -------------------------------------------------------------------
class NaNRewardPPO(PPOModule):
    """NaN scores on the iterations listed in ``nan_iterations`` (1-based; ``None``: always)."""

    nan_iterations: set[int] | None = {2}

    def score(self, input_ids, attention_mask, responses, response_mask, prompt_texts=None):
        raw, scores = super().score(input_ids, attention_mask, responses, response_mask, prompt_texts)
        if self.nan_iterations is None or self.rollouts + 1 in self.nan_iterations:
            scores = torch.full_like(scores, float("nan"))
        return raw, scores


class _Snapshots(Callback):
    """The trainable weights after every PPO iteration."""

    def __init__(self):
        self.weights = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append(
            {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}
        )


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nan_reward_iteration_is_skipped(exports, tmp_path):
    module = _module(exports, NaNRewardPPO)
    snapshots = _Snapshots()
    trainer = _trainer(tmp_path, limit_train_batches=3, callbacks=[snapshots])
    trainer.fit(module, _data(exports))
    assert module.rollouts == 3
    assert module.nonfinite.rollouts == 1
    assert module.nonfinite.consecutive == 0  # reset by the good iteration 3
    after_1, after_2, after_3 = snapshots.weights
    assert _same(after_1, after_2)  # iteration 2 (NaN) changed nothing
    assert not _same(after_2, after_3)  # iteration 3 trained again
    for weights in snapshots.weights:
        assert all(torch.isfinite(w).all() for w in weights.values())


def test_nan_reward_every_iteration_stops_with_checkpoint(exports, tmp_path):
    class AlwaysNaN(NaNRewardPPO):
        nan_iterations = None

    module = _module(exports, AlwaysNaN, max_nonfinite_rollouts=2)
    trainer = _trainer(tmp_path)
    with pytest.raises(NonFiniteError, match="consecutive"):
        trainer.fit(module, _data(exports))
    checkpoint = tmp_path / "nonfinite-last-good.ckpt"
    assert checkpoint.exists()
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert state["ppo_state"]["nonfinite_rollouts"] == 2
    assert not any(k.startswith(("reference.", "reward_model.")) for k in state["state_dict"])


# -- (g) the adaptive KL controller --------------------------------------------------------------
def test_adaptive_kl_coefficient_changes(exports, tmp_path, read_scalars):
    module = _module(exports, kl_coef=0.1, adaptive_kl_target=0.5, adaptive_kl_horizon=100)
    trainer = _trainer(tmp_path, limit_train_batches=3)
    trainer.fit(module, _data(exports))
    scalars = read_scalars(_log_dir(trainer))
    coefs, kl = _values(scalars, "objective/kl_coef"), _values(scalars, "objective/kl")
    assert len(coefs) == 3
    assert len(set(coefs)) == 3, coefs
    # Logged after each update: beta_i = beta_{i-1} * (1 + clip(KL_i / target - 1, +-0.2) * 8 / 100).
    beta = 0.1
    for logged, current in zip(coefs, kl):
        beta *= 1 + min(max(current / 0.5 - 1, -0.2), 0.2) * 8 / 100
        assert logged == pytest.approx(beta, rel=1e-5)
    assert coefs[0] == pytest.approx(0.1 * (1 - 0.2 * 8 / 100), rel=1e-5)  # KL 0 at the start: error -0.2
    assert module.kl_controller.value == pytest.approx(coefs[-1], rel=1e-5)


# -- the rollout seed is independent of the data seed ---------------------------------------------
def test_model_seed_may_differ_from_data_seed(exports, tmp_path):
    module = _module(exports, rollout_seed=1)
    _trainer(tmp_path, limit_train_batches=1).fit(module, _data(exports, seed=0))
    assert module.rollouts == 1


# -- reward functions: a Python object scores the texts instead of a reward model -------------------
class TargetWordReward(RewardFunction):
    """1 per occurrence of TARGET in the response text; records what it was called with."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, responses, finished):
        self.calls.append((list(prompts), list(responses), list(finished)))
        return [float(r.count(TARGET)) for r in responses]


def test_reward_function_scores_the_decoded_texts_and_no_reward_model_is_loaded(exports):
    function = TargetWordReward()
    module = _module(exports, reward_function=function, missing_eos_penalty=2.0)
    assert module.reward_model is None
    tok = module.tokenizer
    responses = torch.tensor(
        [tok.encode("a ba", add_special_tokens=False) + [tok.eos_token_id], [tok.pad_token_id] * 5]
    )
    responses[1, :3] = torch.tensor(tok.encode("xyz", add_special_tokens=False))
    mask = responses != tok.pad_token_id
    raw, scores = module.score(None, None, responses, mask, ["p1", "p2"])
    assert function.calls == [(["p1", "p2"], ["a ba", "xyz"], [True, False])]
    assert raw.tolist() == [2.0, 0.0]
    assert scores.tolist() == [2.0, -2.0]  # the second never emitted EOS


def test_reward_function_that_returns_the_wrong_count_is_a_clear_error(exports):
    class Short(RewardFunction):
        def __call__(self, prompts, responses, finished):
            return [0.0]

    module = _module(exports, reward_function=Short())
    responses = torch.tensor([[5, 6], [7, 8]])
    with pytest.raises(ConfigurationError, match=r"returned \(1,\) scores for 2 responses"):
        module.score(None, None, responses, torch.ones_like(responses, dtype=torch.bool), ["a", "b"])


def test_reward_function_from_the_cli_trains_and_the_annotator_reward_parses(
    exports, tmp_path, write_jsonl, capsys
):
    from rlhf_lightning.cli import main

    prompts = write_jsonl([{"prompt": f"{w} please"} for w in WORDS], "prompts.jsonl")
    common = [
        "ppo",
        "fit",
        "-c",
        str(TINY_PPO_CONFIG),
        f"--model.init_args.policy={exports['policy']}",
        f"--model.init_args.reward_model={exports['reward']}",
        "--model.init_args.max_new_tokens=6",
        "--model.init_args.ppo_epochs=1",
        "--model.init_args.export_dir=null",
        f"--data.init_args.train={prompts}",
        f"--data.init_args.val={exports['prefs']}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
        "--trainer.limit_train_batches=1",
        "--trainer.limit_val_batches=1",
        "--trainer.val_check_interval=1",
        "--trainer.callbacks=[]",
    ]
    reward = ["--model.init_args.reward_function.class_path=rlhf_lightning.rewards.AnnotatorReward"]
    assert main([*common, *reward, "--model.init_args.reward_function.init_args.mean=3.6"]) == 0

    # An object that does not score texts is refused in one line, before anything loads.
    with pytest.raises(SystemExit) as exit_info:
        main([*common, "--model.init_args.reward_function.class_path=collections.Counter"])
    assert exit_info.value.code == 2
    assert "reward_function" in capsys.readouterr().err


# -- (i) critic-free estimators: RLOO and GRPO ----------------------------------------------------
@pytest.mark.parametrize(
    ("estimator", "kl_penalty"), [("rloo", "reward"), ("grpo", "loss"), ("grpo", "reward")]
)
def test_critic_free_estimator_learns_token_reward_without_a_critic(
    estimator, kl_penalty, exports, tmp_path, read_scalars
):
    module = _module(
        exports,
        TokenRewardPPO,
        policy=exports["boosted"],
        advantage_estimator=estimator,
        samples_per_prompt=4,
        kl_penalty=kl_penalty,
        kl_coef=0.0,
        max_new_tokens=12,
        ppo_epochs=4,
        temperature=1.0,
        lr_scheduler="constant",
    )
    assert module.critic is None and module.value_head is None
    assert not any(k.startswith(("critic.", "value_head.")) for k in module.state_dict())
    # 2 prompts x 4 samples = 8 episodes per iteration (the GAE test's 8); 16 iterations an epoch
    trainer = _trainer(tmp_path, name=estimator, max_epochs=2)
    trainer.fit(module, _data(exports, batch_size=2))
    scalars = read_scalars(_log_dir(trainer))
    scores = _values(scalars, "objective/scores")
    assert len(scores) == 32
    assert _values(scalars, "episode")[-1] == 32 * 8
    first, last = sum(scores[:5]) / 5, sum(scores[-5:]) / 5
    assert first < 0.25
    assert last > first + 0.25, scores  # the same bar as the GAE run
    assert "loss/value_avg" not in scalars and "lr_critic" not in scalars
    assert ("loss/kl_avg" in scalars) == (kl_penalty == "loss")
    optimizer_params = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimizer_params == {id(p) for p in module.policy.parameters() if p.requires_grad}


def test_the_samples_of_a_prompt_stay_together_and_their_advantages_are_relative(exports):
    module = _module(exports, TokenRewardPPO, advantage_estimator="rloo", samples_per_prompt=3)
    data_module = _data(exports, batch_size=4)
    data_module.setup("fit")
    batch = next(iter(data_module.train_dataloader()))
    torch.manual_seed(0)
    data = module.rollout(batch)
    assert data.responses.shape[0] == 12
    prompts = data.input_ids[:, : data.start].view(4, 3, -1)
    assert (prompts == prompts[:, :1]).all()  # each group of 3 consecutive episodes shares its prompt
    assert data.prompt_texts == [t for t in batch["prompt_texts"] for _ in range(3)]
    # every token of an episode carries the episode's advantage, and a group's advantages sum to 0
    mask = data.mask.float()
    per_episode = data.advantages.sum(-1) / mask.sum(-1)
    torch.testing.assert_close(data.advantages, per_episode[:, None] * mask)
    torch.testing.assert_close(per_episode.view(4, 3).sum(-1), torch.zeros(4), atol=1e-5, rtol=0)
    expected = data.scores - data.kl.sum(-1) * module.kl_controller.value
    others = (expected.view(4, 3).sum(-1, keepdim=True) - expected.view(4, 3)) / 2
    torch.testing.assert_close(per_episode, (expected.view(4, 3) - others).view(-1))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"advantage_estimator": "rloo"}, "samples_per_prompt to 2 or more"),
        ({"advantage_estimator": "grpo", "samples_per_prompt": 1}, "samples_per_prompt to 2 or more"),
        (
            {"advantage_estimator": "rloo", "samples_per_prompt": 2, "share_critic_backbone": True},
            "no critic",
        ),
        ({"samples_per_prompt": 0}, "must be >= 1"),
    ],
)
def test_estimator_options_are_checked(exports, options, message):
    with pytest.raises(ConfigurationError, match=message):
        _module(exports, **options)


def test_minibatch_must_divide_prompts_times_samples(exports, tmp_path):
    module = _module(exports, advantage_estimator="rloo", samples_per_prompt=3, minibatch_size=4)
    with pytest.raises(ConfigurationError, match="2 prompts x model.samples_per_prompt=3 = 6 responses"):
        _trainer(tmp_path, logger=False).fit(module, _data(exports, batch_size=2))


def test_frozen_lower_blocks_are_computed_once_for_policy_reference_and_update(exports):
    """With ``train_top_layers`` the reference reuses the policy's frozen lower blocks (the trunk) and the
    update runs only the upper ones: the log-probabilities are the ones whole forward passes give."""
    from rlhf_lightning.lm import response_logits, response_logprobs

    assert _module(exports).shared_blocks is None  # every block trains: nothing to share
    assert _module(exports, train_top_layers=1, reference=exports["policy"]).shared_blocks is None
    module = _module(exports, train_top_layers=1, advantage_estimator="rloo", samples_per_prompt=2)
    assert module.shared_blocks == 1  # tiny:llama has 2 blocks
    data_module = _data(exports, batch_size=4)
    data_module.setup("fit")
    torch.manual_seed(0)
    data = module.rollout(next(iter(data_module.train_dataloader())))
    assert data.trunk.shape[:2] == data.input_ids.shape
    h = module.hparams
    with torch.no_grad():
        whole = response_logprobs(
            module.reference, data.input_ids, data.attention_mask, data.start, h.temperature,
            module.suppressed, fp32_head=True,
        )  # fmt: skip
    torch.testing.assert_close(data.kl, (data.logprobs - whole) * data.mask, rtol=0, atol=1e-6)
    mb = data.minibatch(torch.tensor([3, 0, 5]))
    full = response_logits(module.policy, mb.input_ids, mb.attention_mask, mb.start, fp32_head=True)
    torch.testing.assert_close(module.policy_logits(mb), full, rtol=0, atol=1e-6)
    torch.testing.assert_close(module.logprobs(full, mb.responses) * mb.mask, mb.logprobs, rtol=0, atol=1e-5)


def test_frozen_models_stay_in_eval_mode_when_the_trainer_asks_for_training(exports):
    module = _module(exports).train()
    assert module.policy.training
    assert not module.reference.training and not module.reward_model.training
