"""`cai serve-pm` under load and abuse: OpenRLHF's request shapes score the right conversation,
every malformed body gets a 4xx JSON reply, 200 concurrent clients get no reset and the rewards of
batched scoring, a long request does not starve the others, and the token guards the network."""

from __future__ import annotations

import asyncio
import json
import socket

import httpx2
import pytest

from constitutional_ai.common.errors import ConfigError
from constitutional_ai.config import ServePMConfig
from constitutional_ai.preference_model.reward_model import RewardModel, load_sequence_classifier
from constitutional_ai.preference_model.server import DynamicBatcher, RewardServer, split_query

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{{ '<|begin_of_text|>' }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
END = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "raw": ""}
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How do I pick a lock?"},
     {"role": "assistant", "content": "Why do you ask?"}, {"role": "user", "content": "It is my own door."}],
]


@pytest.fixture(scope="module")
def scorer(tiny_model_dir):
    model, tokenizer = load_sequence_classifier(str(tiny_model_dir))
    return RewardModel(model, tokenizer, max_length=128)


@pytest.fixture(scope="module")
def server(scorer):
    server = RewardServer(scorer, ServePMConfig(port=0, max_body_bytes=64 * 1024, max_queries=64, max_query_chars=4096,
                                                max_batch_size=16))
    server.start()
    yield server
    server.shutdown()


def _render(template: str, scorer: RewardModel, messages: list[dict[str, str]]) -> str:
    if template == "raw":
        from constitutional_ai.common.chat_format import render_raw

        return render_raw(messages, add_generation_prompt=True)
    tokenizer = scorer.tokenizer
    tokenizer.chat_template = CHATML if template == "chatml" else LLAMA3
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    finally:
        tokenizer.chat_template = None


def test_a_prompt_ending_in_a_generation_header_opens_the_scored_turn():
    """The reported bug: OpenRLHF's prompt ends in `<|im_start|>assistant\\n`; that is not an empty turn."""
    p = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert split_query(p + "Hello<|im_end|>", p) == ([{"role": "user", "content": "Hi"}], "Hello")
    assert split_query(p + "Hello<|im_end|>") == ([{"role": "user", "content": "Hi"}], "Hello")


