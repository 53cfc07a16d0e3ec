"""PPO for language models on transformers and accelerate (TRL 1.x no longer ships one).

One update: sample responses to a batch of prompts -> score each (prompt, response) with the
reward function (the preference model) -> per-token KL penalty against the frozen reference ->
GAE advantages from the value model -> several epochs of minibatch updates with the clipped policy
objective and the clipped value loss, advantages whitened, gradients clipped. The same code runs
on one CPU, one GPU or many through ``accelerate``; LoRA adapters (PEFT) keep policy and value
small, and with LoRA the reference is the policy with its adapters switched off (no second copy).

The state (trained weights, optimizer, random generators, step, KL coefficient, reward statistics)
is checkpointed every ``save_steps`` with accelerate's ``save_state``; a killed run continues from
the last complete checkpoint. The hyperparameters are the ``rl`` section of the run's config.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from constitutional_ai.common.chat_format import render_raw
from constitutional_ai.common.errors import ConfigError
from constitutional_ai.common.types import Conversation, RewardFn
from constitutional_ai.config import RLConfig
from constitutional_ai.layout import RunLayout
from constitutional_ai.models import cpu_linear, tied_head
from constitutional_ai.models.head_logprobs import head_logprobs
from constitutional_ai.models.head_split import base_and_head
from constitutional_ai.models.kept_grads import KeptGrads
from constitutional_ai.rl.core import (
    KLController,
    explained_variance,
    gae,
    masked_mean,
    policy_loss,
    value_loss,
    whiten,
)

TRAINER_STATE = "trainer_state.json"  # in each checkpoint, next to accelerate's files


def format_prompt(tokenizer: Any, conversation: Conversation) -> str:
    """The policy's view of a prompt: its chat template, or the paper's raw format."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    return render_raw(conversation, add_generation_prompt=True)


def value_head(policy: Any) -> torch.nn.Linear:
    """A value head on the policy's own trunk (``value_model: head``): one linear layer, zero-initialised
    so the first values are 0 and the first advantages are the rewards."""
    head = torch.nn.Linear(policy.config.get_text_config().hidden_size, 1)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    return head


class PolicyAndValue(torch.nn.Module):
    """The policy and its value function as one module, so that one DDP/FSDP wrapper sees every
    trained forward pass (calling a wrapped model's submodules directly would skip its gradient
    synchronisation). ``forward`` returns the policy's log-probabilities of the response (the last
    columns), their entropies when asked, and a value for every position.

    ``split`` (:func:`~constitutional_ai.models.head_split.base_and_head`): the policy's base model
    and LM head, where its logits are exactly that head over the base's states; the head then runs
    with the log-probabilities, in chunks (:mod:`~constitutional_ai.models.head_logprobs`), instead
    of making a logits tensor."""

    def __init__(self, policy: Any, value_model: Any = None, head: torch.nn.Linear | None = None,
                 split: tuple[Any, torch.nn.Linear] | None = None):
        super().__init__()
        self.policy = policy
        self.value_model = value_model
        self.v_head = head
        self.split = split
        self.keeps_logits = _takes_logits_to_keep(policy)  # read once: forward is the hot path

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                response: torch.Tensor, temperature: float = 1.0,
                entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        logprobs, entropies, features = _response_logprobs(
            self.policy, self.split, self.keeps_logits, input_ids, attention_mask, position_ids, response,
            temperature, entropy, features=self.v_head is not None)
        if self.v_head is not None:
            # the head reads the policy's features detached: value regression must not move the policy
            return logprobs, self.v_head(features.detach().float()).squeeze(-1), entropies
        value = self.value_model.get_base_model() if hasattr(self.value_model, "get_base_model") \
            else self.value_model  # PEFT: the adapters live inside the base model's modules
        backbone = getattr(value, value.base_model_prefix)
        score = getattr(value, "score", None) or value.classifier
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False)[0]
        return logprobs, score(hidden).squeeze(-1).float(), entropies


