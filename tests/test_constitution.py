import json

import pytest
import yaml

from conftest import PAPER_DIR, needs_paper
from constitutional_ai.common.errors import ConstitutionError
from constitutional_ai.constitution import Constitution


def test_default_constitution_has_16_pairs_and_16_comparison_principles():
    c = Constitution.default()
    assert len(c.critique_revision) == 16
    assert len(c.comparison) == 16
    assert c.critique_examples and c.feedback_examples
    assert len({p.id for p in c.critique_revision}) == 16


def test_default_constitution_is_in_our_own_words():
    text = Constitution.default().canonical_json()
    assert "Identify specific ways in which the assistant" not in text
    assert "CritiqueRequest:" not in text


def test_hash_is_stable_across_formats_and_key_order(tmp_path):
    c = Constitution.default()
    c.save(str(tmp_path / "c.yaml"))
    c.save(str(tmp_path / "c.json"))
    data = json.loads((tmp_path / "c.json").read_text())
    shuffled = {k: data[k] for k in reversed(list(data))}
    (tmp_path / "shuffled.json").write_text(json.dumps(shuffled))
    hashes = {Constitution.from_file(str(tmp_path / n)).hash for n in ("c.yaml", "c.json", "shuffled.json")}
    assert hashes == {c.hash}
    assert c.hash.startswith("sha256:") and len(c.hash) == len("sha256:") + 64


def test_hash_changes_with_content():
    c = Constitution.default()
    data = c.model_dump()
    data["critique_revision"][0]["critique_request"] += " Be brief."
    assert Constitution.model_validate(data).hash != c.hash


def _write(tmp_path, data, name="bad.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_validation_error_names_file_entry_and_field(tmp_path):
    data = Constitution.default().model_dump()
    del data["critique_revision"][3]["revision_request"]
    entry_id = data["critique_revision"][3]["id"]
    path = _write(tmp_path, data)
    with pytest.raises(ConstitutionError) as err:
        Constitution.from_file(str(path))
    message = str(err.value)
    assert str(path) in message
    assert "critique_revision[3]" in message and entry_id in message
    assert "revision_request" in message
    assert "\n" not in message


def test_unknown_field_and_duplicate_id_are_reported(tmp_path):
    data = Constitution.default().model_dump()
    data["comparison"][0]["txt"] = "typo"
    with pytest.raises(ConstitutionError, match=r"comparison\[0\].*txt.*unknown field"):
        Constitution.from_file(str(_write(tmp_path, data)))
    data = Constitution.default().model_dump()
    data["comparison"][1]["id"] = data["comparison"][0]["id"]
    with pytest.raises(ConstitutionError, match="duplicate id"):
        Constitution.from_file(str(_write(tmp_path, data, "dup.yaml")))


def test_empty_request_and_bad_yaml_are_reported(tmp_path):
    data = Constitution.default().model_dump()
    data["critique_revision"][0]["critique_request"] = "   "
    with pytest.raises(ConstitutionError, match=r"critique_request: must not be empty"):
        Constitution.from_file(str(_write(tmp_path, data)))
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConstitutionError, match="not valid YAML"):
        Constitution.from_file(str(bad))
    with pytest.raises(ConstitutionError, match="no such constitution file"):
        Constitution.load(str(tmp_path / "missing.yaml"))


@needs_paper
def test_paper_constitution_loads_with_16_pairs_and_16_comparison_principles():
    c = Constitution.from_anthropic_paper(str(PAPER_DIR))
    assert len(c.critique_revision) == 16
    assert len(c.comparison) == 16
    assert len(c.critique_examples) == 5
    assert len(c.feedback_examples) == 5
    assert len(c.chain_of_thought_examples) == 6
    first = c.critique_principle("harmful0")
    assert not first.critique_request.startswith(("CritiqueRequest", "\n"))
    assert not first.critique_request.endswith("Critique:")
    assert not c.comparison[0].text.endswith("Options:")
    example = c.critique_examples[0]
    assert example.messages[0].role == "user" and example.messages[-1].role == "assistant"
    assert example.critique and example.revision
    # the same files load through the config spec and the directory path
    assert Constitution.load(f"anthropic-paper:{PAPER_DIR}").hash == c.hash == Constitution.load(str(PAPER_DIR)).hash


def test_missing_paper_dir_is_one_line(tmp_path):
    with pytest.raises(ConstitutionError, match="missing"):
        Constitution.from_anthropic_paper(str(tmp_path))
