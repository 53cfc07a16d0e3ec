"""constitutional-ai: align a language model with a written constitution (Bai et al. 2022).

The public API mirrors the pipeline: a :class:`Constitution` drives the critique-revision engine
(SL-CAI) and, later, the feedback model (RL-CAI). Stages talk to models only through the
backend protocol in :mod:`constitutional_ai.backends` and write data only through
:class:`constitutional_ai.data.store.RecordStore`.
"""

from constitutional_ai.common.errors import CAIError
from constitutional_ai.config import GenerationParams, ModelConfig, RunConfig
from constitutional_ai.constitution import Constitution

__version__ = "0.1.0"

__all__ = ["CAIError", "Constitution", "GenerationParams", "ModelConfig", "RunConfig", "__version__"]
