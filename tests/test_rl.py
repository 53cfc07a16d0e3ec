import json
import math
from pathlib import Path

import pytest
import torch

from conftest import planted_word, rl_config, write_sft_data
from constitutional_ai.common.errors import ConfigError
from constitutional_ai.config import RLConfig, RunConfig
from constitutional_ai.rl.core import KLController, explained_variance, gae, policy_loss, value_loss, whiten

# -- the maths, against hand computations -----------------------------------------------------------


def test_gae_matches_a_hand_computation():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 2.0, 0.0]])
    values = torch.tensor([[0.1, 0.2, 0.3], [1.0, 1.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    gamma, lam = 0.9, 0.8
    adv, ret = gae(rewards, values, mask, gamma, lam)
    # row 0: deltas d2 = 1 - .3, d1 = 0 + .9*.3 - .2, d0 = 0 + .9*.2 - .1
    d2, d1, d0 = 0.7, 0.9 * 0.3 - 0.2, 0.9 * 0.2 - 0.1
    a2, a1 = d2, d1 + gamma * lam * d2
    a0 = d0 + gamma * lam * a1
    assert adv[0].tolist() == pytest.approx([a0, a1, a2])
    # row 1: the masked third token is outside the episode (its value 9 must not leak in)
    e1, e0 = 2.0 - 1.0, 0.5 + 0.9 * 1.0 - 1.0
    assert adv[1].tolist() == pytest.approx([e0 + gamma * lam * e1, e1, 0.0])
    assert ret[1].tolist() == pytest.approx([e0 + gamma * lam * e1 + 1.0, e1 + 1.0, 0.0])


def test_clipped_policy_objective_matches_a_hand_computation():
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.7]]))
    adv = torch.tensor([[1.0, 1.0, -2.0, -1.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = policy_loss(new, old, adv, mask, clip_range=0.2)
    # per token: max(-A r, -A clip(r)) -> 1.5 clips to 1.2 for A=1: max(-1.5, -1.2) = -1.2;
    # r=.5, A=1: max(-.5, -.8) = -.5; r=1.1, A=-2: max(2.2, 2.2) = 2.2; the 4th is masked out
    assert float(loss) == pytest.approx((-1.2 - 0.5 + 2.2) / 3)
    assert float(stats["clipfrac"]) == pytest.approx(1 / 3)


def test_clipped_value_loss_matches_a_hand_computation():
    old = torch.tensor([[1.0, 1.0]])
    new = torch.tensor([[2.0, 1.1]])
    returns = torch.tensor([[3.0, 0.0]])
    loss, _ = value_loss(new, old, returns, torch.ones(1, 2), clip_range=0.2)
    # token 0: max((2-3)^2, (1.2-3)^2) = 3.24; token 1: max(1.21, 1.21) = 1.21
    assert float(loss) == pytest.approx(0.5 * (3.24 + 1.21) / 2)


def test_whitening_and_explained_variance_and_the_adaptive_kl_controller():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    w = whiten(x, mask)
    assert float(w[0, :3].mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(w[0, :3].std()) == pytest.approx(1.0, abs=1e-4) and float(w[0, 3]) == 0.0
    assert explained_variance(x, x, mask) == pytest.approx(1.0)
    kl = KLController(0.1, target=6.0, horizon=100)
    kl.update(12.0, 10)  # twice the target: +20% clipped, scaled by 10/100
    assert kl.value == pytest.approx(0.1 * 1.02)
    fixed = KLController(0.1)
    fixed.update(100.0, 10)
    assert fixed.value == 0.1


# -- PPO on a tiny policy with a planted reward -------------------------------------------------------


def _train(tmp_path, model_dir, word, **rl):
    from constitutional_ai.stages.rl import run_rl

    config = rl_config(tmp_path, model_dir, **rl)
    run_rl(config, reward_fn=lambda prompts, responses: [float(r.count(word)) for r in responses])
    return [json.loads(line) for line in (Path(config.output_dir) / "rl" / "records.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_ppo_raises_a_planted_reward_and_the_kl_coefficient_holds_the_policy_back(tmp_path, tiny_model_dir):
    word = planted_word(tiny_model_dir)
    free = _train(tmp_path / "free", tiny_model_dir, word, kl_coef=0.01)
    held = _train(tmp_path / "held", tiny_model_dir, word, kl_coef=20.0)
    start = sum(m["reward"] for m in free[:3]) / 3
    end = sum(m["reward"] for m in free[-3:]) / 3
    assert end > start + 0.5 and end > 3 * max(start, 0.1)  # the planted token is sampled far more often
    assert all(math.isfinite(m["kl"]) for m in free + held)
    assert free[-1]["kl"] > 2 * max(held[-1]["kl"], 0.1)  # a smaller coefficient lets the policy move further
    assert sum(m["reward"] for m in held[-3:]) / 3 < start + 0.3  # a huge coefficient: it barely moves
    for key in ("entropy", "clipfrac", "value_loss", "explained_variance", "reward_running_mean", "kl_coef"):
        assert key in free[-1]
    assert (tmp_path / "free" / "run" / "rl" / "model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_ppo_with_a_separate_value_model_and_lora_runs_and_logs(tmp_path, tiny_model_dir):
    records = _train(tmp_path, tiny_model_dir, "the", value_model="policy", lora={"r": 4}, total_steps=3,
                     kl_target=1.0, missing_eos_penalty=1.0)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[-1]["kl_coef"] != records[0]["kl_coef"]  # the adaptive controller moved it
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "rl" / "model")  # LoRA merged: a plain model


@pytest.mark.slow
def test_a_killed_ppo_run_resumes_from_its_last_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    from constitutional_ai.rl import ppo as ppo_module
    from constitutional_ai.stages.rl import run_rl

    config = rl_config(tmp_path, tiny_model_dir, total_steps=6, save_steps=2)
    reward = lambda prompts, responses: [float(len(r)) / 10 for r in responses]  # noqa: E731
    original = ppo_module.PPOTrainer.step

    def dies_in_step_five(self, prompts):
        if self.global_step == 4:
            raise KeyboardInterrupt
        return original(self, prompts)

    monkeypatch.setattr(ppo_module.PPOTrainer, "step", dies_in_step_five)
    with pytest.raises(KeyboardInterrupt):
        run_rl(config, reward_fn=reward)
    checkpoints = tmp_path / "run" / "rl" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-2", "step-4"]
    monkeypatch.setattr(ppo_module.PPOTrainer, "step", original)
    result = run_rl(config, reward_fn=reward)
    assert result.extra["steps"] == 6
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "rl" / "records.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # nothing lost, nothing twice


@pytest.mark.slow
def test_grpo_through_trl_raises_the_planted_reward_unless_the_kl_term_holds_it(tmp_path, tiny_model_dir):
    word = planted_word(tiny_model_dir)
    settings = {"algo": "grpo", "total_steps": 40, "learning_rate": 1e-2, "batch_size": 16, "num_generations": 4}
    free = _train(tmp_path / "free", tiny_model_dir, word, kl_coef=0.0, **settings)
    held = _train(tmp_path / "held", tiny_model_dir, word, kl_coef=50.0, **settings)
    rewards = [r["reward"] for r in free if "reward" in r]
    assert len(rewards) >= 36
    start, end = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert end > start + 0.3 and end > 2 * start
    held_rewards = [r["reward"] for r in held if "reward" in r]
    kls = [r["kl"] for r in held if "kl" in r]
    assert kls and all(math.isfinite(k) for k in kls)
    assert sum(held_rewards[-5:]) / 5 < end  # the KL term keeps the policy nearer the reference


# -- SFT and DPO through TRL ------------------------------------------------------------------------
@pytest.mark.slow
def test_sft_trains_on_the_final_assistant_turn_and_saves_a_loadable_model(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from constitutional_ai.stages.sft import run_sft
    from constitutional_ai.training.sft import prompt_completion

    data = tmp_path / "sft.jsonl"
    rows = write_sft_data(data, 24)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    pc = prompt_completion(rows[0]["messages"], tokenizer)
    assert pc["prompt"].endswith("Assistant:") and pc["completion"].startswith(" I can't help")
    config = RunConfig().with_overrides({"output_dir": str(tmp_path / "run"), "progress": False,
                                         "sft.model_name_or_path": str(tiny_model_dir), "sft.data": [str(data)],
                                         "sft.learning_rate": 1e-3, "sft.num_train_epochs": 3, "sft.device": "cpu",
                                         "sft.logging_steps": 1})
    result = run_sft(config)
    logged = [json.loads(line) for line in (tmp_path / "run" / "sft" / "trainer" / "records.jsonl").read_text()
              .splitlines() if '"loss"' in line]
    assert logged[-1]["loss"] < logged[0]["loss"]
    AutoModelForCausalLM.from_pretrained(result.extra["model"])


@pytest.mark.slow
def test_dpo_trains_on_ai_preference_pairs(tmp_path, tiny_model_dir):
    from constitutional_ai.stages.dpo import run_dpo

    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"q{i}"}],
                                         "chosen": [{"role": "assistant", "content": "a safe answer"}],
                                         "rejected": [{"role": "assistant", "content": "a harmful answer"}],
                                         "p_chosen": 0.8}) + "\n" for i in range(16)))
    config = RunConfig().with_overrides({"output_dir": str(tmp_path / "run"), "progress": False,
                                         "dpo.policy": str(tiny_model_dir), "dpo.data": [str(prefs)],
                                         "dpo.learning_rate": 1e-3, "dpo.device": "cpu", "dpo.logging_steps": 1,
                                         "dpo.max_length": 64})
    result = run_dpo(config)
    assert result.extra["pairs"] == 16 and Path(result.extra["model"]).is_dir()


def test_dropping_shared_left_padding_does_not_change_log_probabilities_or_values(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from constitutional_ai.rl.ppo import PPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "a much longer question " * 6}]]
    trainer = PPOTrainer(RLConfig(batch_size=2, max_new_tokens=6), AutoModelForCausalLM.from_pretrained(
        tiny_model_dir), tokenizer, lambda p, r: [0.0] * len(r), prompts, tmp_path)
    batch = trainer.rollout(prompts)
    row = torch.tensor([0])  # the short prompt: most of its prompt columns are padding
    pad = int((batch["mask"][row].cumsum(1) == 0).sum())
    assert pad > 5
    with torch.no_grad():
        full = trainer._evaluate(batch["ids"][row], batch["mask"][row], batch["positions"][row],
                                 batch["response"][row], batch["context"])
        cut = trainer._evaluate(batch["ids"][row][:, pad:], batch["mask"][row][:, pad:],
                                batch["positions"][row][:, pad:], batch["response"][row], batch["context"] - pad)
    assert torch.allclose(full[0], cut[0], atol=1e-5) and torch.allclose(full[1], cut[1], atol=1e-5)


