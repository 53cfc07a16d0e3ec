"""One pydantic config drives every stage; YAML in and out; CLI flags map onto dotted paths.

A run directory holds the resolved config it was made with, so a run is reproducible from its
own output and a resume can check it is continuing the same job.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializationInfo,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from constitutional_ai.common.errors import ConfigError, format_validation_error
from constitutional_ai.common.yaml_safe import load_yaml

EMBEDDED_MODEL = "embedded:tiny-demo"


class _Base(BaseModel):
    # every float is finite: inf or NaN in a knob (a temperature of inf samples uniform noise) is refused
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


#: Below this a temperature divides logits into overflow: 0 (greedy) is the way to ask for argmax.
MIN_TEMPERATURE = 1e-2
MAX_TEMPERATURE = 100.0


def _check_temperature(value: float, greedy_allowed: bool) -> float:
    if greedy_allowed and value == 0.0:
        return value
    if not MIN_TEMPERATURE <= value <= MAX_TEMPERATURE:
        hint = "0 for greedy decoding, or " if greedy_allowed else ""
        raise ValueError(f"{value} is outside [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}]; use {hint}a value such as 0.7")
    return value


class GenerationParams(_Base):
    """Sampling parameters, named as in transformers' ``GenerationConfig`` and vLLM's ``SamplingParams``."""

    max_new_tokens: int = Field(256, ge=1, description="Most tokens generated per completion.")
    temperature: float = Field(1.0, ge=0.0, description="Sampling temperature; 0 means greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass; 1 disables it.")
    top_k: int = Field(0, ge=0, description="0 disables top-k filtering.")
    stop: list[str] = Field(default_factory=list, description="Extra stop strings; cut from the output.")

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float) -> float:
        return _check_temperature(v, greedy_allowed=True)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


#: Marks a field that changes speed, memory or where a model runs, never what a stage writes: it is
#: left out of the identity hash, so it may change between a crash and its resume.
RUNTIME = {"runtime": True}
#: Marks a field added after runs were made: at its default it is left out of the identity hash, so
#: a run made before the field existed keeps its identity (and is not redone) until it is set.
ADDED = {"added": True}


#: Optional sections that mean "as another section" while unset: setting one of their fields starts
#: them from that section (``--feedback.model.batch_size 8`` is the policy model with batch size 8).
UNSET_SECTION_DEFAULTS = {"feedback.model": "policy"}


def redact_url(url: str) -> str:
    """``url`` with any ``user:password@`` replaced by ``***@``."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if not parts.username and not parts.password:
        return url
    host = parts.hostname or ""
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


#: Every generation backend: the name ``backend`` takes, and the class implementing it (imported on
#: use by ``backends.load_backend``). A new backend is a module in ``backends/`` and one line here.
BACKENDS: dict[str, str] = {
    "transformers": "constitutional_ai.backends.transformers_backend:TransformersBackend",
    "openai": "constitutional_ai.backends.openai_backend:OpenAIBackend",
    "vllm": "constitutional_ai.backends.vllm_backend:VLLMBackend",
}
BackendName = Literal[tuple(BACKENDS)]  # type: ignore[valid-type]