def _check_data_parallel(accelerator: Any) -> None:
    """This trainer is data parallel only: generation runs on the unwrapped policy, which FSDP and
    ZeRO-3 hold in shards, and its checkpoints hold one process's optimizer state, which ZeRO splits."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise ConfigError(f"--algo ppo runs on one device or data parallel (configs/accelerate/ddp.yaml), not "
                          f"{accelerator.distributed_type.value}; for DeepSpeed or FSDP use --algo grpo or --algo "
                          "rloo (TRL's trainers), or LoRA (--rl-lora-r) to fit PPO in DDP")


def _takes_logits_to_keep(model: Any) -> bool:
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def _response_logprobs(model: Any, split: tuple[Any, torch.nn.Linear] | None, keeps_logits: bool,
                       ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, response: torch.Tensor,
                       temperature: float, entropy: bool = False,
                       features: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """A causal LM's log-probabilities of ``response`` (the last columns of ``ids``), their entropies
    when asked, and its last hidden states when asked (``features``). With ``split`` (its base model
    and head, :func:`~constitutional_ai.models.head_split.base_and_head`) the head runs with the
    log-probabilities in chunks, over the response's positions only; otherwise the model's own
    forward makes the logits of its last ``keep`` positions."""
    keep = response.shape[1] + 1  # the positions that predict the response tokens, and the last one
    if split is not None:
        base, head = split
        hidden = base(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)[0]
        return (*head_logprobs(hidden[:, -keep:-1], head, response, temperature, entropy), hidden)
    extra = {"logits_to_keep": keep} if keeps_logits else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                output_hidden_states=features, **extra)
    return (*_token_logprobs(out.logits[:, -keep:-1], response, temperature, entropy),
            out.hidden_states[-1] if features else None)


def _token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float,
                    entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``log softmax(logits / T)[token]`` as ``logit[token] / T - logsumexp(logits / T)``: the same
    number without keeping a second vocabulary-sized tensor for the backward pass; and, when asked,
    the (logged, not optimised) entropy from the same logsumexp, ``lse - sum(p * logits)``. Each pass
    over a minibatch's logits (8 x 32 x 32k floats) costs 13-22 ms on two cores: no division at
    temperature 1, and one softmax and one batched dot product for the entropy instead of a
    log-softmax, an exponential, a product and a sum."""
    scaled = logits.float()
    if temperature != 1.0:
        scaled = scaled / temperature
    lse = torch.logsumexp(scaled, dim=-1)
    logprobs = scaled.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - lse
    if not entropy:
        return logprobs, None
    with torch.no_grad():
        flat = scaled.detach().reshape(-1, scaled.shape[-1])
        probs = torch.softmax(flat, dim=-1)
        mean_logit = torch.bmm(probs.unsqueeze(1), flat.unsqueeze(2)).reshape(lse.shape)
        return logprobs, lse.detach() - mean_logit


