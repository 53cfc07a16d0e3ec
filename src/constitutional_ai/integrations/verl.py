"""verl: a custom reward function that scores each response with our preference model, and our
prompts written as verl's RL dataset.

What verl hands a custom reward function, as read in its source (``docs/cluster-rl.md`` names the
versions and commits):

* The ``naive`` reward manager calls it once per response with keyword arguments,
  ``compute_score(data_source=, solution_str=, ground_truth=, extra_info=)``
  (``verl/workers/reward_manager/naive.py``; on current main the reward loop's
  ``verl/experimental/reward_loop/reward_manager/naive.py``, which may add ``reward_router_address``
  and ``reward_model_tokenizer``, and runs the call on an executor thread). The ``batch`` manager
  calls it once per batch, ``compute_score(data_sources=, solution_strs=, ground_truths=,
  extra_infos=)`` (``verl/workers/reward_manager/batch.py``,
  ``verl/experimental/reward_loop/reward_manager/batch.py``): :func:`compute_score_batch`.
* ``custom_reward_function.reward_kwargs`` are merged into every call as keyword arguments
  (``verl/trainer/ppo/reward.py``, ``get_custom_reward_fn``): that is how ``pm_dir=`` reaches us.
* Either manager takes a float, or a dict with ``"score"``; we return floats, which every version takes.
* ``solution_str`` is the response alone, decoded with ``skip_special_tokens=True``; the prompt is
  not passed. What is passed is the dataset row's ``extra_info`` dict (with keys the manager adds,
  ``num_turns`` and ``rollout_reward_scores``), so :func:`verl_row` puts the prompt conversation
  there, under ``extra_info["messages"]``.
* The dataset is parquet, read by ``RLHFDataset`` (``verl/utils/dataset/rl_dataset.py``) with
  ``datasets.load_dataset("parquet")``: ``prompt`` (chat messages, rendered with the policy's chat
  template), ``data_source`` (``data.reward_fn_key``), ``ability``, ``reward_model: {style,
  ground_truth}`` (the naive manager indexes ``ground_truth``, so it is there, empty) and
  ``extra_info`` (a dict; verl reads ``index`` from it).

verl loads this file by path (``custom_reward_function.path``: executed under a name of verl's,
not always registered in ``sys.modules``) or, on current main, as
``pkg://constitutional_ai.integrations.verl``. So it uses absolute imports only, defines no
dataclass, and imports torch and the PM only when the first response is scored; it never imports
verl. The PM is loaded once per process and kept; verl's reward loop calls from several threads,
so the load and each forward pass hold a lock.
"""

import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from constitutional_ai.common.errors import ConfigError
from constitutional_ai.common.types import Conversation
from constitutional_ai.data.prompts import PromptItem

#: ``data_source`` of our rows: what ``data.reward_fn_key`` reads and verl's metrics are grouped by.
DATA_SOURCE = "constitutional_ai"
ABILITY = "alignment"
#: ``reward_model.style`` of our rows: scored by a model, not a rule; ``ground_truth`` stays empty.
REWARD_STYLE = "model"
#: Where in ``extra_info`` the prompt conversation travels to :func:`compute_score`.
MESSAGES_KEY = "messages"
#: Environment fallbacks for the ``reward_kwargs`` of the same names (set on every node).
PM_DIR_ENV = "CAI_PM_DIR"
DEVICE_ENV = "CAI_PM_DEVICE"
BATCH_SIZE_ENV = "CAI_PM_BATCH_SIZE"
ROLES = ("system", "user", "assistant")

_LOAD_LOCK = threading.Lock()
#: ``(directory, device, batch size, max length) -> (RewardModel, the lock its forward passes hold)``
_LOADED: dict[tuple[str, str, int, int | None], tuple[Any, threading.Lock]] = {}