class ModelConfig(_Base):
    """Which model to load and how. ``embedded:tiny-demo`` builds a tiny offline demo model."""

    model_name_or_path: str = Field(EMBEDDED_MODEL, description="Local model directory or Hugging Face model id.")
    backend: BackendName = Field(
        "transformers", description="transformers (in-process, default), openai (any OpenAI-compatible server: vLLM, "
                                    "SGLang, llama.cpp, Ollama, hosted APIs) or vllm (in-process vLLM engine, GPU).")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the model.")
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|(cuda|xpu|npu)(:\d+)?)$",
                        description="auto, cpu, cuda, cuda:N or mps.", json_schema_extra=RUNTIME)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bf16 on GPUs that support it, fp16 on other accelerators, fp32 on CPU.",
        json_schema_extra=RUNTIME)
    trust_remote_code: bool = Field(False, description="Run code shipped with the model; off by default.")
    batch_size: int = Field(32, ge=1, description="Sequences per forward pass.", json_schema_extra=RUNTIME)
    max_batch_tokens: int | None = Field(
        None, ge=64, description="Cap on padded tokens per scoring pass; unset: on CPU 4096, or fewer so that "
                                 "a pass's MLP activations stay under 16 MiB (reused, not page-faulted "
                                 "in afresh), no cap on accelerators.", json_schema_extra=RUNTIME)
    prefix_cache_tokens: int = Field(
        16384, ge=0, description="Scoring keeps the KV cache of recent shared prompt starts (few-shot blocks) up to "
                                "this many tokens, so later batches reuse them; 0 turns it off.",
        json_schema_extra=RUNTIME)
    generation_cache_tokens: int = Field(
        32768, ge=0, description="Generation keeps the KV cache of recent prompts and completions up to this many "
                                "tokens, so a prompt that extends one (a revision after its critique, every critique "
                                "after the same few-shot block) prefills only its new tokens; 0 turns it off.",
        json_schema_extra=RUNTIME)
    max_context: int | None = Field(None, ge=16, description="Override the context length read from the model.")
    chat_format: Literal["auto", "chat_template", "raw"] = Field(
        "auto", description="auto: the tokenizer's chat template if it has one, else the paper's raw format."
    )
    # -- openai: a server speaking the OpenAI API ---------------------------------------------------
    base_url: str | None = Field(None, description="openai backend: the server's base URL, e.g. "
                                                   "http://localhost:8000/v1.", json_schema_extra=RUNTIME)
    api_key_env: str = Field("OPENAI_API_KEY", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                             description="openai backend: the environment variable holding the API key (the key "
                                         "itself is never read from config, logged or stored).",
                             json_schema_extra=RUNTIME)
    max_concurrency: int = Field(32, ge=1, description="openai backend: requests in flight at once.",
                                 json_schema_extra=RUNTIME)
    max_retries: int = Field(8, ge=0, description="openai backend: retries of a request after a 429, a 5xx, a "
                                                  "timeout, a dropped connection or a malformed reply.",
                             json_schema_extra=RUNTIME)
    request_timeout: float = Field(120.0, gt=0, description="openai backend: seconds before a request is retried.",
                                   json_schema_extra=RUNTIME)
    logprobs_mode: Literal["auto", "echo", "top_logprobs"] = Field(
        "auto", description="openai backend, how score_choices reads log-probabilities: echo (exact prompt "
                            "log-probabilities from /completions), top_logprobs (the next token's top candidates), "
                            "or auto (echo when the server returns it, else top_logprobs).")
    tokenizer: str | None = Field(
        None, description="openai backend: local directory or hub id of the served model's tokenizer, for exact "
                          "token counts and client-side chat templates; unset: ask the server (/tokenize).")
    extra_body: dict[str, Any] = Field(
        default_factory=dict, description="openai backend: server-specific sampling fields sent with every generation "
                                          "request, as the OpenAI SDK's extra_body (llama.cpp: repeat_penalty: 1.0 "
                                          "turns off its default repetition penalty; vLLM: repetition_penalty).")
    # -- vllm: in-process engine --------------------------------------------------------------------
    tensor_parallel_size: int = Field(1, ge=1, description="vllm backend: GPUs one model is split across.",
                                      json_schema_extra=RUNTIME)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vllm backend: share of GPU memory used.",
                                        json_schema_extra=RUNTIME)
    enable_prefix_caching: bool = Field(True, description="vllm backend: reuse the KV cache of shared prompt starts "
                                                          "(constitution, few-shot block).", json_schema_extra=RUNTIME)

    @field_validator("extra_body", mode="before")
    @classmethod
    def _json_object(cls, v: Any) -> Any:
        if isinstance(v, str):  # from the command line: --extra-body '{"repeat_penalty": 1.0}'
            try:
                v = json.loads(v)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not a JSON object ({exc.msg}); pass e.g. '{{\"repeat_penalty\": 1.0}}'") from None
        return v

    @field_serializer("base_url")
    def _redact_url(self, url: str | None, info: SerializationInfo) -> str | None:
        """Credentials in the URL (``http://user:KEY@host``) never reach a file, a log or a table;
        only :meth:`RunConfig.with_overrides` (in memory) keeps them."""
        if url is None or (info.context or {}).get("keep_secrets"):
            return url
        return redact_url(url)

    @model_validator(mode="after")
    def _server_needs_url(self) -> ModelConfig:
        if self.backend == "openai" and not self.base_url:
            raise ValueError("backend openai needs base_url (e.g. http://localhost:8000/v1); set --base-url")
        return self


class PromptSourceConfig(_Base):
    """Where prompts come from: a file, an embedded sample (``embedded:NAME``) or a hub dataset id."""

    path: str = Field("embedded:red_team", description="File, embedded:red_team|helpful, or hub dataset id.")
    format: Literal["auto", "jsonl", "json", "csv", "parquet", "text", "hh", "hub"] = Field(
        "auto", description="auto detects from the file suffix; hh parses Human:/Assistant: transcripts.")
    field: str | None = Field(None, description="Column with the prompt; auto-detected when unset.")
    split: str = Field("train", description="Hub dataset split.")
    subset: str | None = Field(None, description="Hub dataset config name.")
    data_dir: str | None = Field(None, description="Hub dataset data_dir (hh-rlhf: red-team-attempts, ...).")
    limit: int | None = Field(None, ge=1, description="Use at most this many prompts.")