def _ppo_trainer(output_dir: Path, model_dir: Path, lora: bool, **rl):
    """A trainer on the tiny model: the value a head, or with LoRA a separate PEFT classifier."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from constitutional_ai.rl.ppo import PPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    policy, value = AutoModelForCausalLM.from_pretrained(model_dir), None
    if lora:
        from peft import LoraConfig, get_peft_model

        policy = get_peft_model(policy, LoraConfig(r=4, task_type="CAUSAL_LM"))
        value = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
        value.config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
        value = get_peft_model(value, LoraConfig(r=4, task_type="SEQ_CLS"))
    config = RLConfig(batch_size=4, num_mini_batches=2, ppo_epochs=1, max_new_tokens=6, learning_rate=1e-3,
                      kl_target=1.0, total_steps=2, save_steps=2, **rl)
    prompts = [[{"role": "user", "content": f"Question {i}?"}] for i in range(8)]
    return PPOTrainer(config, policy, tokenizer, lambda p, r: [len(x) / 10 for x in r], prompts, output_dir, seed=3,
                      value_model=value)


@pytest.mark.parametrize("lora", [False, True], ids=["head", "lora"])
def test_a_resumed_ppo_run_continues_from_the_saved_step_optimizer_and_kl_coefficient(tmp_path, tiny_model_dir,
                                                                                       monkeypatch, lora):
    from safetensors import safe_open

    first = _ppo_trainer(tmp_path, tiny_model_dir, lora)
    first.train(progress=False)
    rng_at_save = torch.get_rng_state()
    checkpoint = tmp_path / "checkpoints" / "step-2"
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "model.safetensors", "optimizer.bin", "random_states_0.pkl", "trainer_state.json"]
    trained = {n for n, p in first.model.named_parameters() if p.requires_grad}
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as saved:
        assert set(saved.keys()) == trained  # with LoRA: the adapters and the value's score, no frozen base
    assert (len(trained) < len(dict(first.model.named_parameters()))) is lora
    half_written = tmp_path / "checkpoints" / "step-9.tmp"  # a save killed midway
    half_written.mkdir()
    (half_written / "model.safetensors").write_bytes(b"\0")

    second = _ppo_trainer(tmp_path, tiny_model_dir, lora)
    loads = []
    real_load = torch.load

    def checked_load(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", checked_load)
    assert second.resume() == checkpoint
    assert loads == [True, True]  # the optimizer and the random generators: tensors and plain values only
    assert torch.equal(torch.get_rng_state(), rng_at_save)  # really loaded (accelerate would skip it silently)
    assert second.global_step == 2 and second.reward_stats == first.reward_stats
    assert second.kl.value == first.kl.value != 0.05  # the adaptive controller had moved it
    weights = dict(second.model.named_parameters())
    assert all(torch.equal(p, weights[n]) for n, p in first.model.named_parameters() if n in trained)
    before, after = first.optimizer.state_dict(), second.optimizer.state_dict()
    assert before["param_groups"] == after["param_groups"] and before["state"].keys() == after["state"].keys()
    for key, state in before["state"].items():
        assert all(torch.equal(state[k], after["state"][key][k]) for k in ("step", "exp_avg", "exp_avg_sq"))

    second.config.total_steps = 3
    assert [m["step"] for m in second.train(progress=False)] == [3]
    marker = tmp_path / "pwned"

    class Planted:  # what a malicious checkpoint would hold: unpickling it runs code
        def __reduce__(self):
            return Path.touch, (marker,)

    torch.save(Planted(), tmp_path / "checkpoints" / "step-3" / "random_states_0.pkl")
    assert second.resume().name == "step-3" and not marker.exists()
    with pytest.raises(ConfigError, match="not a checkpoint of this run"):  # LoRA on, or off: other weights
        _ppo_trainer(tmp_path, tiny_model_dir, not lora).resume()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_and_entropy_match_log_softmax(temperature):
    from constitutional_ai.rl.ppo import _token_logprobs

    torch.manual_seed(0)
    logits = (torch.randn(3, 5, 50) * 4).requires_grad_(True)
    tokens = torch.randint(0, 50, (3, 5))
    logprobs, entropy = _token_logprobs(logits, tokens, temperature, entropy=True)
    logp = torch.log_softmax(logits / temperature, dim=-1)
    assert torch.allclose(logprobs, logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), atol=1e-5)
    assert torch.allclose(entropy, -(logp.exp() * logp).sum(-1), atol=1e-4)
    assert not entropy.requires_grad  # logged only: no graph through it
    (grad,) = torch.autograd.grad(logprobs.sum(), logits)
    (expected,) = torch.autograd.grad(logp.gather(-1, tokens.unsqueeze(-1)).sum(), logits)
    assert torch.allclose(grad, expected, atol=1e-6)
    assert _token_logprobs(logits, tokens, temperature)[1] is None


def test_tied_head_gives_linears_gradients(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from constitutional_ai.models import cpu_linear, tied_head

    plain, ours = (AutoModelForCausalLM.from_pretrained(tiny_model_dir) for _ in range(2))
    assert ours.get_output_embeddings().weight is ours.get_input_embeddings().weight
    cpu_linear.install(ours)  # as PPO does: the small-batch forward stays the inference path
    assert tied_head.install(ours) and tied_head.install(ours)  # idempotent
    ids = torch.randint(0, plain.config.vocab_size, (3, 12))
    for model in (plain, ours):  # logits_to_keep slices the hidden states: a non-contiguous input
        logits = model(input_ids=ids, logits_to_keep=5).logits
        (torch.log_softmax(logits, -1)[..., :7].sum() + logits.square().mean()).backward()
    for (name, p), q in zip(plain.named_parameters(), ours.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4), name
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, ours(input_ids=ids).logits, atol=1e-5)
    untied = AutoModelForCausalLM.from_config(plain.config.__class__(**{**plain.config.to_dict(),
                                                                        "tie_word_embeddings": False}))
    assert not tied_head.install(untied)
    assert not tied_head.install(torch.nn.Linear(2, 2))


# -- the LM head in chunks, kept embedding gradients --------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_head_logprobs_in_chunks_match_the_head_then_log_softmax(monkeypatch, temperature, bias):
    import constitutional_ai.models.head_logprobs as head_logprobs_module
    from constitutional_ai.models.head_logprobs import chunk_rows, head_logprobs

    wide = torch.empty(32768, 8)
    assert chunk_rows(wide, 256) == 128  # a chunk's fp32 logits on a CPU: 16 MiB, under glibc's mmap ceiling
    assert chunk_rows(torch.empty(151936, 8), 256) == 128  # never so few rows that reading the weight dominates
    assert chunk_rows(wide.bfloat16(), 256) == 256  # 16-bit: one chunk, one rounding of the weight gradient
    monkeypatch.setattr(head_logprobs_module, "HEAP_BLOCK_BYTES", 4 * 4 * 50)  # 4 rows a chunk: 4 chunks
    monkeypatch.setattr(head_logprobs_module, "MIN_CHUNK_ROWS", 1)
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=bias)
    hidden = torch.randn(3, 5, 16, requires_grad=True)
    tokens = torch.randint(0, 50, (3, 5))
    logprobs, entropy = head_logprobs(hidden, head, tokens, temperature, entropy=True)
    logp = torch.log_softmax(head(hidden) / temperature, dim=-1)
    expected = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(logprobs, expected, atol=1e-6)
    assert torch.allclose(entropy, -(logp.exp() * logp).sum(-1), atol=1e-5) and not entropy.requires_grad
    weights = torch.randn(3, 5)
    params = [hidden, head.weight, *([head.bias] if bias else [])]
    ours = torch.autograd.grad((logprobs * weights).sum(), params)
    reference = torch.autograd.grad((expected * weights).sum(), params)
    for got, want in zip(ours, reference, strict=True):
        assert torch.allclose(got, want, atol=1e-6)
    with torch.no_grad():  # a rollout's pass: no graph, the same numbers
        assert torch.allclose(head_logprobs(hidden, head, tokens, temperature)[0], expected, atol=1e-6)
    again, _ = head_logprobs(hidden, head, tokens, temperature)
    again.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward runs once"):  # its probabilities became the gradient
        again.sum().backward()


def test_head_logprobs_of_bf16_states_under_an_fp32_head():
    from constitutional_ai.models.head_logprobs import head_logprobs

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50)
    hidden = torch.randn(2, 3, 16).bfloat16().requires_grad_(True)
    tokens = torch.randint(0, 50, (2, 3))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the head's product in bf16, the states already so
        logprobs, _ = head_logprobs(hidden, head, tokens)
    logprobs.sum().backward()
    expected = torch.log_softmax(head(hidden.float()), -1).gather(-1, tokens[..., None]).squeeze(-1)
    assert logprobs.dtype == torch.float32 and torch.allclose(logprobs, expected, atol=5e-2)
    assert hidden.grad.dtype == torch.bfloat16 and head.weight.grad.dtype == torch.float32


def test_kept_gradients_are_the_dense_ones_written_in_place(monkeypatch):
    import constitutional_ai.models.kept_grads as kept_grads
    from constitutional_ai.models.head_logprobs import head_logprobs

    monkeypatch.setattr(kept_grads, "HEAP_BLOCK_BYTES", 1)  # this small embedding counts as large
    torch.manual_seed(0)

    def tied_model():
        torch.manual_seed(1)
        embed = torch.nn.Embedding(40, 8, padding_idx=0)
        head = torch.nn.Linear(8, 40, bias=False)
        head.weight = embed.weight
        return torch.nn.ModuleDict({"embed": embed, "head": head})

    plain, ours = tied_model(), tied_model()
    kept = kept_grads.KeptGrads(ours)
    assert kept and kept.weights == [ours["embed"].weight]  # the tied matrix once
    optimizer = torch.optim.SGD(ours.parameters(), lr=0.1)
    held = None
    for step in range(3):
        ids = torch.randint(0, 40, (2, 6))
        ids[:, :2] = 0  # padding rows get no gradient, as in the dense path
        tokens = torch.randint(0, 40, (2, 6))
        plain.zero_grad(set_to_none=True)
        head_logprobs(plain["embed"](ids).tanh(), plain["head"], tokens)[0].sum().backward()
        with kept.active():
            kept.zero_grad(optimizer)
            head_logprobs(ours["embed"](ids).tanh(), ours["head"], tokens)[0].sum().backward()
        grad = ours["embed"].weight.grad
        assert grad.layout == torch.strided and torch.allclose(grad, plain["embed"].weight.grad, atol=1e-6), step
        assert held is None or grad is held  # the same matrix every pass: nothing allocated afresh
        held = grad
    assert not ours["embed"].sparse and not hasattr(ours["embed"].weight, kept_grads.KEPT)  # put back
    assert not kept_grads.KeptGrads(torch.nn.Embedding(40, 8, max_norm=1.0))  # renormalising: left alone


@pytest.mark.parametrize("value", ["model", "head"])
def test_ppo_with_the_head_in_chunks_and_kept_gradients_trains_as_the_model_forward(tmp_path, tiny_model_dir,
                                                                                   monkeypatch, value):
    """One update through our split head and kept gradients against the same update through the
    model's own logits and fresh gradients: the same metrics and weights, up to float rounding."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    import constitutional_ai.models.kept_grads as kept_grads
    import constitutional_ai.rl.ppo as ppo

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [[{"role": "user", "content": f"Question {i} " + "and more " * i}] for i in range(4)]

    split = ppo.base_and_head

    def one_update(fast: bool):
        monkeypatch.setattr(kept_grads, "HEAP_BLOCK_BYTES", 1 if fast else 2**40)
        monkeypatch.setattr(ppo, "base_and_head", split if fast else lambda model: None)
        torch.manual_seed(0)
        policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        critic = None
        if value == "model":
            critic = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
            critic.config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
        trainer = ppo.PPOTrainer(RLConfig(batch_size=4, num_mini_batches=2, ppo_epochs=2, max_new_tokens=5,
                                          learning_rate=1e-3, temperature=0.9), policy, tokenizer,
                                 lambda p, r: [len(x) / 10 for x in r], prompts, tmp_path / str(fast), seed=1,
                                 value_model=critic)
        assert (trainer._unwrapped().split is not None) is fast and (trainer._ref_split is not None) is fast
        assert len(trainer.kept.weights) == (0 if not fast else 1 if value == "head" else 2)
        metrics = trainer.step(prompts)
        return metrics, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    (slow, slow_weights), (fast, fast_weights) = one_update(False), one_update(True)
    for key in ("reward", "kl", "policy_loss", "value_loss", "entropy", "approx_kl", "ratio"):
        assert fast[key] == pytest.approx(slow[key], rel=1e-4, abs=1e-6), key
    for name, weight in slow_weights.items():
        assert torch.allclose(fast_weights[name], weight, atol=1e-5), name
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir).get_input_embeddings().weight
    assert not torch.allclose(fast_weights["policy.model.embed_tokens.weight"], start, atol=1e-4)  # it trained
