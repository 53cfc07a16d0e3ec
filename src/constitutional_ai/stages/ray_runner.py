"""Fan a generation stage (critique, sample-pairs, label) out over Ray: Ray Data ``map_batches``
over an actor pool, one backend per actor (one per GPU, or CPU workers).

Ray does the scheduling, placement and retries of failed tasks; we do not. The driver keeps the one
thing that makes a run resumable: it alone writes the record store, batch by batch as results
stream back, so a killed run resumes exactly as a single-process one does, and the records are the
same whichever way they were made (every sample's seed depends on its input alone). Output order
is kept, so the file is the same too.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from constitutional_ai.common.errors import ConfigError, first_line
from constitutional_ai.common.progress import StageProgress
from constitutional_ai.config import RayConfig
from constitutional_ai.data.store import RecordStore
from constitutional_ai.stages.streaming import Processor, Skip, Streamed, pending, write_outputs

T = TypeVar("T")


class StageActor:
    """A Ray Data actor: loads its backend once (``make_processor``), then processes batches."""

    def __init__(self, make_processor: Callable[[], Processor], cpus: float):
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        import torch

        torch.set_num_threads(max(1, int(cpus)))  # no oversubscription when actors share a node's cores
        self.process = make_processor()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        items = [pickle.loads(b) for b in batch["item"]]
        outputs = self.process(items, lambda *_: None)
        encoded = [json.dumps({"__skip__": [o.reason, o.detail]}) if isinstance(o, Skip) else json.dumps(o)
                   for o in outputs]
        return {"out": np.array(encoded, dtype=object)}


def _decode(text: str) -> dict[str, Any] | Skip | None:
    value = json.loads(text)
    if isinstance(value, dict) and "__skip__" in value:
        return Skip(*value["__skip__"])
    return value


def init_ray(config: RayConfig) -> Any:
    """Join ``config.address`` (a cluster) or start a local Ray, once per process."""
    try:
        import ray
    except ImportError:
        raise ConfigError("ray.workers > 0 needs Ray: pip install 'constitutional-ai[ray]'") from None
    if not ray.is_initialized():
        try:
            ray.init(address=config.address, ignore_reinit_error=True, include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ConfigError(f"ray.address={config.address!r}: cannot join the Ray cluster ({first_line(exc)}); "
                              "check the address (auto, ray://HOST:10001) or leave it unset for a local Ray") from None
    return ray


def stream_batches_ray(store: RecordStore, items: Sequence[T], key: Callable[[T], str],
                       make_processor: Callable[[], Processor], config: RayConfig, description: str, unit: str,
                       progress: bool) -> Streamed:
    """As :func:`~constitutional_ai.stages.streaming.stream_batches`, over ``config.workers`` Ray actors."""
    todo, done_before = pending(store, items, key)
    written, skipped = 0, []
    if not todo:
        return Streamed(0, done_before, [])
    ray = init_ray(config)
    gpus = config.num_gpus_per_worker
    if gpus is None:
        import torch

        gpus = 1.0 if torch.cuda.is_available() else 0.0
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # one plan line per stage is noise next to ours
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # the same file as a single-process run
    context.enable_progress_bars = False  # ours below shows rate and ETA
    dataset = ray.data.from_items([{"item": pickle.dumps(it)} for it in todo],
                                  override_num_blocks=max(1, -(-len(todo) // config.batch_size)))
    dataset = dataset.map_batches(StageActor, fn_constructor_args=(make_processor, config.num_cpus_per_worker),
                                  batch_size=config.batch_size, compute=ray.data.ActorPoolStrategy(size=config.workers),
                                  num_gpus=gpus,
                                  num_cpus=config.num_cpus_per_worker, batch_format="numpy")
    with StageProgress(description, total=len(items), completed=done_before, enabled=progress, unit=unit) as bar:
        for batch in dataset.iter_batches(batch_size=config.batch_size, batch_format="numpy", prefetch_batches=0):
            outputs = [_decode(text) for text in batch["out"]]
            written += write_outputs(store, outputs, skipped)
            bar.advance(len(outputs))
    return Streamed(written, done_before, skipped)
