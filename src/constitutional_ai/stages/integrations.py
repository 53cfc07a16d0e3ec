"""``cai rl-data``: this run's prompts as the datasets of the RL engines teams move to at cluster
scale, verl's parquet and OpenRLHF's prompt JSONL, each with a held-out share for the engine's own
validation. The reward side is ``cai serve-pm`` (OpenRLHF) and
``constitutional_ai.integrations.verl.compute_score`` (verl); ``docs/cluster-rl.md`` has the
launch commands."""

from __future__ import annotations

import hashlib
import time
from typing import Any

from constitutional_ai.config import RunConfig
from constitutional_ai.layout import RunLayout
from constitutional_ai.stages.registry import Stage, register
from constitutional_ai.stages.runner import StageResult

RL_DATA = "rl_data"


def hold_out(items: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """``(train, held out)``: the held-out prompts are those whose key ranks first under a seeded
    hash, so the split depends on the prompts and the seed, not on their order in the file. A single
    prompt is both (an engine needs a validation file; one prompt cannot be split)."""
    if len(items) < 2:
        return items, items
    rank = sorted(items, key=lambda item: hashlib.sha256(f"{seed}:{item.key}".encode()).hexdigest())
    held = {item.key for item in rank[:max(1, round(fraction * len(items)))]}
    return [i for i in items if i.key not in held], [i for i in items if i.key in held]


def run_rl_data(config: RunConfig) -> StageResult:
    """Write the prompts (``--prompts``) for verl and OpenRLHF under OUTPUT_DIR/verl and OUTPUT_DIR/openrlhf."""
    from constitutional_ai.data.prompts import load_prompts
    from constitutional_ai.integrations.openrlhf import write_openrlhf_jsonl
    from constitutional_ai.integrations.verl import write_verl_parquet

    start = time.perf_counter()
    layout = RunLayout.of(config)
    items, report = load_prompts(config.prompts)
    train, val = hold_out(items, config.rl_data.val_fraction, config.seed)
    paths = {name: layout.path(name) for name in ("verl_data", "verl_val_data", "openrlhf_data",
                                                   "openrlhf_eval_data")}
    write_verl_parquet(train, paths["verl_data"], "train")
    write_verl_parquet(val, paths["verl_val_data"], "val")
    write_openrlhf_jsonl(train, paths["openrlhf_data"])
    write_openrlhf_jsonl(val, paths["openrlhf_eval_data"])
    return StageResult(RL_DATA, paths["verl_data"], written=len(train), total=len(items),
                       seconds=time.perf_counter() - start, prompt_report=report.as_dict(),
                       extra={"held_out": len(val), **{name: str(path) for name, path in paths.items()}})


register(Stage(
    name=RL_DATA, command="rl-data", run=run_rl_data, sections=("seed", "prompts", "rl_data"), pipeline=False,
    inputs=("prompts.path",), produces=("verl_data", "verl_val_data", "openrlhf_data", "openrlhf_eval_data"),
    help="Write the prompts as verl's parquet and OpenRLHF's JSONL (RL at cluster scale; docs/cluster-rl.md).",
    summary=lambda r: {"train prompts": r.written, "held-out prompts": r.extra["held_out"],
                       **{k: v for k, v in r.extra.items() if k != "held_out"}},
    produced=lambda r: f"{r.written} prompts (+{r.extra['held_out']} held out)",
))
