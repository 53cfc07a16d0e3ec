"""``python -m constitutional_ai``: the ``cai`` command line, for launchers that start a module
rather than a script (``accelerate launch -m constitutional_ai sft ...``, ``torchrun -m ...``)."""

from constitutional_ai.cli import main

if __name__ == "__main__":
    main()
