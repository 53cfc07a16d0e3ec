"""Padding-free PM training: packed forwards equal padded ones, and the trainer only packs where they do."""

import logging

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

from constitutional_ai.preference_model.packing import (
    PackedRows,
    packed_attention_installed,
    packed_length,
    packing_matches,
    padding_free,
)


def _bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, num_labels=1,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config._attn_implementation = "sdpa"
    return BertForSequenceClassification(config)


def _bert_chunked() -> BertForSequenceClassification:
    """BERT whose MLP runs one position at a time (``chunk_size_feed_forward``): the pooled-only
    last layer must not index a chunk with positions of the whole packed row."""
    model = _bert()
    for layer in model.bert.encoder.layer:
        layer.chunk_size_feed_forward = 1  # any width divides by it, the rows scored alone too
    return model


def _llama() -> LlamaForSequenceClassification:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, pad_token_id=0, num_labels=1)
    config._attn_implementation = "sdpa"
    return LlamaForSequenceClassification(config)


def _batch(lengths: list[int], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
    return torch.randint(1, 300, (len(lengths), width)) * mask, mask


def _rewards_and_grads(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, packed: bool):
    model.zero_grad()
    if packed:
        with padding_free(model):
            rewards = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    else:
        rewards = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    (rewards * torch.arange(1.0, len(rewards) + 1)).sum().backward()
    return rewards.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("build", [_bert, _bert_chunked, _llama],
                         ids=["bert-encoder", "bert-chunked-mlp", "llama-decoder"])
def test_packed_rewards_and_gradients_equal_the_padded_ones(build):
    model = build().train()
    ids, mask = _batch([40, 7, 23, 40, 1, 31], width=48)  # full-width, one-token and ragged rows
    padded, padded_grads = _rewards_and_grads(model, ids, mask, packed=False)
    packed, packed_grads = _rewards_and_grads(model, ids, mask, packed=True)
    assert torch.allclose(packed, padded, atol=1e-5), (packed, padded)
    assert padded_grads.keys() == packed_grads.keys() and len(padded_grads) > 10
    for name, grad in padded_grads.items():
        assert torch.allclose(packed_grads[name], grad, atol=1e-5, rtol=1e-4), name
    # and each row's reward is what the row scores alone, unpadded
    with torch.no_grad():
        alone = torch.cat([model(input_ids=ids[i:i + 1, :int(mask[i].sum())]).logits for i in range(len(ids))])
    assert torch.allclose(packed, alone.squeeze(-1), atol=1e-5)


def test_the_model_is_left_as_it_was_after_the_block():
    model = _bert()
    last = model.bert.encoder.layer[-1]
    before = (model.config._attn_implementation, model.bert.forward)
    with padding_free(model):
        assert model.config._attn_implementation != "sdpa"
        assert "feed_forward_chunk" in last.__dict__ and "forward" in last.attention.output.__dict__
    assert (model.config._attn_implementation, model.bert.forward) == before
    assert "feed_forward_chunk" not in last.__dict__ and "forward" not in last.attention.output.__dict__
    assert not last.attention._forward_pre_hooks


def _rows_seen(module: torch.nn.Module) -> list[int]:
    """How many positions each call of ``module`` computed."""
    seen: list[int] = []
    module.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[-2]))
    return seen


@pytest.mark.parametrize("build", [_bert, _llama], ids=["bert-encoder", "llama-decoder"])
def test_the_last_layer_computes_only_the_pooled_positions(build):
    """Past its keys and values, the last layer runs its MLP on the positions the head can pool
    (first, last and rightmost non-pad token of each row), and the rewards stay the padded ones."""
    model = build().eval()
    layers = model.bert.encoder.layer if hasattr(model, "bert") else model.model.layers
    mlp_out = (lambda layer: layer.output.dense) if hasattr(model, "bert") else (lambda layer: layer.mlp.down_proj)
    first, last = _rows_seen(mlp_out(layers[0])), _rows_seen(mlp_out(layers[-1]))
    keys = _rows_seen(layers[-1].attention.self.key if hasattr(model, "bert") else layers[-1].self_attn.k_proj)
    lengths = [40, 7, 23, 1]
    ids, mask = _batch(lengths, width=48)
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask).logits
        with padding_free(model):
            pooled = model(input_ids=ids, attention_mask=mask).logits
        with padding_free(model, pooled_only=False):
            every = model(input_ids=ids, attention_mask=mask).logits
    tokens = packed_length(sum(lengths))
    assert first == [48, tokens, tokens] and keys == [48, tokens, tokens]
    assert last[0] == 48 and last[2] == tokens and last[1] == 2 * len(lengths) - 1  # row of 1: first = last
    assert torch.allclose(pooled, padded, atol=1e-5) and torch.allclose(every, padded, atol=1e-5)
    with torch.no_grad(), packed_attention_installed(model):  # as in training: a padded forward after a packed one
        with padding_free(model):
            model(input_ids=ids, attention_mask=mask)
        assert torch.allclose(model(input_ids=ids, attention_mask=mask).logits, padded, atol=1e-6)
        assert last[-1] == 48


