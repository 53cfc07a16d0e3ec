"""Distributed training: the shipped ``accelerate launch`` configs, and the training stages run by
``accelerate launch`` with two CPU processes (DDP over gloo), where only rank 0 writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

from conftest import write_sft_data
from constitutional_ai.common.errors import ConfigError
from constitutional_ai.config import RunConfig
from constitutional_ai.data.store import read_records
from servers import free_port

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"


# -- the shipped configs --------------------------------------------------------------------------------
def _launch_args(name: str):
    """What ``accelerate launch --config_file NAME.yaml`` makes of the file (before it starts anything)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / f"{name}.yaml"), "train.py"])
    return _validate_launch_command(args)


def test_the_shipped_accelerate_configs_load_and_say_what_the_docs_promise():
    from accelerate.commands.launch import launch_command_parser

    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == ["ddp.yaml", "fsdp.yaml", "zero2.yaml", "zero3.yaml"]
    options = {action.dest for action in launch_command_parser()._actions}
    expected = {"ddp": DistributedType.MULTI_GPU, "fsdp": DistributedType.FSDP, "zero2": DistributedType.DEEPSPEED,
                "zero3": DistributedType.DEEPSPEED}
    for name, kind in expected.items():
        config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))  # unknown top-level keys raise here
        assert config.distributed_type == kind, name
        assert (config.mixed_precision, config.num_processes, config.num_machines, config.machine_rank) == \
            ("bf16", 8, 1, 0), name
        assert not config.use_cpu and config.compute_environment.value == "LOCAL_MACHINE"
        # nested keys are launcher options: a misspelt one would be ignored silently, so check them here
        for key in [*config.fsdp_config, *config.deepspeed_config]:
            assert key in options, f"{name}.yaml: {key} is not an accelerate launch option"
    fsdp = load_config_from_file(str(CONFIGS / "fsdp.yaml")).fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_reshard_after_forward"] is True
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP" and fsdp["fsdp_cpu_ram_efficient_loading"]
    assert fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    zero2 = load_config_from_file(str(CONFIGS / "zero2.yaml")).deepspeed_config
    zero3 = load_config_from_file(str(CONFIGS / "zero3.yaml")).deepspeed_config
    assert zero2["zero_stage"] == 2 and not zero2["zero3_init_flag"]
    assert zero3["zero_stage"] == 3 and zero3["zero3_init_flag"] and zero3["zero3_save_16bit_model"]
    # batch size, accumulation and clipping are left to the stage's config (DeepSpeed "auto"): a
    # fixed value here would clash with TrainingArguments as soon as a run changed its own
    for ds in (zero2, zero3):
        assert not {"gradient_accumulation_steps", "gradient_clipping"} & set(ds)


def test_the_fsdp_and_deepspeed_configs_become_the_plugins_they_describe(monkeypatch):
    """What each process builds from the launcher's environment (no GPU, no DeepSpeed needed)."""
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    from constitutional_ai.training.common import sharded_launch

    def environment(m: pytest.MonkeyPatch, env: dict[str, str]) -> None:
        for key, value in env.items():
            if key.startswith(("ACCELERATE_", "FSDP_")):
                m.setenv(key, value)

    args, _, _ = _launch_args("fsdp")
    args.main_process_port = 0  # any free port: the check must not depend on 29500 being free
    with monkeypatch.context() as m:  # nothing is launched: the environment the launcher would set
        environment(m, prepare_multi_gpu_env(args))
        plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
        assert plugin.cpu_ram_efficient_loading and plugin.auto_wrap_policy is not None
        assert "SHARDED_STATE_DICT" in str(plugin.state_dict_type)
        assert sharded_launch() == "FSDP"
    for name, stage in (("zero2", 2), ("zero3", 3)):
        args, defaults, from_config = _launch_args(name)
        args.main_process_port = 0
        args.deepspeed_fields_from_accelerate_config = ",".join(
            [*defaults.deepspeed_config, *(["mixed_precision"] if from_config else [])])
        with monkeypatch.context() as m:
            environment(m, prepare_deepspeed_cmd_env(args)[1])
            ds = DeepSpeedPlugin().deepspeed_config
            assert ds["zero_optimization"]["stage"] == stage
            assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is (stage == 3)
            assert ds["gradient_accumulation_steps"] == ds["train_micro_batch_size_per_gpu"] == "auto"
            assert sharded_launch() == (None if stage == 2 else "DeepSpeed ZeRO-3")