class CritiqueConfig(_Base):
    """SL-CAI: initial response, then ``n_rounds`` of critique and revision."""

    n_rounds: int = Field(4, ge=1, description="Critique-revision rounds per prompt (paper: 4).")
    few_shot: int = Field(0, ge=0, description="Few-shot critique examples prepended to each request.")
    skip_critique: bool = Field(False, description="Revise without a critique (the paper's ablation).")
    batch_size: int = Field(64, ge=1, description="Prompts advanced together and flushed to disk at once.",
                            json_schema_extra=RUNTIME)
    generation: GenerationParams = Field(default_factory=lambda: GenerationParams(max_new_tokens=128,
                                                                                   temperature=0.7))


class PairsConfig(_Base):
    """RL-CAI step 1: sample responses from the policy and pair them for comparison."""

    n_responses: int = Field(2, ge=2, description="Responses sampled per prompt; every pair of them is compared.")
    batch_size: int = Field(64, ge=1, description="Prompts sampled together and flushed to disk at once.",
                            json_schema_extra=RUNTIME)
    generation: GenerationParams = Field(default_factory=lambda: GenerationParams(max_new_tokens=128,
                                                                                   temperature=1.0))


class FeedbackConfig(_Base):
    """RL-CAI step 2: a feedback model labels each pair under comparison principles (soft labels)."""

    model: ModelConfig | None = Field(None, description="The feedback model; null uses the policy model.")
    principles: Literal["sample", "k", "all"] = Field(
        "sample", description="One sampled principle per comparison (paper), the mean over k, or over all.")
    k: int = Field(4, ge=1, description="Principles averaged per comparison when principles is k.")
    both_orders: bool = Field(False, description="Score (A,B) and (B,A) and average: removes position bias.")
    few_shot: int = Field(0, ge=0, description="Few-shot feedback examples before each question.")
    few_shot_blocks: int = Field(
        8, ge=0, description="Distinct few-shot blocks per run, each with its own sampled principles and option "
                             "orders; every question uses one at random, so a block is computed once per batch "
                             "and shared. 0: a fresh block for every question.")
    chain_of_thought: bool = Field(False, description="Generate a step-by-step rationale before scoring.")
    clamp: tuple[float, float] = Field((0.4, 0.6), description="Chain-of-thought labels are clamped to this range.")
    rationale: GenerationParams = Field(default_factory=lambda: GenerationParams(max_new_tokens=128,
                                                                                  temperature=0.0),
                                        description="Sampling for chain-of-thought rationales.")
    batch_size: int = Field(64, ge=1, description="Comparisons scored together and flushed to disk at once.",
                            json_schema_extra=RUNTIME)

    @field_validator("clamp")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 <= v[0] <= 0.5 <= v[1] <= 1.0:
            raise ValueError("must be (low, high) with 0 <= low <= 0.5 <= high <= 1")
        return v


class LabelerEvalConfig(_Base):
    """``cai eval-labeler``: a feedback configuration against data with known answers."""

    data: str = Field("embedded:labeler", description="JSONL: paper-style multiple choice (prompt/corrects/"
                                                      "incorrects) or pairwise chosen/rejected transcripts (hh-rlhf); "
                                                      "embedded:labeler is 24 bundled pairs with known answers.")
    format: Literal["auto", "multiple_choice", "pairwise"] = Field("auto", description="How to read data.")
    limit: int | None = Field(None, ge=1, description="Evaluate at most this many items.")
    n_bins: int = Field(10, ge=1, description="Confidence bins for ECE and the reliability diagram.")
    both_orders: bool = Field(True, description="Score every item in both option orders, whatever "
                                                "feedback.both_orders says: the position-bias rate needs both "
                                                "(accuracy is then that of the two orders averaged).")


class SFTExportConfig(_Base):
    """Turning critique records into conversational SFT data (TRL's ``messages`` format)."""

    revisions: Literal["final", "all"] = Field("all", description="Final revision only, or every step (paper).")
    helpful: PromptSourceConfig | None = Field(
        default_factory=lambda: PromptSourceConfig(path="embedded:helpful"),
        description="Helpfulness conversations to mix in; null to disable.",
    )
    helpful_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="Share of helpfulness examples in the mix.")
    drop_truncated: bool = Field(False, description="Leave out revisions cut off by max_new_tokens.")


