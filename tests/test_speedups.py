"""Each speed or memory change keeps the numbers: exactly, or within the tolerance stated here.

- fused AdamW = the reference AdamW;
- frozen models stored in bf16 = fp32 weights under bf16 autocast (bit for bit);
- bf16 autocast log-probs = fp32 ones within 0.08 nats per token on average (the real model);
- PPO's one-network-at-a-time backward = one backward of the summed loss;
- the fused LM-head log-probs (logits recomputed in the backward) = the plain autograd graph, values
  and gradients within float32 rounding;
- bf16 PPO = fp32 PPO within 2% on the statistics of an iteration, with every minibatch on the
  weights the previous step left and the rollout's weight-cast cache dropped before the update.
"""

from __future__ import annotations

import copy

import pytest
import torch
from lightning.pytorch import Trainer

from rlhf_lightning.lm import (
    completion_logprob,
    head_logprobs,
    logprobs_from_logits,
    response_logits,
    response_logprobs,
)
from rlhf_lightning.models import linear_weights_to, load_causal_lm, load_reward_model, load_tokenizer
from rlhf_lightning.modules.base import adamw
from rlhf_lightning.modules.ppo import PPOModule
from rlhf_lightning.modules.ppo_update import minibatch_backward


def test_fused_adamw_matches_reference_adamw():
    torch.manual_seed(0)
    model = load_causal_lm("tiny:llama")
    twin = copy.deepcopy(model)
    fused = adamw([(list(model.parameters()), 1e-2)], weight_decay=0.1, eps=1e-8)
    assert all(group["fused"] for group in fused.param_groups)
    reference = torch.optim.AdamW(
        [
            {"params": [p for p in twin.parameters() if p.ndim >= 2], "weight_decay": 0.1},
            {"params": [p for p in twin.parameters() if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=1e-2,
        eps=1e-8,
        foreach=False,
    )
    ids = torch.randint(3, 250, (2, 12))
    for _ in range(3):
        for net, optimizer in ((model, fused), (twin, reference)):
            optimizer.zero_grad()
            net(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["causal", "reward"])
def test_frozen_model_in_bf16_equals_fp32_weights_under_autocast(kind):
    load = load_causal_lm if kind == "causal" else load_reward_model
    fp32 = load("tiny:llama").eval()
    bf16 = linear_weights_to(copy.deepcopy(fp32), torch.bfloat16)
    linears = [m for m in bf16.modules() if isinstance(m, torch.nn.Linear)]
    embedding = bf16.get_input_embeddings().weight
    assert embedding.dtype == torch.float32  # embeddings (and a head tied to them) keep fp32
    assert {m.weight.dtype for m in linears if m.weight is not embedding} == {torch.bfloat16}
    ids = torch.randint(3, 250, (3, 10))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        if kind == "causal":
            expected, got = (response_logits(m, ids, mask, 4) for m in (fp32, bf16))
        else:
            expected, got = (m(input_ids=ids, attention_mask=mask).logits for m in (fp32, bf16))
    assert torch.equal(expected, got)


@pytest.mark.slow
def test_bf16_autocast_logprobs_of_the_real_model_are_close_to_fp32():
    name = "bundled:SmolLM2-135M-Instruct"
    tokenizer, model = load_tokenizer(name), load_causal_lm(name).eval()
    chats = [
        [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        for q, a in [
            ("What is the capital of France?", "The capital of France is Paris, a city of art and food."),
            ("Write a kind note to a friend.", "Dear Sam, I am proud of you; you will do great tomorrow."),
        ]
    ]
    texts = [tokenizer.apply_chat_template(chat, tokenize=False) for chat in chats]
    encoded = tokenizer(texts, add_special_tokens=False, return_tensors="pt", padding=True)
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    with torch.no_grad():
        fp32 = response_logprobs(model, ids, mask, 1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = response_logprobs(model, ids, mask, 1)
    valid = mask[:, 1:].bool()
    error = (bf16 - fp32)[valid].abs()
    # Measured on this pair: 0.043 mean, 0.20 max per token; 0.3% of each sequence's log-probability.
    assert error.mean() < 0.08 and error.max() < 0.4, (error.mean(), error.max())
    sequence = (fp32 * valid).sum(-1)
    assert ((((bf16 - fp32) * valid).sum(-1)).abs() < 0.01 * sequence.abs()).all()


def _tiny_ppo(tmp_path, **kwargs) -> tuple[PPOModule, dict]:
    from rlhf_lightning.data.prompts import PromptDataModule

    policy = tmp_path / "policy"
    load_causal_lm("tiny:llama").save_pretrained(policy)
    load_tokenizer("tiny:llama").save_pretrained(policy)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(f'{{"prompt": "say {w}"}}\n' for w in "abcdefgh"))
    options = {"max_new_tokens": 6, "ppo_epochs": 1, "minibatch_size": 8, "learning_rate": 1e-3}
    module = PPOModule(
        policy=str(policy), reward_model="tiny:llama", export_dir=None, **{**options, **kwargs}
    )
    data = PromptDataModule(train=str(prompts), tokenizer=str(policy), batch_size=8, max_length=32)
    return module, data


def test_split_backward_gives_the_gradients_of_the_summed_loss(tmp_path):
    torch.manual_seed(0)
    module, data = _tiny_ppo(tmp_path)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    module.manual_backward = lambda loss: loss.backward()  # no trainer: a plain backward
    with torch.no_grad():
        rollout = module.rollout(batch)
    mb = rollout.minibatch(torch.arange(8))
    trainable = [p for p in module.parameters() if p.requires_grad]

    module.zero_grad()
    stats = minibatch_backward(module, mb)
    pg_loss, vf_loss = stats["loss/policy_avg"], stats["loss/value_avg"]
    split = [p.grad.clone() for p in trainable]

    module.zero_grad()
    from rlhf_lightning.rl.losses import policy_loss, value_loss

    logits, values = module.policy_and_values(mb.input_ids, mb.attention_mask, mb.start)
    pg, _ = policy_loss(module.logprobs(logits, mb.responses), mb.logprobs, mb.advantages, mb.mask, 0.2)
    vf, _ = value_loss(values, mb.values, mb.returns, mb.mask, 0.2)
    (pg + module.hparams.vf_coef * vf).backward()
    torch.testing.assert_close(pg, pg_loss)
    torch.testing.assert_close(vf, vf_loss)
    assert sum(g.abs().sum() for g in split) > 0
    for got, p in zip(split, trainable):
        torch.testing.assert_close(got, p.grad, atol=1e-7, rtol=1e-5)


def _quiet_trainer(**options) -> Trainer:
    """A CPU trainer that writes nothing: no logger, checkpoints, progress bar or model summary."""
    return Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **options,
    )


def _one_iteration(tmp_path, precision: str) -> tuple[dict, list[tuple[bool, bool]], PPOModule]:
    torch.manual_seed(0)
    module, data = _tiny_ppo(tmp_path / precision, ppo_epochs=4, learning_rate=3e-3)
    seen, autocast = [], []
    original = module.optimize

    def optimize(rollout):
        autocast.append((torch.is_autocast_enabled("cpu"), torch.is_autocast_cache_enabled()))
        seen.append(original(rollout))
        return seen[-1]

    module.optimize = optimize
    _quiet_trainer(precision=precision, max_epochs=1, limit_train_batches=1).fit(module, data)
    return seen[0], autocast, module


def test_bf16_ppo_iteration_matches_fp32(tmp_path):
    """4 epochs on one minibatch: epochs 2-4 see the policy move, so the approximate KL measures the update.
    A weight-cast cache left on during the update would keep every epoch on the rollout's weights."""
    fp32, _, _ = _one_iteration(tmp_path, "32-true")
    bf16, autocast, module = _one_iteration(tmp_path, "bf16-mixed")
    assert autocast == [(True, False)]  # bf16 autocast on, weight cache off while the weights change
    assert fp32["policy/approxkl_avg"] > 1e-2  # measured 0.100 (bf16: 0.09997)
    for key in ("policy/approxkl_avg", "loss/policy_avg", "val/ratio"):
        torch.testing.assert_close(bf16[key], fp32[key], rtol=0.02, atol=1e-3)
    linears = [m for m in module.reward_model.modules() if isinstance(m, torch.nn.Linear)]
    assert all(m.weight.dtype == torch.bfloat16 for m in linears)  # frozen models stored in bf16
    # each minibatch step frees its gradients: none are held through the next rollout
    assert all(p.grad is None for p in module.parameters())


def test_rollout_weight_cast_cache_changes_no_number(tmp_path, monkeypatch):
    import contextlib

    import rlhf_lightning.modules.ppo as ppo

    module, data = _tiny_ppo(tmp_path)
    module.hparams.calibrate_value_bias = False  # the first rollout would move the value head between the two
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    outputs = []
    for cached in (True, False):
        if not cached:
            monkeypatch.setattr(ppo, "weights_cast_once", lambda device: contextlib.nullcontext())
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):  # as Lightning's bf16-mixed
            outputs.append(module.rollout(batch))
            assert not torch.is_autocast_cache_enabled()
    for key in ("responses", "logprobs", "values", "advantages", "kl"):
        assert torch.equal(getattr(outputs[0], key), getattr(outputs[1], key)), key


def test_first_rollout_calibrates_the_value_bias_to_zero_mean_error(tmp_path):
    """The copied reward head knows neither the EOS penalty nor the KL term: after the first rollout the
    critic's mean error against the rewards-to-go is zero, and later rollouts leave the bias alone."""
    from rlhf_lightning.rl.gae import gae

    module, data = _tiny_ppo(tmp_path, missing_eos_penalty=1.0)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    before = module.value_head.bias.detach().clone()
    torch.manual_seed(0)
    out = module.rollout(batch)
    mask = out.mask
    rewards = out.non_score_reward.clone()
    last = mask.long().cumsum(-1).argmax(-1)
    rewards[torch.arange(rewards.shape[0]), last] += out.scores
    _, to_go = gae(rewards, torch.zeros_like(rewards), mask, 1.0, 1.0)
    error = ((to_go - out.values) * mask).sum() / mask.sum()
    assert abs(float(error)) < 1e-5
    assert not torch.equal(module.value_head.bias, before)
    module.rollouts = 1
    shifted = module.value_head.bias.detach().clone()
    module.rollout(batch)
    assert torch.equal(module.value_head.bias, shifted)


@pytest.mark.parametrize(
    ("temperature", "suppress", "autocast"), [(1.0, None, False), (0.7, 0, False), (0.7, 0, True)]
)
def test_fused_head_logprobs_match_the_plain_graph(temperature, suppress, autocast):
    torch.manual_seed(0)
    model = load_causal_lm("tiny:llama")
    twin = copy.deepcopy(model)
    ids = torch.randint(1, model.config.vocab_size, (3, 9))
    ids[1, -2:] = 0  # the suppressed (pad) token fills a few positions, as after EOS
    head = model.get_output_embeddings()
    assert head.weight is model.get_input_embeddings().weight  # tied: both paths must add up
    grads = []
    for m, fused in ((model, True), (twin, False)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            hidden = m.model(input_ids=ids).last_hidden_state[:, :-1]
            if fused:  # a small row group, so the backward walks several groups
                logp = head_logprobs(
                    m, hidden, ids[:, 1:], temperature, suppress, fp32_head=True, max_logits=4 * 256
                )
            else:
                with torch.autocast("cpu", enabled=False):
                    logits = torch.nn.functional.linear(
                        hidden.float(), m.get_output_embeddings().weight.float()
                    )
                logp = logprobs_from_logits(logits, ids[:, 1:], temperature, suppress)
            loss = (
                logp * torch.linspace(-1, 1, logp.numel()).view_as(logp)
            ).sum()  # positions weigh differently
            if fused:  # under autocast, as a manual_backward inside training_step is: it must stay fp32
                loss.backward()
        if not fused:  # the reference: the plain graph's backward outside autocast
            loss.backward()
        grads.append((logp.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    (fused_logp, fused_grads), (plain_logp, plain_grads) = grads
    torch.testing.assert_close(fused_logp, plain_logp, rtol=1e-5, atol=1e-5)
    if suppress is not None:
        assert (fused_logp[1, -2:] == 0).all()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_completion_logprob_with_gradients_uses_the_fused_head_and_keeps_the_numbers():
    torch.manual_seed(0)
    model = load_causal_lm("tiny:llama")
    batch = {
        "input_ids": torch.randint(1, model.config.vocab_size, (4, 12)),
        "attention_mask": torch.ones(4, 12, dtype=torch.long),
        "prompt_lengths": torch.tensor([3, 5, 4, 6]),
    }
    batch["attention_mask"][2, 9:] = 0
    with torch.no_grad():  # the row-group path without gradients: the reference numbers
        expected = completion_logprob(model, batch, fp32_head=True)
    got = completion_logprob(model, batch, fp32_head=True)
    assert got.grad_fn is not None
    torch.testing.assert_close(got.detach(), expected, rtol=1e-5, atol=1e-5)


def _rankings() -> list[dict]:
    """Three rankings with different prompt lengths, K = 3, 2 and 3, one response empty."""
    from rlhf_lightning.data.preference import preference_example

    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(3, 250, (n,), generator=g).tolist()  # noqa: E731
    return [
        preference_example(ids(5), [ids(4), ids(7), ids(2)], None, 64),
        preference_example(ids(9), [ids(3), ids(6)], 0.5, 64),
        preference_example(ids(3), [ids(5), [], ids(1)], None, 64, tiers=[0, 1, 1]),
    ]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_shared_prompt_layout_gives_the_rewards_log_probs_and_gradients_of_one_row_per_response(attention):
    from rlhf_lightning.data.preference import collate_preferences
    from rlhf_lightning.lm import ranking_scores

    examples = _rankings()
    plain, shared = (collate_preferences(examples, 0, share_prompt=s) for s in (False, True))
    assert shared["input_ids"].shape[0] == 3  # one row per ranking
    assert shared["input_ids"].numel() < plain["input_ids"].numel()
    for key in ("pairs", "groups", "margins", "response_lengths", "prompt_lengths"):
        torch.testing.assert_close(plain[key], shared[key])
    torch.manual_seed(0)
    for build, read in (
        (lambda: load_causal_lm("tiny:llama"), lambda m, b: completion_logprob(m, b, fp32_head=True)),
        (lambda: load_reward_model("tiny:llama"), ranking_scores),
    ):
        model = build()
        model.config._attn_implementation = attention
        twin = copy.deepcopy(model)
        expected, got = read(twin, plain), read(model, shared)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        (expected * torch.arange(1.0, 9.0)).sum().backward()
        (got * torch.arange(1.0, 9.0)).sum().backward()
        for a, b in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4)


def test_shared_prompt_layout_refuses_an_attention_it_cannot_mask():
    from rlhf_lightning.errors import ConfigurationError
    from rlhf_lightning.lm import shared_prompt_mask

    with pytest.raises(ConfigurationError, match="share_prompt"):
        shared_prompt_mask(torch.zeros(1, 4, dtype=torch.long), "flash_attention_2")


def test_head_logits_hands_the_head_a_matrix_and_keeps_the_numbers():
    """A strided 3-D input sends a frozen head to a batched matmul over one copy of its weight per row
    (``lm.head_logits``): the head must see a 2-D matrix and give the same logits."""
    from rlhf_lightning.lm import head_logits
    from rlhf_lightning.models import freeze, lm_head

    torch.manual_seed(0)
    model = freeze(load_causal_lm("tiny:llama")).eval()
    seen = []
    lm_head(model).register_forward_pre_hook(lambda _, args: seen.append(args[0].dim()))
    hidden = torch.randn(3, 9, 64)[:, 2:-1]  # strided, as response positions are
    with torch.no_grad():
        got = head_logits(model, hidden)
    assert seen == [2]
    torch.testing.assert_close(got, hidden.contiguous() @ lm_head(model).weight.T)


def test_decoding_head_cast_once_gives_the_logits_autocast_gives():
    """``lm.sample`` casts a plain head to the autocast dtype once instead of at every step."""
    from rlhf_lightning.lm import _decoding_head
    from rlhf_lightning.models import freeze, linear_weights_to, lm_head

    torch.manual_seed(0)
    model = linear_weights_to(freeze(load_causal_lm("tiny:llama")).eval(), torch.bfloat16)
    assert lm_head(model).weight.dtype == torch.float32  # tied to the embedding: kept in fp32
    hidden = torch.randn(4, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(_decoding_head(model, "cpu")(hidden), lm_head(model)(hidden))
    with torch.no_grad():  # without autocast: the head as it is
        assert torch.equal(_decoding_head(model, "cpu")(hidden), lm_head(model)(hidden))


def _sft_fit(tiny_exports, free_early: bool, accumulate: int) -> tuple[dict, list[int]]:
    """Three SFT steps on the tiny model; the weights, and how many gradients each step found alive."""
    from lightning.pytorch import Callback, LightningModule, seed_everything

    from rlhf_lightning.data.sft import SFTDataModule
    from rlhf_lightning.modules.sft import SFTModule

    class Alive(Callback):
        def __init__(self):
            self.counts = []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.counts.append(sum(p.grad is not None for p in module.parameters()))

    seed_everything(0)
    module = SFTModule(model=str(tiny_exports["policy"]), learning_rate=1e-2, export_dir=None)
    if not free_early:  # Lightning's own order: zeroed after the next step's forward pass
        module.optimizer_step = LightningModule.optimizer_step.__get__(module)
    data = SFTDataModule(
        train=str(tiny_exports["sft_data"]), tokenizer=str(tiny_exports["policy"]), batch_size=4
    )
    alive = Alive()
    trainer = _quiet_trainer(
        max_steps=3, accumulate_grad_batches=accumulate, limit_val_batches=0, callbacks=[alive]
    )
    trainer.fit(module, datamodule=data)
    return {k: v.clone() for k, v in module.state_dict().items()}, alive.counts


@pytest.mark.parametrize("accumulate", [1, 2])
def test_gradients_are_freed_after_each_optimizer_step_and_the_weights_are_unchanged(
    tiny_exports, accumulate
):
    early, alive = _sft_fit(tiny_exports, free_early=True, accumulate=accumulate)
    late, alive_late = _sft_fit(tiny_exports, free_early=False, accumulate=accumulate)
    assert early.keys() == late.keys()
    for key in early:
        assert torch.equal(early[key], late[key]), key
    n_params = sum(1 for _ in load_causal_lm("tiny:llama").parameters())
    if accumulate == 1:
        assert alive[1:] == [0] * (len(alive) - 1)  # nothing held into the next forward pass
        assert alive_late[1:] == [n_params] * (len(alive_late) - 1)  # what the override frees
    else:  # accumulating: the gradients of the first micro-batch live on into the second, then are freed
        assert alive[1:4] == [n_params, 0, n_params]
