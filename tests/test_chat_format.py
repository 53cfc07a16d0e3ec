from conftest import HH_DEV, needs_hh
from constitutional_ai.common.chat_format import parse_raw, render_raw
from constitutional_ai.data.prompts import hh_prompt, hh_split


def test_render_and_parse_round_trip():
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "How are you?"}]
    text = render_raw(messages)
    assert text == "\n\nHuman: Hi there\n\nAssistant: Hello.\n\nHuman: How are you?\n\nAssistant:"
    assert parse_raw(text) == messages
    assert parse_raw(render_raw(messages, add_generation_prompt=False)) == messages


def test_hh_transcript_split():
    transcript = "\n\nHuman: a?\n\nAssistant: b.\n\nHuman: c?\n\nAssistant: d."
    assert hh_prompt(transcript) == [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "b."},
                                     {"role": "user", "content": "c?"}]
    assert hh_split(transcript)[1] == "d."


@needs_hh
def test_real_hh_transcripts_parse_into_conversations_ending_with_the_human():
    import json

    rows = [json.loads(line) for line in HH_DEV.open()][:200]
    for row in rows:
        prompt = hh_prompt(row["chosen"])
        assert prompt and prompt[-1]["role"] == "user"
        assert all(m["role"] in ("user", "assistant") for m in prompt)
        # the two sides of a pair share the conversation up to the last human turn
        assert hh_prompt(row["rejected"]) == prompt