class PreferenceSourceConfig(_Base):
    """One preference dataset of a training or evaluation mix.

    On the command line a source is one string, ``PATH`` or ``PATH,key=value,...`` (for example
    ``Anthropic/hh-rlhf,data_dir=harmless-base,weight=0.5`` or ``harmless-dev.jsonl,offset=1200``).
    """

    path: str = Field(..., description="JSONL/JSON/parquet/CSV file, run:preferences (this run's AI labels), or "
                                       "a Hugging Face dataset id.")
    format: Literal["auto", "preferences", "hh"] = Field(
        "auto", description="auto reads per row: prompt/chosen/rejected (TRL, ours, with optional p_chosen), "
                            "chosen/rejected hh-rlhf transcripts, or text_correct/text_incorrect.")
    weight: float = Field(1.0, gt=0.0, description="Sampling weight in the mix: 2 repeats every pair, 0.5 keeps a "
                                                   "random half.")
    split: str = Field("train", description="Hub dataset split.")
    subset: str | None = Field(None, description="Hub dataset config name.")
    data_dir: str | None = Field(None, description="Hub dataset data_dir (hh-rlhf: harmless-base, helpful-base).")
    offset: int = Field(0, ge=0, description="Skip this many rows first.")
    limit: int | None = Field(None, ge=1, description="Read at most this many rows (after offset).")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        path, *options = value.split(",")
        out: dict[str, Any] = {"path": path.strip()}
        for option in options:
            key, sep, val = option.partition("=")
            if not sep:
                raise ValueError(f"{option!r} in {value!r} is not key=value (path,weight=0.5,offset=100,...)")
            out[key.strip()] = val.strip()
        return out


class LoRAConfig(_Base):
    """PEFT LoRA adapters instead of full fine-tuning (names as in ``peft.LoraConfig``)."""

    r: int = Field(16, ge=1, description="Adapter rank.")
    lora_alpha: int = Field(32, ge=1, description="Adapter scaling numerator.")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: list[str] | str = Field("all-linear", description="Modules to adapt; all-linear or names.")


class TrainingConfig(_Base):
    """What every training stage shares; names follow ``transformers.TrainingArguments`` and TRL, so
    accelerate, DeepSpeed, gradient accumulation, bf16, checkpoints, resume and ``report_to``
    behave as users know them."""

    learning_rate: float = Field(5e-5, gt=0.0, description="Peak learning rate.")
    num_train_epochs: float = Field(1.0, gt=0.0, description="Passes over the training data.")
    per_device_train_batch_size: int = Field(8, ge=1, description="Examples per device per step.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Steps accumulated per optimizer update.")
    lr_scheduler_type: str = Field("linear", description="transformers scheduler name.")
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0, description="Share of steps for linear warm-up.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    max_length: int = Field(512, ge=16, description="Tokens per example; conversations are cut from the left.")
    bf16: bool = Field(False, description="bfloat16 mixed precision (GPUs that support it).")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory.")
    lora: LoRAConfig | None = Field(None, description="Train LoRA adapters (PEFT) instead of all weights.")
    device: str = Field("auto", pattern=r"^(auto|cpu)$", description="auto (accelerate picks) or cpu.")
    logging_steps: int = Field(10, ge=1, description="Log every this many optimizer steps.")
    save_steps: int = Field(200, ge=1, description="Checkpoint every this many optimizer steps.")
    save_total_limit: int | None = Field(2, ge=1, description="Checkpoints kept.")
    report_to: list[str] = Field(default_factory=list, description="transformers loggers (tensorboard, wandb...); "
                                                                 "metrics always go to a JSONL too.")


