"""Artifacts ready for the Hugging Face Hub: a run's datasets and models as folders that
``datasets.load_dataset`` and ``from_pretrained`` load as they are, each with its card, and the
upload of such a folder.

``table`` says what is exportable (the one list), ``facts`` reads what the run recorded about an
artifact, ``cards`` writes its dataset or model card, ``folders`` writes the folder and ``push``
uploads it. This package sits with the data layer: it reads the config, the run layout, the data
and the constitution, and never imports stages, the report or the CLI. Importing it loads nothing
heavy (huggingface_hub is imported where a card is built or a folder pushed).
"""

from constitutional_ai.artifacts.table import ARTIFACTS, EXPORTABLE, Artifact, artifact_path, exportable, made

__all__ = ["ARTIFACTS", "EXPORTABLE", "Artifact", "artifact_path", "exportable", "made"]