def test_a_decoder_row_ending_in_pad_id_tokens_is_pooled_where_transformers_pools_it():
    """transformers' decoder head reads the rightmost token that is not the pad id, which is not the
    last real token when a row ends in pad-id tokens (an EOS used as the pad token)."""
    model = _llama().eval()
    ids, mask = _batch([30, 12, 20], width=32)
    ids[0, 27:30] = 0  # real tokens (mask 1) that equal pad_token_id
    ids[2, 19] = 0
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask).logits
        with padding_free(model):
            packed = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(packed, padded, atol=1e-5), (packed, padded)


class _MeanPooled(BertForSequenceClassification):
    """A head that reads every position: the pooled-only last layer must fail its check."""

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        from transformers.modeling_outputs import SequenceClassifierOutput

        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask[..., None].to(hidden.dtype)
        return SequenceClassifierOutput(logits=self.classifier((hidden * weights).sum(1) / weights.sum(1)))


def test_a_head_that_reads_every_position_packs_without_the_pooled_only_layer(tmp_path, tiny_model_dir):
    model = _MeanPooled(_bert().config)
    ids, mask = _batch([20, 9, 30], width=32)
    ok, why = packing_matches(model, ids, mask)
    assert not ok and "differ" in why
    assert packing_matches(model, ids, mask, pooled_only=False)[0]
    _, trainer = _train(model, tmp_path, tiny_model_dir, padding_free_on=True)
    assert trainer.padding_free_used is True and trainer.pooled_only_used is False


def test_a_padded_forward_keeps_its_mask_while_the_packed_attention_is_installed():
    """Training keeps the packed attention installed (for gradient checkpointing's recomputation):
    an unpacked forward in that time must still mask its padding. An encoder, where every token
    attends to the padding unless masked (right-padded causal rows never see it)."""
    model = _bert().eval()
    ids, mask = _batch([40, 7, 23], width=48)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        with packed_attention_installed(model):
            installed = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(installed, plain, atol=1e-6)
    garbage = ids.clone()
    garbage[mask == 0] = 5  # what sits under the padding must not matter
    with torch.no_grad(), packed_attention_installed(model):
        assert torch.allclose(model(input_ids=garbage, attention_mask=mask).logits, plain, atol=1e-5)


def test_packed_lengths_take_few_sizes_and_little_filler():
    for tokens in (1, 63, 64, 65, 2047, 2049, 3170, 40_000):
        length = packed_length(tokens)
        assert length >= tokens and length % 64 == 0
        assert length - tokens < max(64, tokens * 0.032)
    assert len({packed_length(n) for n in range(2048, 4096)}) == 33  # 2,048 to 4,096 in steps of 64


def test_attention_pads_each_row_to_its_own_length_not_the_batch_width(monkeypatch):
    """Rows are grouped by their length rounded up to ATTENTION_WIDTH, one SDPA call per group;
    every real token has one slot, and a padding slot reads a token of its own row."""
    _, mask = _batch([100, 10, 60, 1, 128], width=128)
    rows = PackedRows.of(mask)
    groups = rows.attention_groups
    assert [tuple(g.keep.shape) for g in groups] == [(2, 32), (1, 64), (2, 128)]
    row_of = torch.repeat_interleave(torch.arange(5.0), mask.sum(1))  # each packed token's row
    tokens = (row_of[:, None, None] + torch.zeros(1, 2, 3)).requires_grad_()
    slots = rows.to_slots(tokens)
    assert torch.equal(rows.from_slots(slots), tokens)
    for group, part in zip(groups, slots.split([g.keep.numel() for g in groups]), strict=True):
        padded_rows = part[:, 0, 0].view(group.keep.shape)
        assert torch.equal(padded_rows, padded_rows[:, :1].expand_as(padded_rows))
    (rows.from_slots(slots) * 2).sum().backward()
    assert torch.equal(tokens.grad, torch.full_like(tokens, 2.0))

    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, *a, **kw: seen.append(q.shape[-2]) or sdpa(q, *a, **kw))
    ids, mask = _batch([20, 3, 40], width=48)
    model = _bert().eval()
    with torch.no_grad(), padding_free(model):
        model(input_ids=ids, attention_mask=mask)
    assert sorted(seen) == [32, 32, 48, 48]  # 2 layers x (the rows of 20 and 3 and a filler row; the row of 40)


