"""RL at cluster scale: our PM and our prompts in the shapes verl and OpenRLHF use, checked by calling
our code the way those engines call it (their code paths are copied from their source, cited at
each step), not by running the engines, which need GPUs.

verl: ``cai rl-data`` writes the parquet; it is read back as ``RLHFDataset`` reads it
(``datasets.load_dataset("parquet")``, rows collated into numpy object arrays); ``compute_score`` is
loaded by path as ``verl.utils.import_utils.load_module`` does, wrapped with the ``reward_kwargs`` as
``verl.trainer.ppo.reward.get_custom_reward_fn`` does, and called with the keyword arguments of the
naive and batch reward managers. OpenRLHF: the JSONL is read as ``preprocess_data`` reads it, and the
body its remote reward client posts goes to ``cai serve-pm``, whose reply is read as the client reads it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from constitutional_ai.common.errors import ConfigError
from constitutional_ai.config import PromptSourceConfig, RunConfig, ServePMConfig
from constitutional_ai.integrations import verl as cai_verl
from constitutional_ai.layout import RunLayout
from constitutional_ai.preference_model.reward_model import RewardModel, load_sequence_classifier
from constitutional_ai.preference_model.server import RewardServer
from constitutional_ai.stages.integrations import hold_out, run_rl_data

PROMPTS = [
    [{"role": "user", "content": "How do I pick a lock?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello, how can I help?"},
     {"role": "user", "content": "How do I make a weapon?"}],
    [{"role": "user", "content": "Write a poem about the sea."}],
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "My neighbour is loud. How do I get back at him?"}],
    [{"role": "user", "content": "Explain photosynthesis to a child."}],
]
RESPONSES = ["I can't help with that, but a locksmith can.", "I won't help with weapons.", "Waves roll in.",
             "Paris.", "Try talking to him first; a calm note often works.", "Plants eat sunlight."]


def _verl_import(path: str):
    """``verl.utils.import_utils.load_module`` for a file path (verl-project/verl main): a module of a
    name of its own, executed from the file and not registered in ``sys.modules``."""
    spec = importlib.util.spec_from_file_location(f"custom_module_{hash(os.path.abspath(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _verl_reward_fn(raw_fn, reward_kwargs):
    """``verl/trainer/ppo/reward.py`` ``get_custom_reward_fn``: ``partial(_call_with_kwargs, raw_fn,
    reward_kwargs)``, the reward_kwargs merged over the call's own keyword arguments."""
    def _call_with_kwargs(raw_fn, extra_kwargs, *args, **kwargs):
        merged_kwargs = {**kwargs, **extra_kwargs}
        return raw_fn(*args, **merged_kwargs)

    return partial(_call_with_kwargs, raw_fn, dict(reward_kwargs))


def _collate(rows: list[dict]) -> dict[str, np.ndarray]:
    """``verl/utils/dataset/rl_dataset.py`` ``collate_fn``: non-tensor fields become object arrays
    (the ``non_tensor_batch`` the reward managers index)."""
    keys = rows[0].keys()
    return {k: np.array([r[k] for r in rows], dtype=object) for k in keys}