def test_what_cannot_run_sharded_is_refused_before_training(monkeypatch):
    from constitutional_ai.rl.ppo import _check_data_parallel
    from constitutional_ai.training.common import peft_config

    lora = RunConfig().with_overrides({"sft.lora": {"r": 4}}).sft
    assert peft_config(lora, "CAUSAL_LM") is not None
    for env in ({"ACCELERATE_USE_FSDP": "true"},
                {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}):
        with monkeypatch.context() as m:
            for key, value in env.items():
                m.setenv(key, value)
            with pytest.raises(ConfigError, match=r"ddp\.yaml or zero2\.yaml"):
                peft_config(lora, "CAUSAL_LM")

    class Launched:  # what PPOTrainer reads of its Accelerator
        def __init__(self, kind: DistributedType):
            self.distributed_type = kind

    for kind in (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU):
        _check_data_parallel(Launched(kind))
    for kind in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        with pytest.raises(ConfigError, match="--algo grpo"):
            _check_data_parallel(Launched(kind))


# -- two CPU processes ----------------------------------------------------------------------------------
def _launch(cwd: Path, *cai: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """``accelerate launch`` of the ``cai`` CLI with the shipped DDP config, on two CPU processes."""
    return _launch_program(cwd, cai[0], ["-m", "constitutional_ai", *cai, "--no-progress"], timeout)


def _launch_program(cwd: Path, name: str, program: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    """``accelerate launch`` of a script or module with the shipped DDP config, on two CPU processes."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "ddp.yaml"),
               "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port()), *program]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group: a timeout ends every rank
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"accelerate launch {name} timed out:\n{out[-4000:]}")
    assert proc.returncode == 0, f"accelerate launch {name} failed:\n{out[-4000:]}"
    return subprocess.CompletedProcess(command, proc.returncode, out)


def _steps_once(records: Path) -> list[int]:
    """The logged training steps, each of which must appear exactly once."""
    rows = list(read_records(records))
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)), f"duplicated lines in {records}"
    assert records.read_text().count("\n") == len(rows)
    return [r["step"] for r in rows if r["key"].startswith(("train-", "step-"))]


@pytest.mark.slow
def test_sft_under_accelerate_launch_on_two_processes(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    data = tmp_path / "sft.jsonl"
    write_sft_data(data, 32)
    out = tmp_path / "run"
    _launch(tmp_path, "sft", "-o", str(out), "--sft-model", str(tiny_model_dir), "--sft-data", str(data),
            "--sft-device", "cpu", "--sft-train-batch-size", "4", "--sft-logging-steps", "1", "--sft-lr", "1e-3")
    info = json.loads((out / "sft" / "model" / "sft_info.json").read_text())
    # 32 examples, 4 per process per step, 2 processes: 4 steps (one process alone would take 8)
    assert info["world_size"] == 2 and info["global_step"] == 4
    assert _steps_once(out / "sft" / "trainer" / "records.jsonl") == [1, 2, 3, 4]  # rank 0 alone logged
    manifest = json.loads((out / "sft" / "trainer" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["world_size"] == 2
    trained = AutoModelForCausalLM.from_pretrained(out / "sft" / "model")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert any((a != b).any() for a, b in zip(trained.parameters(), base.parameters(), strict=True))


@pytest.mark.slow
def test_train_pm_then_our_ppo_under_accelerate_launch_on_two_processes(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    rows = [{"prompt": f"Help with task {i}?", "chosen": f"yes banana {i}", "rejected": f"yes {i}"} for i in range(40)]
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    _launch(tmp_path, "train-pm", "-o", str(out), "--pm-model", str(tiny_model_dir), "--pm-data",
            f"{data},limit=32", "--pm-eval-data", f"{data},offset=32", "--max-length", "32", "--epochs", "1",
            "--pm-batch-size", "4", "--logging-steps", "1", "--pm-device", "cpu")
    info = json.loads((out / "pm" / "model" / "pm_info.json").read_text())
    assert info["world_size"] == 2 and info["global_step"] == 4  # 32 pairs, 4 per process per step
    assert _steps_once(out / "pm" / "records.jsonl") == [1, 2, 3, 4]
    assert json.loads((out / "pm" / "model" / "eval_results.json").read_text())["pairs"] == 8

    _launch(tmp_path, "ppo", "-o", str(out), "--policy", str(tiny_model_dir), "--value-model", "head",
            "--total-steps", "3", "--rollout-batch-size", "4", "--num-mini-batches", "2", "--ppo-epochs", "1",
            "--rl-max-new-tokens", "8", "--rl-device", "cpu", "--kl-target", "1.0", "--limit", "16")
    records = out / "rl" / "records.jsonl"
    assert _steps_once(records) == [1, 2, 3]
    logged = list(read_records(records))
    assert logged[-1]["kl_coef"] != logged[0]["kl_coef"]  # the controller ran on the whole batch's KL
    manifest = json.loads((out / "rl" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["world_size"] == 2 and manifest["steps"] == 3
    AutoModelForCausalLM.from_pretrained(out / "rl" / "model")
    assert [p.name for p in (out / "rl" / "checkpoints").iterdir()] == ["step-3"]  # the last, renamed once complete
    assert sorted(p.name for p in (out / "rl" / "checkpoints" / "step-3").iterdir()) == [
        "model.safetensors", "optimizer.bin", "random_states_0.pkl", "random_states_1.pkl", "trainer_state.json"]


RESUME_PPO = """
import json, sys
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, AutoTokenizer

from constitutional_ai.config import RLConfig
from constitutional_ai.rl.ppo import PPOTrainer

model_dir, out = sys.argv[1], Path(sys.argv[2])


def trainer(total_steps):  # each with its own Accelerator: one checkpoint, one model, one optimizer
    config = RLConfig(batch_size=2, num_mini_batches=1, ppo_epochs=1, max_new_tokens=4, kl_target=1.0,
                      total_steps=total_steps, save_steps=2)
    prompts = [[{"role": "user", "content": f"Question {i}?"}] for i in range(8)]
    return PPOTrainer(config, AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir),
                      lambda p, r: [len(x) / 10 for x in r], prompts, out, accelerator=Accelerator(cpu=True))


first = trainer(2)
first.train(progress=False)
rng = torch.get_rng_state()
second = trainer(3)
assert second.resume().name == "step-2" and second.state_dict() == first.state_dict()
assert torch.equal(torch.get_rng_state(), rng)  # this process's random_states_<rank>.pkl
saved, loaded = first.optimizer.state_dict()["state"], second.optimizer.state_dict()["state"]
assert all(torch.equal(saved[i]["exp_avg"], loaded[i]["exp_avg"]) for i in saved)
assert [m["step"] for m in second.train(progress=False)] == [3]
(out / f"rank-{second.accelerator.process_index}.json").write_text(json.dumps(second.state_dict()))
"""


@pytest.mark.slow
def test_our_ppo_resumes_its_checkpoint_on_two_processes(tmp_path, tiny_model_dir):
    """Every process reads the same weights, optimizer and numbers back, and its own random generators."""
    script = tmp_path / "resume_ppo.py"
    script.write_text(RESUME_PPO)
    _launch_program(tmp_path, script.name, [str(script), str(tiny_model_dir), str(tmp_path / "run")])
    ranks = [json.loads((tmp_path / "run" / f"rank-{i}.json").read_text()) for i in (0, 1)]
    assert ranks[0] == ranks[1] and ranks[0]["global_step"] == 3  # the same KL coefficient and statistics
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-2", "step-3"]