def test_left_padded_rows_are_refused():
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    with pytest.raises(ValueError, match="right-padded"):
        PackedRows.of(mask)


def _ignores_positions(model: BertForSequenceClassification) -> BertForSequenceClassification:
    """A model that drops packed position ids, as an architecture without per-row positions would."""
    original = type(model.bert).forward

    def forward(self, *args, position_ids=None, **kwargs):
        return original(self, *args, **kwargs)

    model.bert.forward = forward.__get__(model.bert)
    return model


def test_a_model_that_cannot_pack_is_detected():
    ids, mask = _batch([20, 9, 30], width=32)
    assert packing_matches(_bert(), ids, mask)[0]
    ok, why = packing_matches(_ignores_positions(_bert()), ids, mask)
    assert not ok and "differ" in why


def _train(model: torch.nn.Module, tmp_path, tokenizer_dir, padding_free_on: bool):
    """Six steps of plain SGD (Adam's first steps turn rounding-level gradients into whole steps)."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import RewardConfig

    from constitutional_ai.preference_model.trainer import SoftLabelCollator, SoftLabelRewardTrainer

    torch.manual_seed(2)
    n = 24
    rows = {"chosen_ids": [torch.randint(1, 300, (int(torch.randint(3, 30, ())),)).tolist() for _ in range(n)],
            "rejected_ids": [torch.randint(1, 300, (int(torch.randint(3, 30, ())),)).tolist() for _ in range(n)],
            "p_chosen": [0.5 + 0.5 * (i % 2) for i in range(n)]}
    args = RewardConfig(output_dir=str(tmp_path / f"out-{padding_free_on}"), per_device_train_batch_size=8,
                        num_train_epochs=2, learning_rate=0.5, optim="sgd", logging_steps=1, save_strategy="no",
                        report_to=[], remove_unused_columns=False, seed=0, use_cpu=True, disable_dropout=True,
                        bf16=False,  # fp32: bf16 rounding differs between any two kernels
                        gradient_checkpointing=True)  # the backward recomputes packed layers
    trainer = SoftLabelRewardTrainer(model=model, args=args, train_dataset=Dataset.from_dict(rows),
                                     processing_class=AutoTokenizer.from_pretrained(tokenizer_dir),
                                     data_collator=SoftLabelCollator(pad_token_id=0, pad_to_multiple_of=8),
                                     padding_free=padding_free_on)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h], trainer


def test_padding_free_training_follows_the_padded_trajectory(tmp_path, tiny_model_dir):
    padded, plain = _train(_llama(), tmp_path, tiny_model_dir, padding_free_on=False)
    packed, trainer = _train(_llama(), tmp_path, tiny_model_dir, padding_free_on=True)
    assert plain.padding_free_used is False and trainer.padding_free_used is True
    assert trainer.pooled_only_used is True  # and checkpointing recomputed the last layer pooled-only
    assert trainer.model.config._attn_implementation == "sdpa"  # put back when training ends
    assert len(packed) == len(padded) == 6
    assert packed == pytest.approx(padded, rel=1e-4, abs=1e-5)


def test_the_trainer_falls_back_to_padded_batches_with_a_warning(tmp_path, tiny_model_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="constitutional_ai.preference_model.trainer"):
        losses, trainer = _train(_ignores_positions(_bert()), tmp_path, tiny_model_dir, padding_free_on=True)
    assert trainer.padding_free_used is False
    assert any("padding-free PM training is off" in r.getMessage() for r in caplog.records)
    assert len(losses) == 6 and all(loss == loss for loss in losses)


def test_sliding_window_models_are_not_packed():
    """Per-row attention has no band mask: a sliding-window model must fail the check on every
    batch (not only on one longer than its window) and train padded."""
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    config = Qwen2Config(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, pad_token_id=0, num_labels=1,
                         use_sliding_window=True, sliding_window=64, max_window_layers=0)
    config._attn_implementation = "sdpa"
    ids, mask = _batch([20, 9, 14], width=24)  # shorter than the window: results would still agree
    ok, why = packing_matches(Qwen2ForSequenceClassification(config), ids, mask)
    assert not ok and "sliding_window" in why


def test_an_instance_forward_on_the_base_model_is_put_back():
    model = _bert()
    hook = model.bert.forward  # as accelerate's hooks set one on the instance
    model.bert.forward = hook
    with padding_free(model):
        assert model.bert.forward is not hook
    assert model.bert.__dict__["forward"] is hook


def test_a_second_train_on_the_same_trainer_stays_packed_through_checkpointing(tmp_path, tiny_model_dir):
    """A retry or a resume calls train() again: the backward's recomputation must find the packed
    attention installed then too, or checkpointed layers would attend across rows."""
    _, plain = _train(_llama(), tmp_path, tiny_model_dir, padding_free_on=False)
    _, trainer = _train(_llama(), tmp_path, tiny_model_dir, padding_free_on=True)
    plain.train()
    trainer.train()
    again_padded = [h["loss"] for h in plain.state.log_history if "loss" in h]
    again_packed = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(again_packed) == len(again_padded) == 6
    assert again_packed == pytest.approx(again_padded, rel=1e-4, abs=1e-5)
    assert trainer.model.config._attn_implementation == "sdpa"


def test_under_bf16_the_check_allows_bf16_rounding(tmp_path, tiny_model_dir, monkeypatch):
    """accelerate's autocast runs inside the model's forward, where the check cannot see it: the
    trainer says so, or bf16 rounding would fail a 1e-4 check and turn packing off."""
    import constitutional_ai.preference_model.trainer as trainer_module

    seen = []
    real = trainer_module.packing_matches
    monkeypatch.setattr(trainer_module, "packing_matches",
                        lambda *a, **kw: seen.append(kw.get("half")) or real(*a, **kw))
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import RewardConfig

    rows = {"chosen_ids": [[5, 6, 7, 8]] * 8, "rejected_ids": [[5, 6, 9]] * 8, "p_chosen": [1.0] * 8}
    for bf16 in (True, False):
        args = RewardConfig(output_dir=str(tmp_path / f"o{bf16}"), per_device_train_batch_size=4, max_steps=1,
                            save_strategy="no", report_to=[], remove_unused_columns=False, use_cpu=True, bf16=bf16)
        trainer_module.SoftLabelRewardTrainer(
            model=_llama(), args=args, train_dataset=Dataset.from_dict(rows),
            processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
            data_collator=trainer_module.SoftLabelCollator(pad_token_id=0), padding_free=True).train()
    assert seen == [True, False]


@pytest.mark.parametrize("build", [_bert, _llama], ids=["bert-encoder", "llama-decoder"])
def test_a_copy_taken_while_installed_computes_with_its_own_weights(build):
    """A deepcopy taken mid-training (an EMA or reference model) must not keep the pooled-only
    closures, which would run the original's last layer inside the copy's forward."""
    import copy

    model = build().eval()
    ids, mask = _batch([40, 7, 23, 1], width=48)
    with packed_attention_installed(model):
        copied = copy.deepcopy(model)
    plain = copy.deepcopy(model)
    for other in (copied, plain):  # the same change to the last layer's MLP in both copies
        bert = hasattr(other, "bert")
        part = other.bert.encoder.layer[-1].output.LayerNorm if bert else other.model.layers[-1].mlp.down_proj
        with torch.no_grad():
            part.weight.mul_(-3.0)
    seen = _rows_seen(copied.bert.encoder.layer[-1].output.dense if bert else copied.model.layers[-1].mlp.down_proj)
    with torch.no_grad():
        expected = plain(input_ids=ids, attention_mask=mask).logits
        assert not torch.allclose(expected, model(input_ids=ids, attention_mask=mask).logits, atol=1e-3)
        assert torch.allclose(copied(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-6)
        with padding_free(copied):  # installed on the copy itself: pooled-only again
            assert torch.allclose(copied(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-5)
    assert seen == [48, 2 * 4 - 1]  # padded, then packed: the copy's last MLP computed the pooled positions only
    # a copy that reaches a patched method before the module owning it binds it to its own module too
    owner = (lambda m: m.bert.encoder.layer[-1]) if bert else (lambda m: m.model.layers[-1].mlp)
    attr = "feed_forward_chunk" if bert else "forward"
    with packed_attention_installed(model):
        both = copy.deepcopy({"part": getattr(owner(model), attr), "model": model})
    copied_owner = owner(both["model"])
    assert both["part"].__self__ is copied_owner and copied_owner.__dict__[attr].__self__ is copied_owner