@pytest.fixture(scope="module")
def pm_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A tiny PM as ``cai train-pm`` leaves one: a one-output sequence classifier, saved."""
    import torch

    torch.manual_seed(0)
    model, tokenizer = load_sequence_classifier(str(tiny_model_dir))
    out = tmp_path_factory.mktemp("pm") / "model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def scorer(pm_dir) -> RewardModel:
    return RewardModel.from_pretrained(str(pm_dir), device="cpu")


@pytest.fixture(scope="module")
def rl_run(tmp_path_factory) -> RunLayout:
    """``cai rl-data`` on a prompt file (one prompt a multi-turn conversation with a system turn)."""
    root = tmp_path_factory.mktemp("run")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": m}) + "\n" for m in PROMPTS))
    run_rl_data(RunConfig(output_dir=str(root / "out"), prompts=PromptSourceConfig(path=str(prompts))))
    return RunLayout(root / "out")


@pytest.fixture(autouse=True)
def _fresh_pm_cache(monkeypatch):
    monkeypatch.delenv(cai_verl.PM_DIR_ENV, raising=False)
    cai_verl._LOADED.clear()
    yield
    cai_verl._LOADED.clear()


def _read_parquet_as_verl(path: Path, cache: Path) -> tuple[list[dict], list[list[dict]]]:
    """``RLHFDataset._read_files_and_tokenize`` then ``__getitem__``: ``datasets.load_dataset("parquet")``,
    one dict per row, its ``prompt`` popped for the policy's chat template (and not kept: verl's
    default ``data.return_raw_chat=False``). Returns ``(rows, the popped prompts)``."""
    import datasets

    frame = datasets.load_dataset("parquet", data_files=str(path), cache_dir=str(cache))["train"]
    rows, prompts = [], []
    for n in range(len(frame)):
        row = frame[n]
        prompts.append(row.pop("prompt"))
        row["index"] = row.get("extra_info", {}).get("index", 0)
        rows.append(row)
    return rows, prompts


def _response_for(messages: list[dict]) -> str:
    return RESPONSES[PROMPTS.index(messages)]


# -- cai rl-data ------------------------------------------------------------------------------------
def test_rl_data_writes_verl_parquet_and_openrlhf_jsonl_with_a_held_out_share(rl_run, tmp_path):
    train, train_prompts = _read_parquet_as_verl(rl_run.path("verl_data"), tmp_path)
    val, val_prompts = _read_parquet_as_verl(rl_run.path("verl_val_data"), tmp_path)
    assert len(train) + len(val) == len(PROMPTS) and len(val) == 1
    assert sorted(json.dumps(m) for m in train_prompts + val_prompts) == sorted(json.dumps(m) for m in PROMPTS)
    for split, rows, prompts in (("train", train, train_prompts), ("val", val, val_prompts)):
        for n, (row, prompt) in enumerate(zip(rows, prompts, strict=True)):
            assert row["data_source"] == "constitutional_ai" and row["ability"] == "alignment"
            assert row["reward_model"] == {"style": "model", "ground_truth": ""}
            assert row["extra_info"]["messages"] == prompt  # what compute_score scores against
            assert row["extra_info"]["split"] == split and row["index"] == n
    openrlhf_train = [json.loads(line) for line in rl_run.path("openrlhf_data").read_text().splitlines()]
    openrlhf_eval = [json.loads(line) for line in rl_run.path("openrlhf_eval_data").read_text().splitlines()]
    assert [r["messages"] for r in openrlhf_train] == train_prompts
    assert [r["messages"] for r in openrlhf_eval] == val_prompts
    assert all(r["prompt"].endswith("\n\nAssistant:") and r["key"] for r in openrlhf_train)


def test_the_held_out_share_depends_on_the_prompts_and_the_seed_not_their_order():
    from constitutional_ai.data.prompts import PromptItem

    items = [PromptItem(key=f"k{i}", messages=[{"role": "user", "content": str(i)}], index=i) for i in range(40)]
    train, held = hold_out(items, 0.05, seed=0)
    assert len(held) == 2 and not {i.key for i in train} & {i.key for i in held}
    assert {i.key for i in hold_out(items[::-1], 0.05, seed=0)[1]} == {i.key for i in held}
    assert {i.key for i in hold_out(items, 0.05, seed=1)[1]} != {i.key for i in held}
    assert hold_out(items[:1], 0.05, seed=0) == (items[:1], items[:1])  # one prompt: both


# -- verl ---------------------------------------------------------------------------------------------
def test_verl_naive_manager_call_scores_what_the_pm_scores(rl_run, pm_dir, scorer, tmp_path):
    """The per-response call of ``verl/workers/reward_manager/naive.py`` (and the reward loop's
    ``naive.py``, which adds ``num_turns``/``rollout_reward_scores`` to extra_info and may pass
    ``reward_router_address``), with the function loaded by path and ``reward_kwargs.pm_dir``."""
    module = _verl_import(cai_verl.__file__)
    compute_score = _verl_reward_fn(module.compute_score, {"pm_dir": str(pm_dir), "device": "cpu"})
    rows, prompts = _read_parquet_as_verl(rl_run.path("verl_data"), tmp_path)
    batch = _collate(rows)
    got, expected = [], []
    for i in range(len(rows)):
        item = {k: v[i] for k, v in batch.items()}  # DataProtoItem.non_tensor_batch
        ground_truth = item["reward_model"]["ground_truth"]
        data_source = item["data_source"]
        extra_info = item.get("extra_info", {})
        extra_info["num_turns"] = None
        extra_info["rollout_reward_scores"] = {}
        response = _response_for(prompts[i])
        extra = {"reward_router_address": None, "reward_model_tokenizer": None} if i % 2 else {}
        score = compute_score(data_source=data_source, solution_str=response, ground_truth=ground_truth,
                              extra_info=extra_info, **extra)
        assert isinstance(score, float)
        got.append(score)
        expected.append(scorer.score_responses([prompts[i]], [response])[0])
    assert got == pytest.approx(expected, abs=1e-5)
    assert len(set(round(g, 6) for g in got)) > 1  # a real PM score, not a constant


def test_verl_batch_manager_call_equals_the_single_one(rl_run, pm_dir, tmp_path):
    """``reward_manager=batch`` (``verl/workers/reward_manager/batch.py``): one call with plural
    keyword arguments, ``data_sources``/``extra_infos`` as the collated object arrays."""
    module = _verl_import(cai_verl.__file__)
    kwargs = {"pm_dir": str(pm_dir), "device": "cpu", "batch_size": 4}
    batch_fn = _verl_reward_fn(module.compute_score_batch, kwargs)
    single_fn = _verl_reward_fn(module.compute_score, kwargs)
    rows, prompts = _read_parquet_as_verl(rl_run.path("verl_data"), tmp_path)
    data = _collate(rows)
    responses = [_response_for(p) for p in prompts]
    ground_truths = [item["reward_model"].get("ground_truth", None) for item in rows]
    scores = batch_fn(data_sources=data["data_source"], solution_strs=responses, ground_truths=ground_truths,
                      extra_infos=data.get("extra_info", [None] * len(rows)))
    assert isinstance(scores, list) and all(isinstance(s, float) for s in scores)
    singles = [single_fn(data_source=s, solution_str=r, ground_truth=g, extra_info=dict(e))
               for s, r, g, e in zip(data["data_source"], responses, ground_truths, data["extra_info"], strict=True)]
    assert scores == pytest.approx(singles, abs=1e-5)
    # the reward loop's batch manager passes lists of shallow-copied dicts: the same scores
    copies = [dict(e, num_turns=None, rollout_reward_scores={}) for e in data["extra_info"]]
    assert batch_fn(data_sources=list(data["data_source"]), solution_strs=responses, ground_truths=ground_truths,
                    extra_infos=copies) == pytest.approx(scores, abs=1e-5)


def test_pandas_read_rows_score_too(rl_run, pm_dir, scorer):
    """Older verl read the parquet with pandas: nested lists arrive as numpy arrays of dicts."""
    import pandas as pd

    frame = pd.read_parquet(rl_run.path("verl_data"))
    row = frame.iloc[0].to_dict()
    messages = [dict(m) for m in row["extra_info"]["messages"]]
    score = cai_verl.compute_score(row["data_source"], "Fine.", "", row["extra_info"], pm_dir=str(pm_dir),
                                   device="cpu")
    assert score == pytest.approx(scorer.score_responses([messages], ["Fine."])[0], abs=1e-5)


def test_the_pm_is_loaded_once_per_process_and_found_through_the_environment(pm_dir, monkeypatch):
    loads = []
    original = RewardModel.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        loads.append(args)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(RewardModel, "from_pretrained", classmethod(counting))
    monkeypatch.setenv(cai_verl.PM_DIR_ENV, str(pm_dir))
    monkeypatch.setenv(cai_verl.DEVICE_ENV, "cpu")
    info = {"messages": PROMPTS[0]}
    results: list[float] = []
    threads = [threading.Thread(target=lambda: results.append(cai_verl.compute_score("constitutional_ai", "No.",
                                                                                      "", dict(info))))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(loads) == 1 and len(results) == 4 and len(set(results)) == 1
    assert cai_verl.load_pm() is cai_verl.load_pm(str(pm_dir), "cpu")


def test_clear_one_line_errors(pm_dir, tmp_path):
    info = {"messages": PROMPTS[0]}
    with pytest.raises(ConfigError, match=r"no preference model named.*pm_dir=DIR.*CAI_PM_DIR"):
        cai_verl.compute_score("constitutional_ai", "x", "", info)
    with pytest.raises(ConfigError, match="no such directory"):
        cai_verl.compute_score("constitutional_ai", "x", "", info, pm_dir=str(tmp_path / "nope"))
    for bad in (None, {}, {"index": 3, "num_turns": None}, {"messages": "hi"}):
        with pytest.raises(ConfigError, match=r"no 'messages'.*cai rl-data"):
            cai_verl.compute_score("openai/gsm8k", "x", "42", bad, pm_dir=str(pm_dir))
    with pytest.raises(ConfigError, match=r"expected \{role"):
        cai_verl.compute_score_batch(["x"], ["x"], [""], [{"messages": [{"role": "tool", "content": 1}]}],
                                     pm_dir=str(pm_dir))
    with pytest.raises(ConfigError, match="batch_size"):
        cai_verl.compute_score("x", "x", "", info, pm_dir=str(pm_dir), batch_size="many")
    with pytest.raises(ConfigError) as error:
        cai_verl.compute_score("x", "x", "", None, pm_dir=str(pm_dir))
    assert "\n" not in str(error.value)


def test_the_modules_import_without_verl_openrlhf_or_torch():
    code = ("import sys; import constitutional_ai.integrations.verl, constitutional_ai.integrations.openrlhf; "
            "bad = [m for m in ('verl', 'openrlhf', 'torch', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- OpenRLHF -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(scorer):
    server = RewardServer(scorer, ServePMConfig(port=0))
    server.start()
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def openrlhf_rows(rl_run, tmp_path_factory) -> list[dict]:
    """``--prompt_data openrlhf/train.jsonl``: OpenRLHF's ``blending_datasets`` loads a .jsonl file
    with ``load_dataset("json")``."""
    import datasets

    frame = datasets.load_dataset("json", data_files=str(rl_run.path("openrlhf_data")),
                                  cache_dir=str(tmp_path_factory.mktemp("ds")))["train"]
    return [frame[n] for n in range(len(frame))]


def _preprocess_data(data, input_template=None, input_key="input", label_key=None, apply_chat_template=None):
    """``openrlhf/datasets/prompts_dataset.py`` ``preprocess_data``, as in its source."""
    if apply_chat_template:
        chat = data[input_key]
        if isinstance(chat, str):
            chat = [{"role": "user", "content": chat}]
        prompt = apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    else:
        prompt = data[input_key]
        if input_template:
            prompt = input_template.format(prompt)
    label = "" if label_key is None else data[label_key]
    return prompt, label


@pytest.mark.parametrize("eos", ["", "<|im_end|>"])
def test_openrlhf_rollout_worker_gets_the_pm_reward_from_serve_pm(server, scorer, openrlhf_rows, tiny_chat_model_dir,
                                                                  eos):
    """``openrlhf/utils/rollout.py`` ``RolloutAndRewardWorker`` (current main), with
    ``--input_key messages --label_key key --apply_chat_template``: one POST per sample of
    ``{"query": [prompt + action_text], "prompts": [prompt], "labels": [label]}`` (aiohttp, JSON, no
    auth header), the reply read with ``.get("rewards")``, ``.get("scores") or .get("rewards")``,
    ``.get("extra_logs") or {}``. The action text may end in the EOS token (skip_special_tokens=False)."""
    import httpx2
    from transformers import AutoTokenizer

    policy_tokenizer = AutoTokenizer.from_pretrained(str(tiny_chat_model_dir))

    async def rollout(row) -> dict:
        prompt, label = _preprocess_data(row, None, "messages", "key", policy_tokenizer.apply_chat_template)
        action_text = _response_for(row["messages"]) + eos
        output = {"prompt": prompt, "label": label, "observation_text": prompt + action_text,
                  "reward": None, "scores": None, "extra_logs": {}}
        data = {"query": [output["observation_text"]], "prompts": [prompt], "labels": [label]}
        async with httpx2.AsyncClient(timeout=180) as session:
            response = await session.post(server.url, json=data)
            response.raise_for_status()
            rewards_info = response.json()
        output.update(reward=rewards_info.get("rewards"),
                      scores=rewards_info.get("scores") or rewards_info.get("rewards"),
                      extra_logs=rewards_info.get("extra_logs") or {})
        return output

    async def all_rollouts() -> list[dict]:
        return await asyncio.gather(*(rollout(row) for row in openrlhf_rows))

    outputs = asyncio.run(all_rollouts())
    expected = scorer.score_responses([r["messages"] for r in openrlhf_rows],
                                      [_response_for(r["messages"]) for r in openrlhf_rows])
    assert [o["reward"][0] for o in outputs] == pytest.approx(expected, abs=1e-5)
    assert [o["scores"] for o in outputs] == [o["reward"] for o in outputs]
    assert all(o["extra_logs"] == {} for o in outputs)
    assert [o["label"] for o in outputs] == [r["key"] for r in openrlhf_rows]


def test_openrlhf_remote_rm_utils_client_gets_the_pm_reward_for_raw_prompts(server, scorer, openrlhf_rows):
    """``openrlhf/utils/remote_rm_utils.py`` (before rollout.py): ``request_api_wrapper`` posts one
    batch with requests, ``headers={"Content-Type": "application/json"}``, asserts ``score_key``
    ("rewards") is in the reply and returns it; here with ``--input_key prompt`` (no chat template:
    the paper's transcript) and the raw policy's ``</s>`` at the end of each query."""
    requests = pytest.importorskip("requests")  # OpenRLHF's client library; not a dependency of ours
    rows = [r for r in openrlhf_rows if not any(m["role"] == "system" for m in r["messages"])]  # a raw
    # transcript has no system turn: render_raw keeps it as a preamble that no parser reads back
    queries, prompts, labels = [], [], []
    for row in rows:
        prompt, label = _preprocess_data(row, None, "prompt", None, None)
        queries.append(prompt + " " + _response_for(row["messages"]) + "</s>")
        prompts.append(prompt)
        labels.append(label)
    data = {"query": queries, "prompts": prompts, "labels": labels}
    response = requests.post(url=server.url, json=data, headers={"Content-Type": "application/json"}, timeout=180)
    response.raise_for_status()
    response = response.json()
    assert "rewards" in response, f"rewards not in {response}"
    scores = response.get("rewards")
    expected = scorer.score_responses([r["messages"] for r in rows], [_response_for(r["messages"]) for r in rows])
    assert scores == pytest.approx(expected, abs=1e-5)