class PPOTrainer:
    """Runs PPO updates; :meth:`train` is the loop, :meth:`step` one update (for tests and tools)."""

    def __init__(self, config: RLConfig, policy: Any, tokenizer: Any, reward_fn: RewardFn,
                 prompts: Sequence[Conversation], output_dir: str | Path, *, seed: int = 0, value_model: Any = None,
                 ref_policy: Any = None, accelerator: Any = None, log: Callable[[dict[str, Any]], None] | None = None):
        from accelerate import Accelerator

        self.config = config
        self.seed = seed
        self.accelerator = accelerator or Accelerator()
        _check_data_parallel(self.accelerator)
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        self.reward_fn = reward_fn
        self.prompts = list(prompts)
        self.output_dir = Path(output_dir)
        self.log_fn = log
        self.uses_peft = hasattr(policy, "disable_adapter")
        if ref_policy is None and not self.uses_peft:
            import copy

            ref_policy = copy.deepcopy(policy)
        self.ref_policy = ref_policy.eval().requires_grad_(False) if ref_policy is not None else None
        self.head = value_model is None
        if self.accelerator.device.type == "cpu":  # the rollout's decoding and the reference pass, the faster
            cpu_linear.install(policy)  # way round (training passes, with autograd on, untouched)
            if self.ref_policy is not None:
                cpu_linear.install(self.ref_policy)
        tied_head.install(policy)  # the tied head's gradient summed with the embedding's in place
        model = PolicyAndValue(policy, None if self.head else value_model, value_head(policy) if self.head else None,
                               split=base_and_head(policy))
        # on one CPU process the embeddings' 117 MB gradients are kept between minibatches, not remade
        on_cpu = self.accelerator.device.type == "cpu" and self.accelerator.num_processes == 1
        self.kept = KeptGrads(model) if on_cpu else KeptGrads()
        policy_params = [p for p in policy.parameters() if p.requires_grad]
        value_params = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("policy.")]
        vlr = config.value_learning_rate or config.learning_rate
        groups = [{"params": policy_params, "lr": config.learning_rate}, {"params": value_params, "lr": vlr}]
        try:  # the fused kernel (CPU and CUDA), as transformers' Trainer picks: 6x faster updates here
            self.optimizer = torch.optim.AdamW(groups, eps=1e-5, fused=True)
        except (RuntimeError, TypeError, ValueError):
            self.optimizer = torch.optim.AdamW(groups, eps=1e-5)
        self.model, self.optimizer = self.accelerator.prepare(model, self.optimizer)
        self.accelerator.register_save_state_pre_hook(_trained_tensors_only)
        if self.ref_policy is not None:
            self.ref_policy.to(self.accelerator.device)
        self._ref_keeps_logits = _takes_logits_to_keep(self.ref_policy if self.ref_policy is not None else policy)
        self._ref_split = base_and_head(self.ref_policy) if self.ref_policy is not None else None
        self.kl = KLController(config.kl_coef, config.kl_target, config.kl_horizon)
        self.global_step = 0
        self.reward_stats = {"count": 0, "mean": 0.0, "m2": 0.0}
        self.eos_ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        self.reward_details: list[dict[str, Any]] = []

    # -- model calls ---------------------------------------------------------------------------------
    def _unwrapped(self) -> PolicyAndValue:
        return self.accelerator.unwrap_model(self.model)

    def _policy(self) -> Any:
        return self._unwrapped().policy

    def _ref_logprobs(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                      response: torch.Tensor) -> torch.Tensor:
        """The reference policy's log-probabilities of the response tokens (no values)."""
        with contextlib.nullcontext() if self.ref_policy is not None else self._policy().disable_adapter():
            model = self.ref_policy if self.ref_policy is not None else self._policy()
            return _response_logprobs(model, self._ref_split, self._ref_keeps_logits, ids, mask, positions, response,
                                      self.config.temperature)[0]

    # -- one update ----------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, prompts: list[Conversation]) -> dict[str, Any]:
        """Sample, score and evaluate one batch: everything the optimisation epochs need."""
        device = self.accelerator.device
        texts = [format_prompt(self.tokenizer, p) for p in prompts]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True,
                             add_special_tokens=not getattr(self.tokenizer, "chat_template", None)).to(device)
        policy = self._policy()
        policy.eval()
        out = policy.generate(**enc, do_sample=True, temperature=self.config.temperature, top_k=0, top_p=1.0,
                              max_new_tokens=self.config.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
                              eos_token_id=list(self.eos_ids) or None)
        context = enc["input_ids"].shape[1]
        response = out[:, context:]
        if response.shape[1] == 0:
            raise RuntimeError("the policy generated nothing; raise max_new_tokens")
        # a response ends at its first end-of-sequence token (kept: it is an action too)
        is_eos = torch.zeros_like(response, dtype=torch.bool)
        for token in self.eos_ids:
            is_eos |= response == token
        after = (is_eos.cumsum(1) - is_eos.long()) > 0
        resp_mask = (~after).long()
        ended = is_eos.any(1)
        lengths = resp_mask.sum(1)
        texts_out = [self.tokenizer.decode(response[i, :lengths[i]], skip_special_tokens=True)
                     for i in range(len(prompts))]
        scores = torch.tensor(self.reward_fn(prompts, texts_out), dtype=torch.float, device=device)
        # a reward that explains itself (the feedback model's principle per response) is kept with the step
        self.reward_details = list(getattr(self.reward_fn, "last", None) or [])
        raw_scores = scores.clone()
        if self.config.missing_eos_penalty is not None:
            scores = scores - self.config.missing_eos_penalty * (~ended).float()
        self._update_reward_stats(self.accelerator.gather(raw_scores))  # every process's: the same stats in each
        if self.config.normalize_reward and self.reward_stats["count"] > 1:
            std = math.sqrt(self.reward_stats["m2"] / (self.reward_stats["count"] - 1)) or 1.0
            scores = (scores - self.reward_stats["mean"]) / std

        ids = torch.cat([enc["input_ids"], response], 1)
        mask = torch.cat([enc["attention_mask"], resp_mask], 1)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        logprobs, values, _ = self._evaluate(ids, mask, positions, response, context, entropy=False)
        ref_logprobs = self._ref_logprobs(ids, mask, positions, response)
        kl = (logprobs - ref_logprobs) * resp_mask
        rewards = -self.kl.value * kl
        last = (lengths - 1).clamp(min=0)
        rewards[torch.arange(len(prompts), device=device), last] += scores
        advantages, returns = gae(rewards, values, resp_mask, self.config.gamma, self.config.lam)
        if self.config.whiten_advantages:
            advantages = whiten(advantages, resp_mask)
        return {"ids": ids, "mask": mask, "positions": positions, "response": response, "resp_mask": resp_mask,
                "context": context, "logprobs": logprobs, "values": values, "advantages": advantages,
                "returns": returns, "scores": raw_scores, "kl": kl, "lengths": lengths, "ended": ended,
                "texts": texts_out}

    def _evaluate(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, response: torch.Tensor,
                  context: int, entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Log-probabilities of the response tokens, their values and the policy's entropy."""
        logprobs, values, entropies = self.model(ids, mask, positions, response, self.config.temperature, entropy)
        return logprobs, values[:, context - 1:-1].float(), entropies

    def _update_reward_stats(self, scores: torch.Tensor) -> None:
        for x in scores.tolist():  # Welford's running mean and variance
            s = self.reward_stats
            s["count"] += 1
            delta = x - s["mean"]
            s["mean"] += delta / s["count"]
            s["m2"] += delta * (x - s["mean"])

    def step(self, prompts: list[Conversation]) -> dict[str, float]:
        """One PPO update on these prompts; returns the step's metrics."""
        start = time.perf_counter()
        batch = self.rollout(prompts)
        self.model.train()
        n = len(prompts)
        size = max(1, n // self.config.num_mini_batches)
        stats: dict[str, list[float]] = {}
        rng = torch.Generator().manual_seed(self.seed * 1_000_003 + self.global_step)
        with self.kept.active():  # embeddings' gradients kept between minibatches (CPU)
            for _ in range(self.config.ppo_epochs):
                order = torch.randperm(n, generator=rng).tolist()
                for first in range(0, n, size):
                    idx = torch.tensor(order[first:first + size], device=batch["ids"].device)
                    m = batch["resp_mask"][idx]
                    # prompts are left-padded to the longest in the whole rollout: drop the columns that
                    # are padding in every row of this minibatch (a short-prompt minibatch costs less)
                    mask = batch["mask"][idx]
                    pad = int((mask.cumsum(1) == 0).sum(1).min())
                    logprobs, values, entropy = self._evaluate(batch["ids"][idx][:, pad:], mask[:, pad:],
                                                               batch["positions"][idx][:, pad:], batch["response"][idx],
                                                               batch["context"] - pad)
                    pg, pg_stats = policy_loss(logprobs, batch["logprobs"][idx], batch["advantages"][idx], m,
                                               self.config.cliprange)
                    vf, vf_stats = value_loss(values, batch["values"][idx], batch["returns"][idx], m,
                                              self.config.cliprange_value)
                    loss = pg + self.config.vf_coef * vf
                    # no zero-fill of every gradient (7% of an update); every trainable parameter gets a
                    # gradient in each backward pass, so AdamW steps the same parameters as with zeros;
                    # only the kept embedding gradients are zeroed in place
                    self.kept.zero_grad(self.optimizer)
                    self.accelerator.backward(loss)
                    if self.config.max_grad_norm:
                        self.accelerator.clip_grad_norm_(
                            [p for g in self.optimizer.param_groups for p in g["params"]], self.config.max_grad_norm)
                    self.optimizer.step()
                    assert entropy is not None
                    for key, value in {"policy_loss": pg, "value_loss": vf, "entropy": masked_mean(entropy, m),
                                       **pg_stats, **vf_stats}.items():
                        stats.setdefault(key, []).append(float(value.detach()))
        mask = batch["resp_mask"]
        # the whole (all-process) batch for the KL controller and the logged means: every process keeps
        # the same KL coefficient, and the log describes the update, not rank 0's share of it
        scores, seq_kl, lengths, ended = (self.accelerator.gather(t) for t in (
            batch["scores"], batch["kl"].sum(1), batch["lengths"], batch["ended"].float()))
        self.kl.update(float(seq_kl.mean()), len(seq_kl))
        self.global_step += 1
        metrics = {
            "step": self.global_step,
            "reward": float(scores.mean()), "reward_std": float(scores.std()) if len(scores) > 1 else 0.0,
            "reward_running_mean": self.reward_stats["mean"],
            "reward_running_std": math.sqrt(self.reward_stats["m2"] / max(1, self.reward_stats["count"] - 1)),
            "kl": float(seq_kl.mean()), "kl_coef": self.kl.value,
            "explained_variance": explained_variance(batch["values"], batch["returns"], mask),
            "response_length": float(lengths.float().mean()),
            "eos_fraction": float(ended.float().mean()),
            **{k: sum(v) / len(v) for k, v in stats.items()},
            "seconds": time.perf_counter() - start,
        }
        return metrics

    # -- the loop, checkpoints -----------------------------------------------------------------------
    def _batches(self) -> list[Conversation]:
        # each process draws its own prompts (data parallel), reproducibly
        rng = random.Random((self.seed * 7919 + self.global_step) * 1009 + self.accelerator.process_index)
        size = self.config.batch_size
        if len(self.prompts) >= size:
            return rng.sample(self.prompts, size)
        return [rng.choice(self.prompts) for _ in range(size)]

    def train(self, progress: bool = True) -> list[dict[str, float]]:
        """Run until ``total_steps`` (continuing from the last checkpoint, if any)."""
        from constitutional_ai.common.progress import StageProgress

        self.resume()
        history = []
        enabled = progress and self.accelerator.is_main_process
        with StageProgress("ppo", total=self.config.total_steps, unit="steps", enabled=enabled,
                           completed=self.global_step) as bar:
            while self.global_step < self.config.total_steps:
                torch.manual_seed(self.seed * 1_000_003 + self.global_step)
                metrics = self.step(self._batches())
                history.append(metrics)
                if self.log_fn is not None and self.accelerator.is_main_process:
                    self.log_fn({**metrics, **({"reward_details": self.reward_details} if self.reward_details else {})})
                self.accelerator.log(metrics, step=self.global_step)
                bar.update(self.global_step, status=f"reward {metrics['reward']:.3f} kl {metrics['kl']:.3f}")
                if self.global_step % self.config.save_steps == 0 or self.global_step == self.config.total_steps:
                    self.save_checkpoint()
        return history

    def save_checkpoint(self) -> Path:
        """accelerate's checkpoint (trained weights as safetensors, optimizer, random generators) plus
        :meth:`state_dict` as JSON, written to ``step-N.tmp`` and renamed once complete: a killed save
        leaves only a ``.tmp`` folder, which :meth:`resume` never picks."""
        final = RunLayout.checkpoints(self.output_dir) / f"step-{self.global_step}"
        tmp = final.with_name(final.name + ".tmp")
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(tmp))  # on every process: each writes its own random_states_<rank>.pkl
        if self.accelerator.is_main_process:
            (tmp / TRAINER_STATE).write_text(json.dumps(self.state_dict()))
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        return final

    def resume(self) -> Path | None:
        """Load the newest complete checkpoint, if there is one.

        Nothing is unpickled freely: the weights are safetensors; the optimizer and random generator
        states go through accelerate's ``load``, which defaults to ``torch.load(weights_only=True)``
        (tensors and plain values, numpy's array reconstructor allow-listed for the generators; were
        those refused, accelerate would go on without them, and every step reseeds anyway). Our own
        numbers are JSON rather than a ``register_for_checkpointing`` object, because accelerate
        1.15's ``load_custom_state`` reads those with ``weights_only=False``: any pickle put in the
        folder would run."""
        from safetensors import safe_open

        done = [p for p in RunLayout.checkpoints(self.output_dir).glob("step-*") if not p.name.endswith(".tmp")]
        if not done:
            return None
        last = max(done, key=lambda p: int(p.name.split("-")[1]))
        saved: set[str] = set()
        if (last / "model.safetensors").is_file():
            with safe_open(str(last / "model.safetensors"), framework="pt") as weights:
                saved = set(weights.keys())
        if saved != _trained_names(self._unwrapped()):  # accelerate saves the unwrapped model
            raise ConfigError(f"{last} is not a checkpoint of this run (another model or LoRA setting, or an older "
                              "format); --overwrite starts afresh")
        self.accelerator.load_state(str(last), strict=False)  # strict=False: the frozen weights are not saved
        self.load_state_dict(json.loads((last / TRAINER_STATE).read_text()))
        return last

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint holds besides tensors: plain numbers."""
        return {"global_step": self.global_step, "kl_coef": self.kl.value, "reward_stats": dict(self.reward_stats)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.global_step, self.kl.value = state["global_step"], state["kl_coef"]
        self.reward_stats = dict(state["reward_stats"])


def _trained_names(model: torch.nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def _trained_tensors_only(models: list[torch.nn.Module], weights: list[dict[str, torch.Tensor]], _: str) -> None:
    """accelerate's ``save_state`` hook: it would save every tensor of the model, and with LoRA nearly
    all of them are the frozen base, the same in every checkpoint and already where the run started."""
    for model, state in zip(models, weights, strict=True):
        trained = _trained_names(model)
        for name in [k for k in state if k not in trained]:
            del state[name]