class PreferenceModelConfig(TrainingConfig):
    """RL-CAI step 3: a Bradley-Terry preference model on soft AI labels mixed with human labels.

    Trained with TRL's ``RewardTrainer``; the soft-label loss is ours.
    """

    model_name_or_path: str = Field(EMBEDDED_MODEL, description="Base model, loaded as a sequence classifier "
                                                                "with one output (encoder or decoder).")
    revision: str | None = Field(None, description="Hub revision of the base model.")
    trust_remote_code: bool = Field(False, description="Run code shipped with the model; off by default.")
    sources: list[PreferenceSourceConfig] = Field(
        default_factory=lambda: [PreferenceSourceConfig(path="run:preferences")],
        description="Training preference sources, mixed by weight.")
    eval_sources: list[PreferenceSourceConfig] = Field(
        default_factory=list, description="Held-out preference sources for eval-pm; empty: eval_fraction of the mix.")
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Share of the mix held out when no eval_sources.")
    center_rewards_coefficient: float | None = Field(
        None, ge=0.0, description="Reward centring (Eisenstein et al. 2023): adds c * mean((r_w + r_l)^2).")
    group_by_length: bool = Field(True, description="Batch pairs of similar length (less padding, faster).")
    padding_free: bool = Field(True, description="Train on each batch's real tokens only (packed rows, attention "
                                                 "per row, a last layer computing only the pooled positions): the "
                                                 "same sums, about 1.35x faster on hh-rlhf, ~10% more peak memory "
                                                 "on CPU. Checked against the padded forward on the first batch, "
                                                 "and off with a warning where a model cannot.",
                               json_schema_extra=RUNTIME)
    pad_to_multiple_of: int | None = Field(32, ge=1, description="Pad batches to a multiple of this: few distinct "
                                                                "shapes keep memory steady with length grouping.")
    disable_dropout: bool = Field(True, description="Turn the model's dropout off (TRL's default); keep it on to "
                                                  "regularise small datasets.")
    batch_size: int = Field(32, ge=1, description="Conversations per forward pass when scoring.")
    new_data_weight: float = Field(2.0, gt=0.0, description="Iterated RL-CAI, iterations 2+: sampling weight of the "
                                                            "newest iteration's AI labels in the PM's mix (older "
                                                            "iterations keep weight 1).", json_schema_extra=ADDED)


class SFTConfig(TrainingConfig):
    """SL-CAI fine-tuning: TRL's ``SFTTrainer`` on the revisions (mixed with helpfulness data by
    ``export-sft``), loss on the final assistant turn only."""

    model_name_or_path: str = Field(EMBEDDED_MODEL, description="The helpful model to fine-tune.")
    data: list[str] = Field(default_factory=lambda: ["run:sft"], description="Conversation files (TRL messages "
                                                                             "format); run:sft is export-sft's.")
    learning_rate: float = Field(2e-5, gt=0.0, description="Peak learning rate.")


class RLConfig(TrainingConfig):
    """RL-CAI step 4: the SL-CAI policy against the preference model, by PPO (ours), or RLOO/GRPO (TRL)."""

    algo: Literal["ppo", "rloo", "grpo"] = Field("ppo", description="ppo (ours, the paper's), rloo or grpo (TRL).")
    policy: str = Field("", description="Policy to train; empty: this run's SFT model, else policy.model.")
    reward_model: str = Field("", description="Preference model directory; empty: this run's trained PM.")
    value_model: str = Field("policy", description="ppo: policy (a separate copy of the policy with a value "
                                                   "head), head (a linear head on the policy's own features), "
                                                   "or a model directory.")
    learning_rate: float = Field(1e-5, gt=0.0, description="Policy learning rate.")
    value_learning_rate: float | None = Field(None, gt=0.0, description="Value learning rate; unset: the policy's.")
    total_steps: int = Field(16, ge=1, description="PPO updates (rollout + optimisation): the default is a first "
                                                   "look (about a minute on the demo); real runs want hundreds.")
    batch_size: int = Field(16, ge=1, description="Prompts per rollout.")
    num_mini_batches: int = Field(2, ge=1, description="Minibatches per PPO epoch.")
    ppo_epochs: int = Field(4, ge=1, description="Optimisation epochs per rollout.")
    num_generations: int = Field(4, ge=2, description="rloo/grpo: samples per prompt.")
    max_new_tokens: int = Field(32, ge=1, description="Longest response sampled.")
    temperature: float = Field(1.0, gt=0.0, description="Sampling temperature of rollouts.")
    kl_coef: float = Field(0.05, ge=0.0, description="Per-token KL penalty against the reference (paper's "
                                                     "RLHF: 0.001).")
    kl_target: float | None = Field(None, gt=0.0, description="Adaptive KL controller target (per sequence); "
                                                              "unset: a fixed coefficient.")
    kl_horizon: int = Field(10_000, ge=1, description="Adaptive KL controller horizon.")
    cliprange: float = Field(0.2, gt=0.0, description="Policy ratio clip.")
    cliprange_value: float = Field(0.2, gt=0.0, description="Value clip.")
    vf_coef: float = Field(0.1, ge=0.0, description="Value loss weight.")
    gamma: float = Field(1.0, ge=0.0, le=1.0, description="Discount.")
    lam: float = Field(0.95, ge=0.0, le=1.0, description="GAE lambda.")
    whiten_advantages: bool = Field(True, description="Normalise advantages per rollout.")
    max_grad_norm: float = Field(1.0, ge=0.0, description="Gradient clipping (0: off).")
    missing_eos_penalty: float | None = Field(None, description="Subtracted from the reward of a response "
                                                               "that ends without end-of-sequence.")
    normalize_reward: bool = Field(False, description="Normalise rewards by running mean and std.")
    save_steps: int = Field(20, ge=1, description="Checkpoint every this many updates.")
    reward: Literal["pm", "feedback"] = Field(
        "pm", description="What rewards a response: pm (the trained preference model, the paper's RL-CAI) or "
                          "feedback (direct RLAIF, Lee et al. 2023: the feedback model's own judgement under a "
                          "sampled comparison principle, read from one score_choices pass; no PM is trained).",
        json_schema_extra=ADDED)
    feedback_reward: Literal["rating", "pairwise"] = Field(
        "rating", description="reward feedback: rating (the probability-weighted score over the rating tokens "
                              "1..10) or pairwise (P(response is better than the starting policy's greedy "
                              "response), mapped to [-1, 1]).", json_schema_extra=ADDED)
    # how many iterations there are, not what any one of them writes: raising it extends a run
    iterations: int = Field(1, ge=1, description="Iterated online RL-CAI (Bai et al. 2022a): after each RL phase, "
                                                 "sample new pairs from the current policy, label them, continue "
                                                 "training the PM on the accumulated mix and continue RL from the "
                                                 "last policy; each iteration is its own stages in cai run.",
                            json_schema_extra=RUNTIME)

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float) -> float:
        return _check_temperature(v, greedy_allowed=False)


