"""Adapters that let RL engines run at cluster scale with our preference model and our prompts.

Teams that outgrow ``cai ppo`` (one accelerate job) run PPO on OpenRLHF or verl. Those engines
own rollout, training and placement; what they need from us is a reward and a prompt dataset in
the shapes they read:

* :mod:`constitutional_ai.integrations.verl`: verl's custom reward function (``compute_score``
  and a batched variant), scoring each response with our PM, and our prompts as verl's RL parquet.
* :mod:`constitutional_ai.integrations.openrlhf`: our prompts as the JSONL OpenRLHF's
  ``--prompt_data`` reads, and the request/reply shapes of its ``--remote_rm_url`` client, which
  ``cai serve-pm`` answers.

This package sits at the entrypoint level (beside the CLI): the engines import it in their own
worker processes, so it imports only the layers below (preference_model, data, config, common),
never stages, the report or the CLI, and neither verl nor OpenRLHF (they are not dependencies).
``docs/cluster-rl.md`` has the launch commands.
"""