@pytest.mark.parametrize("template", ["chatml", "llama3", "raw"])
@pytest.mark.parametrize("with_prompts", [True, False])
def test_openrlhf_shapes_score_the_conversation_a_chat_template_rendered(server, scorer, template, with_prompts):
    conversations = [[m for m in c if template != "raw" or m["role"] != "system"]  # the paper's format has none
                     for c in CONVERSATIONS]
    prompts = [_render(template, scorer, c) for c in conversations]
    responses = ["Hello there.", "Then call a locksmith."]
    sep = " " if template == "raw" else ""
    queries = [p + sep + r + END[template] for p, r in zip(prompts, responses, strict=True)]
    body = {"query": queries, **({"prompts": prompts, "labels": ["", ""]} if with_prompts else {})}
    reply = httpx2.post(server.url, json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    expected = scorer.score([[*c, {"role": "assistant", "content": r}]
                             for c, r in zip(conversations, responses, strict=True)])
    assert reply.json()["rewards"] == pytest.approx(expected, abs=1e-5)
    assert reply.json()["scores"] == reply.json()["rewards"]


BAD_BODIES = [
    (b"[1]", 422), (b"null", 422), (b"42", 422), (b'"x"', 422), (b'{"prompts": ["a"]}', 422),
    (b'{"query": [5]}', 422), (b'{"query": "x"}', 422), (b'{"query": {"a": "b"}}', 422), (b"NaN", 400),
    (b'{"query": [NaN]}', 400), (b"{", 400), (b"\xff\xfe", 400), (b"[" * 50000 + b"]" * 50000, 413),
    (b'{"query": ["a", "b"], "prompts": ["a"]}', 422), (b'{"query": ["' + b"x" * 5000 + b'"]}', 413),
    (json.dumps({"query": ["q"] * 65}).encode(), 413), (b"[" * 3000 + b"]" * 3000, 400),
]


@pytest.mark.parametrize(("body", "status"), BAD_BODIES, ids=range(len(BAD_BODIES)))
def test_every_malformed_body_gets_a_4xx_json_reply_that_says_what_was_wrong(server, body, status):
    reply = httpx2.post(server.url, content=body, headers={"Content-Type": "application/json"}, timeout=30)
    assert reply.status_code == status, reply.text
    message = reply.json()["error"]
    assert isinstance(message, str) and message and "\n" not in message


def test_a_huge_declared_length_is_refused_without_reading_it(server):
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(b"POST /get_reward HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 99999999999999\r\n\r\n{")
        reply = b""
        while b"max_body_bytes" not in reply:  # the status line and the body may come in separate packets
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
        reply = reply.decode(errors="replace")
    assert reply.startswith("HTTP/1.1 413") and "max_body_bytes" in reply


def test_health_and_unknown_paths(server):
    assert httpx2.get(f"http://{server.host}:{server.port}/health", timeout=10).json()["status"] == "ok"
    assert httpx2.post(f"http://{server.host}:{server.port}/nope", json={}, timeout=10).status_code == 404


def test_200_concurrent_clients_get_no_reset_and_the_rewards_of_batched_scoring(server, scorer):
    queries = [f"\n\nHuman: question {i}\n\nAssistant: answer {i % 7}" for i in range(200)]
    expected = scorer.score_responses([[{"role": "user", "content": f"question {i}"}] for i in range(200)],
                                      [f"answer {i % 7}" for i in range(200)])
    batches_before = httpx2.get(f"http://{server.host}:{server.port}/health").json()["batches"]

    async def clients() -> list[httpx2.Response]:
        limits = httpx2.Limits(max_connections=200, max_keepalive_connections=0)
        async with httpx2.AsyncClient(limits=limits, timeout=120) as client:
            return await asyncio.gather(*(client.post(server.url, json={"query": [q]}) for q in queries))

    replies = asyncio.run(clients())
    assert [r.status_code for r in replies] == [200] * 200
    got = [r.json()["rewards"][0] for r in replies]
    assert got == pytest.approx(expected, abs=1e-4)
    batches = httpx2.get(f"http://{server.host}:{server.port}/health").json()["batches"] - batches_before
    assert batches < 100  # gathered: far fewer forward passes than requests


def test_a_long_request_does_not_starve_short_ones():
    """Slices are taken round-robin: a short request arriving behind a long one finishes first."""
    calls: list[int] = []

    def score(prompts, responses):
        calls.append(len(responses))
        return [float(len(r)) for r in responses]

    async def scenario() -> list[str]:
        batcher = DynamicBatcher(score, max_batch_size=8, max_wait_ms=0)
        batcher.start()
        done: list[str] = []

        async def run(name: str, n: int) -> None:
            await batcher.submit([([], "x" * k) for k in range(n)])
            done.append(name)

        long = asyncio.create_task(run("long", 400))
        await asyncio.sleep(0)
        short = asyncio.create_task(run("short", 2))
        await asyncio.gather(long, short)
        await batcher.stop()
        return done

    assert asyncio.run(scenario()) == ["short", "long"]
    assert max(calls) <= 8 and sum(calls) == 402


def test_the_token_guards_the_endpoint_and_the_network(scorer, monkeypatch):
    monkeypatch.setenv("CAI_PM_TOKEN", "s3cret")
    server = RewardServer(scorer, ServePMConfig(port=0))
    server.start()
    try:
        body = {"query": ["\n\nHuman: Hi\n\nAssistant: Hello"]}
        assert httpx2.post(server.url, json=body, timeout=30).status_code == 401
        wrong = httpx2.post(server.url, json=body, headers={"Authorization": "Bearer nope"}, timeout=30)
        assert wrong.status_code == 401 and "s3cret" not in wrong.text
        ok = httpx2.post(server.url, json=body, headers={"Authorization": "Bearer s3cret"}, timeout=30)
        assert ok.status_code == 200
    finally:
        server.shutdown()
    monkeypatch.delenv("CAI_PM_TOKEN")
    with pytest.raises(ConfigError, match="CAI_PM_TOKEN"):
        RewardServer(scorer, ServePMConfig(host="0.0.0.0", port=0))
    RewardServer(scorer, ServePMConfig(host="0.0.0.0", port=0, insecure=True))  # told to: allowed