class DPOConfig(TrainingConfig):
    """The Hugging Face CAI recipe's route: TRL's ``DPOTrainer`` on the AI preference pairs."""

    policy: str = Field("", description="Policy to train; empty: this run's SFT model, else policy.model.")
    data: list[PreferenceSourceConfig] = Field(
        default_factory=lambda: [PreferenceSourceConfig(path="run:preferences")], description="Preference sources.")
    beta: float = Field(0.1, gt=0.0, description="DPO's KL strength.")
    learning_rate: float = Field(5e-7, gt=0.0, description="Peak learning rate.")


class PMEvalConfig(_Base):
    """``cai eval-pm``: a preference model against held-out pairs with known answers."""

    model: str = Field("", description="Preference model directory; empty: this run's trained PM.")
    data: list[PreferenceSourceConfig] = Field(default_factory=list, description="Eval sources; empty: the PM's "
                                                                                "eval_sources or held-out split.")
    n_bins: int = Field(10, ge=1, description="Confidence bins for ECE and the reliability diagram.")


class EloEvalConfig(_Base):
    """``cai eval``: checkpoints compared pairwise on held-out prompts, rated by Elo (the paper's
    harmlessness-versus-helpfulness figure)."""

    models: list[str] = Field(default_factory=lambda: ["run:initial", "run:sft", "run:rl"],
                              description="Checkpoints: directories, hub ids, or run:initial|sft|rl|dpo (this "
                                          "run's; missing ones are left out). The first is the Elo anchor (0).")
    harmless_prompts: PromptSourceConfig = Field(
        default_factory=lambda: PromptSourceConfig(path="embedded:red_team"), description="Red-team prompts.")
    helpful_prompts: PromptSourceConfig = Field(
        default_factory=lambda: PromptSourceConfig(path="embedded:helpful"), description="Helpfulness prompts.")
    limit: int = Field(32, ge=1, description="Prompts per set.")
    judge: str = Field("", description="Who judges every pair: a preference model directory, empty for this "
                                       "run's trained PM, or feedback (the feedback model under sampled "
                                       "comparison principles, as cai label does).")
    generation: GenerationParams = Field(default_factory=lambda: GenerationParams(max_new_tokens=64,
                                                                                  temperature=0.0),
                                         description="How each checkpoint answers (greedy by default).")
    bootstrap: int = Field(200, ge=0, description="Bootstrap resamples for the confidence intervals.")


class ServePMConfig(_Base):
    """``cai serve-pm``: an OpenRLHF-compatible HTTP reward endpoint for a trained PM."""

    model: str = Field("", description="Preference model directory; empty: this run's trained PM.")
    host: str = Field("127.0.0.1", description="Interface to listen on (0.0.0.0 for every interface).")
    port: int = Field(5000, ge=0, le=65535, description="Port; POST /get_reward.")
    max_batch_size: int = Field(64, ge=1, description="Queries scored in one forward pass, gathered from concurrent "
                                                      "requests.")
    max_wait_ms: float = Field(5.0, ge=0.0, le=1000.0, description="Longest wait for a batch to fill before "
                                                                  "scoring what has arrived.")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="Largest request body; larger ones get 413.")
    max_queries: int = Field(1024, ge=1, description="Most queries per request; more get 413 (split the request).")
    max_query_chars: int = Field(65536, ge=16, description="Longest query in characters; longer ones get 413.")
    token_env: str = Field("CAI_PM_TOKEN", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                           description="Environment variable holding the bearer token clients must send "
                                       "(Authorization: Bearer ...); unset variable: no token asked.")
    insecure: bool = Field(False, description="Allow listening beyond loopback without a token.")


