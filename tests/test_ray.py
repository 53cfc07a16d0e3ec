"""Distributed generation on a local Ray: the same records as one process, resumed the same way."""

from __future__ import annotations

import json

import pytest

from constitutional_ai.config import RunConfig
from constitutional_ai.data.store import read_records

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'constitutional-ai[ray]'")

#: Fields that say how long a record took, which no two runs share.
TIMING = ("seconds", "timings", "elapsed")


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def _config(tmp_path, name, model, **overrides):
    base = {"output_dir": str(tmp_path / name), "progress": False, "prompts.limit": 6,
            "policy.model_name_or_path": str(model), "policy.device": "cpu", "critique.n_rounds": 2,
            "critique.generation.max_new_tokens": 12, "critique.batch_size": 3,
            "pairs.generation.max_new_tokens": 10, "feedback.batch_size": 4, "ray.batch_size": 2}
    return RunConfig().with_overrides({**base, **overrides})


def _records(path):
    return [json.dumps({k: v for k, v in r.items() if k not in TIMING}, sort_keys=True) for r in read_records(path)]


@pytest.mark.slow
def test_critique_pairs_and_labels_on_two_ray_workers_match_one_process(tmp_path, tiny_model_dir):
    from constitutional_ai.stages.critique import run_critique
    from constitutional_ai.stages.feedback import run_label, run_sample_pairs

    local = _config(tmp_path, "local", tiny_model_dir)
    fanned = _config(tmp_path, "ray", tiny_model_dir, **{"ray.workers": 2})
    for run in (run_critique, run_sample_pairs, run_label):
        one, two = run(local), run(fanned)
        assert one.written == two.written == 6
    for stage in ("critique", "pairs"):
        assert _records(tmp_path / "ray" / stage / "records.jsonl") == _records(tmp_path / "local" / stage /
                                                                               "records.jsonl")
    ray_labels = list(read_records(tmp_path / "ray" / "labels" / "records.jsonl"))
    local_labels = list(read_records(tmp_path / "local" / "labels" / "records.jsonl"))
    assert [r["key"] for r in ray_labels] == [r["key"] for r in local_labels]
    assert [r["p_a"] for r in ray_labels] == pytest.approx([r["p_a"] for r in local_labels], abs=1e-5)
    manifest = json.loads((tmp_path / "ray" / "critique" / "manifest.json").read_text())
    assert manifest["ray_workers"] == 2

    # A run killed after some batches leaves a prefix of the records; Ray resumes from it.
    path = tmp_path / "ray" / "critique" / "records.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:2]))
    again = run_critique(fanned)
    assert again.written == 4 and again.extra["resumed_from"] == 2
    assert _records(path) == _records(tmp_path / "local" / "critique" / "records.jsonl")


def test_a_given_backend_and_ray_workers_conflict(tmp_path, tiny_model_dir):
    from conftest import ScriptedBackend
    from constitutional_ai.common.errors import ConfigError
    from constitutional_ai.stages.critique import run_critique

    with pytest.raises(ConfigError, match=r"ray\.workers"):
        run_critique(_config(tmp_path, "x", tiny_model_dir, **{"ray.workers": 1}), backend=ScriptedBackend())