def _positive_int(value: Any, name: str, env: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1:
        raise ConfigError(f"verl reward: {name}={value!r} is not a positive integer; pass "
                          f"reward_kwargs.{name}=N (or set {env})")
    return number


def pm_settings(pm_dir: str | os.PathLike[str] | None = None, device: str | None = None,
                batch_size: int | str | None = None,
                max_length: int | str | None = None) -> tuple[str, str, int, int | None]:
    """``(PM directory, device, batch size, max length)`` from the ``reward_kwargs`` verl passes,
    else the environment (``CAI_PM_DIR``, ``CAI_PM_DEVICE``, ``CAI_PM_BATCH_SIZE``): one-line
    :class:`ConfigError` when no PM is named or the directory is missing, since a reward worker that
    cannot score should stop the job before the first rollout is wasted."""
    directory = pm_dir if pm_dir not in (None, "") else os.environ.get(PM_DIR_ENV)
    if not directory:
        raise ConfigError(f"verl reward: no preference model named; pass reward_kwargs.pm_dir=DIR "
                          f"(+custom_reward_function.reward_kwargs.pm_dir=DIR on the command line) or set "
                          f"{PM_DIR_ENV}=DIR on every node")
    path = Path(directory).expanduser()
    if not path.is_dir():
        raise ConfigError(f"verl reward: pm_dir={directory}: no such directory on this node; train a PM with "
                          "`cai train-pm` (it writes OUTPUT_DIR/pm/model) and pass a path every node can read")
    size = _positive_int(batch_size if batch_size not in (None, "") else os.environ.get(BATCH_SIZE_ENV),
                         "batch_size", BATCH_SIZE_ENV) or 32
    return (str(path.resolve()), str(device or os.environ.get(DEVICE_ENV) or "auto"), size,
            _positive_int(max_length, "max_length", "reward_kwargs.max_length"))


def load_pm(pm_dir: str | os.PathLike[str] | None = None, device: str | None = None,
            batch_size: int | str | None = None, max_length: int | str | None = None) -> Any:
    """The :class:`~constitutional_ai.preference_model.reward_model.RewardModel` these settings name,
    loaded on first use and kept for the life of the process (verl calls once per response)."""
    return _loaded(pm_settings(pm_dir, device, batch_size, max_length))[0]


def _loaded(settings: tuple[str, str, int, int | None]) -> tuple[Any, threading.Lock]:
    with _LOAD_LOCK:
        if settings not in _LOADED:
            from constitutional_ai.preference_model.reward_model import RewardModel

            directory, device, batch_size, max_length = settings
            model = RewardModel.from_pretrained(directory, device=device, batch_size=batch_size,
                                                max_length=max_length)
            _LOADED[settings] = (model, threading.Lock())
        return _LOADED[settings]


def prompt_of(extra_info: Any, n: int = 0) -> Conversation:
    """The prompt conversation our dataset rows carry in ``extra_info["messages"]``. verl reads
    parquet with ``datasets`` (lists of dicts); older versions read it with pandas (numpy arrays of
    dicts): both are accepted."""
    messages = extra_info.get(MESSAGES_KEY) if isinstance(extra_info, Mapping) else None
    if messages is None or isinstance(messages, (str, bytes)) or not hasattr(messages, "__iter__"):
        raise ConfigError(f"verl reward: extra_info of response {n} has no {MESSAGES_KEY!r} (the prompt "
                          "conversation); write the dataset with `cai rl-data` (OUTPUT_DIR/verl/train.parquet), "
                          "whose rows carry it")
    out: Conversation = []
    for message in messages:
        role = message.get("role") if isinstance(message, Mapping) else None
        content = message.get("content") if isinstance(message, Mapping) else None
        if role not in ROLES or not isinstance(content, str):
            raise ConfigError(f"verl reward: extra_info[{MESSAGES_KEY!r}] of response {n} holds {message!r}; "
                              "expected {role: system|user|assistant, content: text} messages")
        out.append({"role": role, "content": content})
    if not out:
        raise ConfigError(f"verl reward: extra_info[{MESSAGES_KEY!r}] of response {n} is empty")
    return out


def compute_score_batch(data_sources: Sequence[Any], solution_strs: Sequence[str],
                        ground_truths: Sequence[Any] | None = None, extra_infos: Sequence[Any] | None = None,
                        *, pm_dir: str | None = None, device: str | None = None,
                        batch_size: int | str | None = None, max_length: int | str | None = None,
                        **kwargs: Any) -> list[float]:
    """verl's batch reward function (``reward_manager=batch``): the PM's reward for each response to
    the prompt conversation in its row's ``extra_info``, in one batched pass. ``data_sources`` and
    ``ground_truths`` are verl's and unused (a PM needs no ground truth); other keyword arguments
    verl adds (``reward_router_address``...) are ignored."""
    n = len(solution_strs)
    infos = [None] * n if extra_infos is None else list(extra_infos)
    if len(infos) != n:
        raise ConfigError(f"verl reward: {n} responses but {len(infos)} extra_infos")
    prompts = [prompt_of(info, i) for i, info in enumerate(infos)]
    model, lock = _loaded(pm_settings(pm_dir, device, batch_size, max_length))
    with lock:
        rewards = model.score_responses(prompts, [str(s) for s in solution_strs])
    return [float(r) for r in rewards]


def compute_score(data_source: Any, solution_str: str, ground_truth: Any = None, extra_info: Any = None,
                  *, pm_dir: str | None = None, device: str | None = None, batch_size: int | str | None = None,
                  max_length: int | str | None = None, **kwargs: Any) -> float:
    """verl's per-response reward function (the ``naive`` manager, verl's default): the PM's reward
    for ``solution_str`` as the answer to the conversation in ``extra_info["messages"]``."""
    return compute_score_batch([data_source], [solution_str], [ground_truth], [extra_info], pm_dir=pm_dir,
                               device=device, batch_size=batch_size, max_length=max_length)[0]


# -- the dataset -----------------------------------------------------------------------------------
def verl_row(item: PromptItem, split: str, index: int) -> dict[str, Any]:
    """One row of verl's RL dataset for one of our prompts; the conversation is both the ``prompt``
    verl renders for the policy and ``extra_info["messages"]``, what :func:`compute_score` scores against."""
    messages = [{"role": m["role"], "content": m["content"]} for m in item.messages]
    return {"data_source": DATA_SOURCE, "prompt": messages, "ability": ABILITY,
            "reward_model": {"style": REWARD_STYLE, "ground_truth": ""},
            "extra_info": {"split": split, "index": index, "key": item.key, MESSAGES_KEY: messages}}


def write_verl_parquet(items: Sequence[PromptItem], path: str | os.PathLike[str], split: str = "train") -> int:
    """Write ``items`` as verl's parquet at ``path`` (whole, then renamed into place, so a verl job
    never reads half a file); returns the number of rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not items:
        raise ValueError(f"{path}: no prompts to write")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    pq.write_table(pa.Table.from_pylist([verl_row(item, split, n) for n, item in enumerate(items)]), tmp)
    os.replace(tmp, target)
    return len(items)