class HubConfig(_Base):
    """Uploading what a command made to the Hugging Face Hub (``huggingface_hub.upload_folder``)."""

    push_to_hub: str | None = Field(None, description="Hub repository (user/name) to upload this command's dataset "
                                                      "or model to, with its card; cai export: a prefix, each "
                                                      "artifact going to PREFIX-<artifact>.",
                                    json_schema_extra=RUNTIME)
    private: bool = Field(True, description="Create the repository private.", json_schema_extra=RUNTIME)
    token_env: str = Field("HF_TOKEN", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                           description="Environment variable holding the Hub token (never logged or stored).",
                           json_schema_extra=RUNTIME)


#: What ``cai export`` can write: each a run-layout entry holding a dataset or a model.
ExportArtifact = Literal["sft_data", "preferences", "sft_model", "pm_model", "rl_model"]


class ExportConfig(_Base):
    """``cai export``: the run's datasets and models as Hub-ready folders with dataset and model cards."""

    output: str = Field("", description="Folder to write the artifacts into; empty: OUTPUT_DIR/export.")
    artifacts: list[ExportArtifact] = Field(
        default_factory=list, description="Which artifacts (sft_data, preferences, sft_model, pm_model, rl_model); "
                                          "empty: every one the run has made.")


class RLDataConfig(_Base):
    """``cai rl-data``: this run's prompts as verl's parquet and OpenRLHF's JSONL datasets."""

    val_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="Share of prompts held out for the engines' "
                                                                  "validation files (at least one prompt).")


class RayConfig(_Base):
    """Fan critique, sample-pairs and label out over Ray actors (Ray Data ``map_batches``).

    Each actor loads its own backend; the driver alone writes the record store, so resume and
    exactly-once output work as in a single process. Changes speed only, never what is written.
    """

    workers: int = Field(0, ge=0, description="Backend actors; 0 runs in this process without Ray.")
    address: str | None = Field(None, description="Ray cluster to join: auto, ray://HOST:10001; unset starts a "
                                                  "local Ray.")
    num_gpus_per_worker: float | None = Field(None, ge=0, description="GPUs per actor; unset: 1 when CUDA is "
                                                                       "visible to the driver, else 0.")
    num_cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per actor.")
    batch_size: int = Field(16, ge=1, description="Inputs per map_batches call on one actor.")


