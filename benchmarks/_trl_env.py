"""A separate virtual environment holding the last TRL release that ships a ``PPOTrainer``.

TRL kept the PPOv2-style ``PPOTrainer`` (``model``/``ref_model``/``reward_model``/``value_model``/
``train_dataset``) as top-level ``trl.PPOTrainer`` up to 0.28.0 (a deprecated alias since 0.26), then
only as ``trl.experimental.ppo.PPOTrainer`` in 0.29.x and 1.0.0-1.12.0; 1.13.0 removed it. The
baseline is therefore TRL 1.12.0 (same algorithm and code as 0.28's, plus small fixes such as the
padding-masked entropy statistic). TRL 1.12.0 asks for ``transformers>=4.56.2``, ``accelerate>=1.4.0``
and ``datasets>=4.7.0``; we pin the versions our main environment runs (torch 2.13.0 CPU,
transformers 5.24.0, accelerate 1.15.0, datasets 5.2.0) so the comparison isolates the PPO code and
the tiny models saved by transformers 5 load natively. ``torch==2.13.0`` resolves to the CPU wheel
already on this machine (``/opt/wheels``); another torch pin would download gigabytes.

    from benchmarks._trl_env import ensure_env
    python = ensure_env(Path("/tmp/trl-ppo-venv"))   # idempotent; returns the venv's python

or ``python benchmarks/_trl_env.py PATH`` (prints the python path). The venv gets a marker file,
``.trl_baseline.json``, recording the pins; a venv whose marker matches is returned untouched, one
whose marker is missing or different is (re)installed into. Only package registries are needed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping

PINS: dict[str, str] = {
    "torch": "2.13.0",          # the CPU build on disk; anything else downloads the CUDA stack
    "trl": "1.12.0",            # last release with a PPOTrainer (trl.experimental.ppo); 1.13.0 dropped it
    "transformers": "5.24.0",   # trl 1.12.0 needs >=4.56.2; same as the main environment
    "accelerate": "1.15.0",     # trl 1.12.0 needs >=1.4.0; same as the main environment
    "datasets": "5.2.0",        # trl 1.12.0 needs >=4.7.0; same as the main environment
}
MARKER = ".trl_baseline.json"
_CHECK = (
    "import json, torch, transformers, accelerate, datasets, trl\n"
    "try:\n    from trl.experimental.ppo import PPOTrainer\n"
    "except ImportError:\n    from trl import PPOTrainer\n"
    "print(json.dumps({m.__name__: m.__version__ for m in (torch, transformers, accelerate, datasets, trl)}))\n"
)


def venv_python(path: pathlib.Path) -> pathlib.Path:
    return path / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _wanted(pins: Mapping[str, str]) -> dict:
    return {"pins": dict(pins), "python": ".".join(map(str, sys.version_info[:3])), "base": sys.base_prefix}


def _read_marker(path: pathlib.Path) -> dict | None:
    try:
        return json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _locked(path: pathlib.Path) -> Iterator[None]:
    """One builder at a time per venv path (a lock file next to it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run(cmd: list[str], verbose: bool) -> str:
    proc = subprocess.run(cmd, text=True, stdout=None if verbose else subprocess.PIPE,
                          stderr=None if verbose else subprocess.STDOUT)
    if proc.returncode:
        tail = "" if verbose else (proc.stdout or "")[-4000:]
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
    return proc.stdout or ""


def ensure_env(path: pathlib.Path, *, pins: Mapping[str, str] | None = None, verbose: bool = False) -> pathlib.Path:
    """Create (or reuse) the TRL-baseline venv at ``path`` and return its python executable.

    ``pins`` overrides :data:`PINS`; keep ``torch`` at 2.13.0. Also tested: ``{**PINS, "trl": "0.28.0",
    "transformers": "4.57.6", "datasets": "4.0.0"}`` (the last top-level ``trl.PPOTrainer``, on the last
    transformers 4; datasets 5 needs huggingface-hub>=1.31, which transformers 4 refuses).
    ``verbose`` streams pip's output; on failure the tail of pip's output is in the exception.
    """
    path = pathlib.Path(path).absolute()
    pins = dict(PINS if pins is None else pins)
    wanted = _wanted(pins)
    python = venv_python(path)
    if python.exists() and _marker_matches(path, wanted):
        return python
    with _locked(path):
        if python.exists() and _marker_matches(path, wanted):  # built by someone else meanwhile
            return python
        if not python.exists():
            _run([sys.executable, "-m", "venv", "--clear", str(path)], verbose)
        with contextlib.suppress(FileNotFoundError):
            (path / MARKER).unlink()
        _run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
              *(f"{name}=={version}" for name, version in pins.items())], verbose)
        got = json.loads(_run([str(python), "-c", _CHECK], False).strip().splitlines()[-1])
        for name, version in pins.items():
            if got.get(name, "").split("+")[0] != version:
                raise RuntimeError(f"{path}: {name} is {got.get(name)!r}, wanted {version}")
        tmp = path / (MARKER + ".tmp")
        tmp.write_text(json.dumps({**wanted, "installed": got}, indent=1) + "\n", encoding="utf-8")
        tmp.replace(path / MARKER)  # written last: a half-built venv never looks finished
    return python


def _marker_matches(path: pathlib.Path, wanted: dict) -> bool:
    """The marker records what was asked for (plus what got installed, not compared)."""
    marker = _read_marker(path)
    return marker is not None and {k: marker.get(k) for k in wanted} == wanted


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="build/reuse the TRL PPOTrainer baseline venv")
    ap.add_argument("path", type=pathlib.Path)
    ap.add_argument("--verbose", action="store_true")
    a = ap.parse_args()
    t0 = time.perf_counter()
    exe = ensure_env(a.path, verbose=a.verbose)
    print(f"{exe}  ({time.perf_counter() - t0:.1f}s)", file=sys.stderr)
    print(exe)
