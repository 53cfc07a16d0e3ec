"""RL-CAI step 3: the preference model (Bradley-Terry on soft AI labels mixed with human labels).

Import from the submodules (``reward_model``, ``loss``, ``data``): the package itself imports
nothing, so reading preference data or building the CLI does not pull in torch.
"""