class RunConfig(_Base):
    """The whole job. Each stage reads its own section plus the shared fields."""

    output_dir: str = Field("runs/default", description="Where every stage writes its records and models.")
    seed: int = Field(0, description="Seeds principle sampling and generation; same seed, same data.")
    constitution: str = Field("default", description="default, a YAML/JSON file, or anthropic-paper:DIR.")
    policy: ModelConfig = Field(default_factory=ModelConfig, description="The helpful model being aligned.")
    prompts: PromptSourceConfig = Field(default_factory=PromptSourceConfig, description="Red-team prompts.")
    critique: CritiqueConfig = Field(default_factory=CritiqueConfig)
    sft_export: SFTExportConfig = Field(default_factory=SFTExportConfig)
    pairs: PairsConfig = Field(default_factory=PairsConfig)
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig)
    eval_labeler: LabelerEvalConfig = Field(default_factory=LabelerEvalConfig)
    pm: PreferenceModelConfig = Field(default_factory=PreferenceModelConfig)
    eval_pm: PMEvalConfig = Field(default_factory=PMEvalConfig)
    serve_pm: ServePMConfig = Field(default_factory=ServePMConfig)
    eval: EloEvalConfig = Field(default_factory=EloEvalConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    rl: RLConfig = Field(default_factory=RLConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    ray: RayConfig = Field(default_factory=RayConfig, description="Distributed generation (critique, pairs, labels).")
    export: ExportConfig = Field(default_factory=ExportConfig)
    rl_data: RLDataConfig = Field(default_factory=RLDataConfig)
    hub: HubConfig = Field(default_factory=HubConfig, description="Pushing datasets and models to the Hub.")
    iteration: int = Field(1, ge=1, description="The RL-CAI iteration a stage of the RL loop (pairs, labels, PM, "
                                                "RL) works on; cai run sets it for each iteration's stages.")
    resume: bool = Field(True, description="Continue a run found in output_dir.")
    overwrite: bool = Field(False, description="Discard a run found in output_dir and start fresh.")
    progress: bool = Field(True, description="Show progress bars.")
    verbose: bool = Field(False, description="Also show the libraries' own progress bars, warnings and logs on "
                                             "the console (they always go to OUTPUT_DIR/cai.log).")

    @field_validator("output_dir")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v

    # -- YAML ------------------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | Path) -> RunConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found; pass a YAML file (`cai config` prints one)")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not UTF-8 text; save the config as UTF-8 YAML") from None
        return cls.from_dict(load_yaml(text, str(path), ConfigError) or {}, source=str(path))

    @classmethod
    def from_dict(cls, raw: Any, source: str = "config") -> RunConfig:
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a mapping of config fields")
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(source, exc, raw) + "; fix that field or flag") from None

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    def to_commented_yaml(self) -> str:
        """The config as YAML with each field's description as a comment above it: the file
        ``cai config`` writes for a user to start from; it loads back to the same config."""
        return "\n".join(_commented(self, 0)) + "\n"

    def with_overrides(self, overrides: dict[str, Any], source: str = "command line") -> RunConfig:
        """Return a copy with dotted-path overrides (``{"critique.n_rounds": 2}``) applied."""
        data = self.model_dump(mode="json", context={"keep_secrets": True})
        # a section that starts as a copy of another is filled in after that other is overridden
        late = tuple(f"{s}." for s in UNSET_SECTION_DEFAULTS)
        for dotted, value in sorted(overrides.items(), key=lambda kv: kv[0].startswith(late)):
            node = data
            *parents, leaf = dotted.split(".")
            for depth, part in enumerate(parents):
                if not isinstance(node.get(part), dict):  # an unset optional section, switched on here
                    inherited = UNSET_SECTION_DEFAULTS.get(".".join(parents[:depth + 1]))
                    node[part] = dict(data[inherited]) if inherited else {}
                node = node[part]
            node[leaf] = value
        return RunConfig.from_dict(data, source=source)

    def fingerprint_fields(self, sections: tuple[str, ...]) -> dict[str, Any]:
        """The values :meth:`fingerprint` hashes, flattened to dotted paths: kept beside a record
        store so that a refused resume can say which setting changed."""
        out: dict[str, Any] = {}

        def walk(value: Any, path: str) -> None:
            if isinstance(value, dict) and value:
                for key, item in value.items():
                    walk(item, f"{path}.{key}" if path else key)
            else:
                out[path] = value

        walk(self._fingerprinted(sections), "")
        return out

    def _fingerprinted(self, sections: tuple[str, ...]) -> dict[str, Any]:
        data = {k: v for k, v in _without_runtime(self).items() if k in sections}
        data.pop("constitution", None)
        data.get("prompts", {}).pop("limit", None)
        return data

    def fingerprint(self, sections: tuple[str, ...]) -> str:
        """Hash of the fields that change what a stage writes: every field of ``sections`` except
        those marked :data:`RUNTIME` (speed, memory, device), wherever they sit.

        Also left out: ``prompts.limit`` (raising it extends a run instead of changing it) and the
        constitution's location (its content hash is checked on its own, so moving the file is not
        a change).
        """
        blob = json.dumps(self._fingerprinted(sections), sort_keys=True, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


def _without_runtime(model: BaseModel, dumped: dict[str, Any] | None = None) -> dict[str, Any]:
    """``model_dump(mode="json")`` less every field marked :data:`RUNTIME`, at any depth."""
    dumped = model.model_dump(mode="json") if dumped is None else dumped
    out: dict[str, Any] = {}
    for name, info in type(model).model_fields.items():
        extra = info.json_schema_extra
        if isinstance(extra, dict) and extra.get("runtime"):
            continue
        value = getattr(model, name)
        if isinstance(extra, dict) and extra.get("added") and value == info.get_default(call_default_factory=True):
            continue
        out[name] = _without_runtime(value, dumped[name]) if isinstance(value, BaseModel) else dumped[name]
    return out


def _commented(model: BaseModel, indent: int) -> list[str]:
    pad = "  " * indent
    lines: list[str] = []
    dumped = model.model_dump(mode="json")  # what a file may hold (credentials redacted)
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        description = info.description or (type(value).__doc__ or "").strip().split("\n")[0]
        if description:
            lines += [f"{pad}# {line}" for line in _wrap(description, 100 - len(pad))]
        if isinstance(value, BaseModel):
            lines.append(f"{pad}{name}:")
            lines += _commented(value, indent + 1)
        else:
            text = yaml.safe_dump({name: dumped[name]}, sort_keys=False, allow_unicode=True,
                                  default_flow_style=False, width=1000).rstrip("\n").split("\n")
            lines += [pad + line for line in text]
    return lines


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width=max(40, width - 2)) or [""]
