"""The OpenAI-compatible backend: retry maths, then a real llama.cpp server on loopback (a GGUF
export of the tiny test model), with and without a fault-injecting proxy in front of it."""

from __future__ import annotations

import json
import random
import time
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Lock, Thread

import pytest

from constitutional_ai.backends.openai_backend import (
    OpenAIBackend,
    ScoringUnsupportedError,
    ServerError,
    backoff_seconds,
    continuation_logprob,
    first_token_scores,
    retry_after_seconds,
)
from constitutional_ai.common.errors import ModelLoadError
from constitutional_ai.config import GenerationParams, ModelConfig, RunConfig
from constitutional_ai.data.store import read_records
from servers import FAULTS, FaultProxy, free_port, llama_server, llama_server_available

# -- pure functions -------------------------------------------------------------------------------


def test_retry_after_reads_seconds_milliseconds_and_http_dates():
    assert retry_after_seconds({"retry-after": "3"}) == 3.0
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    now = time.time()
    assert 9 <= retry_after_seconds({"retry-after": formatdate(now + 10, usegmt=True)}, now=now) <= 10
    assert retry_after_seconds({"retry-after": "soon"}) is None
    assert retry_after_seconds({}) is None
    assert retry_after_seconds({"retry-after": "86400"}) == 120.0  # capped


def test_backoff_is_jittered_exponential_and_capped():
    rng = random.Random(1)
    for attempt in range(12):
        waits = [backoff_seconds(attempt, rng) for _ in range(200)]
        bound = min(30.0, 0.5 * 2 ** attempt)
        assert all(0 <= w <= bound for w in waits)
        assert max(waits) > 0.8 * bound and len(set(waits)) > 150  # spread over the whole range


def test_continuation_logprob_counts_a_token_merged_across_the_boundary():
    # prompt "Hi th" + choice "ere": the server's token "there" straddles the boundary.
    lp = {"tokens": ["Hi", " there", "!"], "token_logprobs": [None, -1.5, -0.5], "text_offset": [0, 2, 8]}
    assert continuation_logprob(lp, start=5, end=8) == -1.5  # "!" is the generated token, left out
    assert continuation_logprob(lp, start=2, end=9) == -2.0
    # Offsets that skip special tokens (llama-cpp-python): walked back from the end of the echo instead.
    specials = {"tokens": ["", "Hi", " there", "!", "?"], "token_logprobs": [None, -0.1, -1.5, -0.5, -9.0],
                "text_offset": [0, 0, 2, 8, 9]}
    echoed = "<s>Hi there!?"  # "?" is the generated token
    assert continuation_logprob(specials, start=8, end=12, echoed=echoed) == -2.0  # "ere!", " there" straddles
    assert continuation_logprob(specials, start=11, end=12, echoed=echoed) == -0.5
    # A generated token whose text is not in the reply (a partial UTF-8 byte): usage.completion_tokens decides.
    assert continuation_logprob(specials, start=8, end=12, echoed="<s>Hi there!", generated_tokens=1) == -2.0
    with pytest.raises(ScoringUnsupportedError):
        continuation_logprob({"tokens": ["x"], "token_logprobs": [None], "text_offset": [0]}, 0, 1)
    with pytest.raises(ScoringUnsupportedError):
        continuation_logprob({}, 0, 1)


def test_first_token_scores_take_the_longest_matching_candidate_and_floor_the_rest():
    top = {"A": -0.2, "A)": -0.1, "B": -1.9, "C": -3.0}
    assert first_token_scores(top, ["A)", "B)", "D)"]) == [-0.1, -1.9, -3.0]


# -- protocol behaviour against a scripted server -------------------------------------------------


class _Scripted:
    """A minimal OpenAI-style server that answers from a script; records what it received."""

    def __init__(self, script):
        self.script, self.seen = script, []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _reply(self):
                size = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(size)) if size else None
                # the headers as received: names are case-insensitive (the SDK sends them lower-case)
                owner.seen.append((self.command, self.path, self.headers, body))
                status, payload, headers = owner.script(self.path, body, len(owner.seen))
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _reply

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


MODELS = {"data": [{"id": "m", "max_model_len": 512}]}


def _completion(text="ok"):
    return {"choices": [{"text": text, "finish_reason": "stop"}], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}


def _config(url, **kw):
    return ModelConfig(backend="openai", base_url=url, model_name_or_path="m", max_retries=4, **kw)


def test_retries_honour_retry_after_and_send_the_key_only_in_the_header(monkeypatch):
    monkeypatch.setenv("CAI_TEST_KEY", "sk-very-secret")
    calls = {"n": 0}

    def script(path, body, n):
        if path.endswith("/models"):
            return 200, MODELS, {}
        calls["n"] += 1
        if calls["n"] == 1:
            return 429, {"error": {"message": "rate"}}, {"Retry-After": "1"}
        if calls["n"] == 2:
            return 503, {"error": {"message": "busy"}}, {}
        return 200, _completion(f"seed={body['seed']}"), {}

    server = _Scripted(script)
    backend = OpenAIBackend(_config(server.url, api_key_env="CAI_TEST_KEY"))
    try:
        assert backend.context_length == 512 and backend.model_id == "m"
        start = time.perf_counter()
        out = backend.generate(["Hello"], GenerationParams(max_new_tokens=4), seeds=[7])
        assert time.perf_counter() - start >= 1.0  # waited as Retry-After asked
        assert out[0].text == "seed=7" and out[0].finish_reason == "stop"
        assert backend.stats["retry: HTTP 429"] == 1 and backend.stats["retry: HTTP 503"] == 1
        assert all(h.get("Authorization") == "Bearer sk-very-secret" for _, _, h, _ in server.seen)
        assert all("sk-very-secret" not in json.dumps(b) for *_, b in server.seen)
    finally:
        backend.close()
        server.close()


def test_a_rejected_key_names_the_variable_and_never_the_key(monkeypatch):
    monkeypatch.setenv("CAI_TEST_KEY", "sk-very-secret")

    def script(path, body, n):
        if path.endswith("/models"):
            return 200, MODELS, {}
        return 401, {"error": {"message": "bad key sk-very-secret"}}, {}

    server = _Scripted(script)
    backend = OpenAIBackend(_config(server.url, api_key_env="CAI_TEST_KEY"))
    try:
        with pytest.raises(ServerError) as err:
            backend.generate(["Hello"], GenerationParams(max_new_tokens=4))
        message = str(err.value)
        assert "CAI_TEST_KEY" in message and "sk-very-secret" not in message and "\n" not in message
        assert len([s for s in server.seen if s[1].endswith("/completions")]) == 1  # a 401 is not retried
    finally:
        backend.close()
        server.close()


def test_gives_up_after_max_retries_with_one_line(monkeypatch):
    monkeypatch.setattr("constitutional_ai.backends.openai_backend.BACKOFF_BASE", 0.01)
    server = _Scripted(lambda path, body, n: (200, MODELS, {}) if path.endswith("/models") else (500, {}, {}))
    backend = OpenAIBackend(_config(server.url))
    try:
        with pytest.raises(ServerError, match="gave up after 5 attempts"):
            backend.generate(["Hello"], GenerationParams(max_new_tokens=4))
    finally:
        backend.close()
        server.close()


def test_malformed_replies_and_a_long_retry_after_are_retried_where_the_sdk_would_not(monkeypatch):
    # The SDK decodes a body only after its retry loop, and refuses to retry when Retry-After exceeds 120 s.
    monkeypatch.setattr("constitutional_ai.backends.openai_backend.MAX_RETRY_AFTER", 0.3)
    replies = iter([(200, b'{"choices": [{"te', {}),  # truncated JSON with a matching length
                    (200, {"error": "proxy says no"}, {}),  # JSON, but no completion
                    (429, {}, {"Retry-After": "86400"}),  # a day: waited as long as the cap
                    (200, _completion("fine"), {})])
    server = _Scripted(lambda path, body, n: (200, MODELS, {}) if path.endswith("/models") else next(replies))
    backend = OpenAIBackend(_config(server.url))
    try:
        start = time.perf_counter()
        assert backend.generate(["Hello"], GenerationParams(max_new_tokens=4))[0].text == "fine"
        assert 0.3 <= time.perf_counter() - start < 10
        assert backend.stats["retry: malformed JSON"] == 1 and backend.stats["retry: reply without 'choices'"] == 1
        assert backend.stats["retry: HTTP 429"] == 1 and backend.stats["requests"] == 5  # /models and 4 tries
    finally:
        backend.close()
        server.close()


def test_only_transient_statuses_are_retried():
    # The SDK would retry a 501 (it retries every 5xx) and give up on a 425 at once; we do the opposite.
    replies = iter([(425, {"error": {"message": "too early"}}, {}), (501, {"error": {"message": "no such thing"}}, {})])
    server = _Scripted(lambda path, body, n: (200, MODELS, {}) if path.endswith("/models") else next(replies))
    backend = OpenAIBackend(_config(server.url))
    try:
        with pytest.raises(ServerError, match="HTTP 501: no such thing"):
            backend.generate(["Hello"], GenerationParams(max_new_tokens=4))
        assert backend.stats["retry: HTTP 425"] == 1 and len(server.seen) == 3
    finally:
        backend.close()
        server.close()


def test_requests_in_flight_never_exceed_max_concurrency():
    active, peak, lock = [0], [0], Lock()

    def script(path, body, n):
        if path.endswith("/models"):
            return 200, MODELS, {}
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.2)
        with lock:
            active[0] -= 1
        return 200, _completion(), {}

    server = _Scripted(script)
    backend = OpenAIBackend(_config(server.url, max_concurrency=2))
    try:
        assert len(backend.generate(["Hello"] * 6, GenerationParams(max_new_tokens=4))) == 6
        assert peak[0] == 2
    finally:
        backend.close()
        server.close()


def test_credentials_the_sdk_reads_from_its_own_environment_never_reach_the_server(monkeypatch):
    for name, value in {"OPENAI_API_KEY": "sk-openai", "OPENAI_ADMIN_KEY": "sk-admin", "OPENAI_ORG_ID": "org-x",
                        "OPENAI_PROJECT_ID": "proj-x", "OPENAI_CUSTOM_HEADERS": "Authorization: Bearer sk-x"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("CAI_UNSET_KEY", raising=False)
    server = _Scripted(lambda path, body, n: (200, MODELS, {}) if path.endswith("/models") else
                       (200, _completion(), {}))
    backend = OpenAIBackend(_config(server.url, api_key_env="CAI_UNSET_KEY"))
    try:
        backend.generate(["Hello"], GenerationParams(max_new_tokens=4))
        backend.count_tokens(["Hello"])  # the tokenize probes are plain SDK posts
        assert len(server.seen) > 2
        for _, _, headers, _ in server.seen:
            assert all(headers.get(h) is None for h in ("Authorization", "OpenAI-Organization", "OpenAI-Project"))
    finally:
        backend.close()
        server.close()


def test_a_server_without_logprobs_gets_a_clear_error():
    server = _Scripted(lambda path, body, n: (200, MODELS, {}) if path.endswith("/models") else
                       (200, _completion(), {}))
    backend = OpenAIBackend(_config(server.url))
    try:
        with pytest.raises(ScoringUnsupportedError, match="neither prompt log-probabilities"):
            backend.score_choices(["Q: "], [[" (A)", " (B)"]])
    finally:
        backend.close()
        server.close()


def test_no_server_is_a_one_line_load_error():
    with pytest.raises(ModelLoadError, match="no OpenAI-compatible server answers"):
        OpenAIBackend(ModelConfig(backend="openai", base_url=f"http://127.0.0.1:{free_port()}/v1", max_retries=0))


def test_config_requires_a_base_url():
    with pytest.raises(ValueError, match="base_url"):
        ModelConfig(backend="openai")


# -- a real server: llama.cpp on a GGUF export ------------------------------------------------------

needs_llama = pytest.mark.skipif(llama_server_available() is not None, reason=str(llama_server_available()))


@pytest.fixture(scope="module")
def raw_gguf(tiny_model_dir, tmp_path_factory):
    from constitutional_ai.models.gguf import export_llama_gguf

    return export_llama_gguf(tiny_model_dir, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def raw_server(raw_gguf, tmp_path_factory):
    with llama_server(raw_gguf, log_path=tmp_path_factory.mktemp("logs") / "server.log") as url:
        yield url


@needs_llama
def test_llama_server_scores_agree_with_transformers(raw_server, tiny_model_dir):
    from constitutional_ai.backends.transformers_backend import TransformersBackend

    served = OpenAIBackend(ModelConfig(backend="openai", base_url=raw_server, chat_format="raw",
                                       extra_body={"repeat_penalty": 1.0}))  # llama.cpp's default is 1.1
    local = TransformersBackend(ModelConfig(model_name_or_path=str(tiny_model_dir), device="cpu"))
    prompts = ["\n\nHuman: Which is kinder?\n\nAssistant: The answer is:", "The weather today is"]
    choices = [[" (A)", " (B)"], [" sunny", " cold and wet"]]
    try:
        assert served.model_id == "tiny" and served.style == "raw"
        remote, reference = served.score_choices(prompts, choices), local.score_choices(prompts, choices)
        for r_row, l_row in zip(remote, reference, strict=True):
            assert r_row == pytest.approx(l_row, abs=2e-3)  # the GGUF export is the same model
        assert served.count_tokens(prompts) == local.count_tokens(prompts)  # via the server's /tokenize
        greedy = GenerationParams(max_new_tokens=12, temperature=0.0)
        # The same tokens; llama.cpp drops bytes that are not valid UTF-8 where transformers writes U+FFFD.
        assert [g.text for g in served.generate(prompts, greedy)] == [
            g.text.replace("\ufffd", "") for g in local.generate(prompts, greedy)]
    finally:
        served.close()
        local.close()


@needs_llama
def test_top_logprobs_mode_scores_the_first_distinct_token(raw_server, tiny_model_dir):
    import torch

    from constitutional_ai.backends.transformers_backend import TransformersBackend

    local = TransformersBackend(ModelConfig(model_name_or_path=str(tiny_model_dir), device="cpu"))
    prompt = "\n\nHuman: Which is kinder?\n\nAssistant: The answer is: ("
    ids = local.tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        top = local.model(ids).logits[0, -1].log_softmax(-1).topk(10)
    # the two likeliest next tokens that are whole characters (a lone UTF-8 byte has no text to match)
    likely = [(local.tokenizer.decode([int(i)]), float(v)) for i, v in zip(top.indices, top.values, strict=True)]
    likely = [(text, value) for text, value in likely if text and "\ufffd" not in text][:2]
    choices, expected = [text for text, _ in likely], [value for _, value in likely]
    served = OpenAIBackend(ModelConfig(backend="openai", base_url=raw_server, chat_format="raw",
                                       logprobs_mode="top_logprobs"))
    try:
        scores = served.score_choices([prompt[:-1]], [["(" + c for c in choices]])[0]  # "(" is shared
        assert scores == pytest.approx(expected, abs=2e-3)
    finally:
        served.close()
        local.close()


def _stage_config(tmp_path: Path, url: str, name: str, **overrides) -> RunConfig:
    base = {"output_dir": str(tmp_path / name), "progress": False, "prompts.limit": 6,
            "policy.backend": "openai", "policy.base_url": url, "policy.chat_format": "raw",
            "policy.request_timeout": 4.0, "policy.max_retries": 12, "policy.max_concurrency": 4,
            "policy.api_key_env": "CAI_TEST_KEY", "policy.max_context": 2048,
            "critique.n_rounds": 2, "critique.generation.max_new_tokens": 16, "critique.batch_size": 3,
            "pairs.generation.max_new_tokens": 12, "feedback.batch_size": 4, "feedback.few_shot": 1}
    return RunConfig().with_overrides({**base, **overrides})


def _texts(path: Path) -> dict[str, str]:
    return {r["key"]: json.dumps({k: v for k, v in r.items() if k not in ("seconds", "timings")}, sort_keys=True)
            for r in read_records(path)}


@needs_llama
def test_critique_and_labels_through_a_faulty_proxy_match_a_clean_run(raw_server, tmp_path, monkeypatch):
    from constitutional_ai.stages.critique import run_critique
    from constitutional_ai.stages.feedback import run_label, run_sample_pairs

    monkeypatch.setenv("CAI_TEST_KEY", "sk-never-in-artifacts")
    clean = _stage_config(tmp_path, raw_server, "clean")
    critique = run_critique(clean)
    pairs = run_sample_pairs(clean)
    labels = run_label(clean)
    assert critique.written == 6 and pairs.written == 6 and labels.written == 6

    # llama.cpp's server runs one request at a time and finishes one whose client timed out, so a
    # timeout shorter than a queue of real requests would feed a retry storm: "slow" waits 5 s, twice that.
    faults = [f for fault in FAULTS[1:] for f in ("ok", "ok", fault)]  # a third of all requests fail
    with FaultProxy(raw_server, pattern=faults, slow_seconds=5.0) as proxy:
        faulty = _stage_config(tmp_path, proxy.url, "faulty")
        for run in (run_critique, run_sample_pairs, run_label):
            run(faulty)
    assert all(proxy.injected[f] > 0 for f in ("drop", "500", "429", "truncated", "slow", "cut")), proxy.injected
    for stage in ("critique", "pairs", "labels"):
        got, want = _texts(tmp_path / "faulty" / stage / "records.jsonl"), _texts(tmp_path / "clean" / stage /
                                                                                   "records.jsonl")
        lines = (tmp_path / "faulty" / stage / "records.jsonl").read_text().splitlines()
        assert len(lines) == len(got) == len(want) and got.keys() == want.keys()  # every record exactly once
        if stage != "labels":  # labels are floats: equal to rounding
            assert got == want
    clean_p = [r["p_a"] for r in read_records(tmp_path / "clean" / "labels" / "records.jsonl")]
    faulty_p = [r["p_a"] for r in read_records(tmp_path / "faulty" / "labels" / "records.jsonl")]
    assert faulty_p == pytest.approx(clean_p, abs=1e-6)
    for path in (tmp_path / "clean").rglob("*"):
        if path.is_file():
            assert "sk-never-in-artifacts" not in path.read_text(errors="ignore"), path


@needs_llama
def test_chat_model_generates_through_the_template_and_scores_with_a_local_tokenizer(tiny_chat_model_dir,
                                                                                     tmp_path):
    from constitutional_ai.backends.transformers_backend import TransformersBackend
    from constitutional_ai.models.gguf import export_llama_gguf

    gguf = export_llama_gguf(tiny_chat_model_dir, tmp_path / "chat.gguf")
    local = TransformersBackend(ModelConfig(model_name_or_path=str(tiny_chat_model_dir), device="cpu"))
    with llama_server(gguf, log_path=tmp_path / "server.log") as url:
        bare = OpenAIBackend(ModelConfig(backend="openai", base_url=url))
        served = OpenAIBackend(ModelConfig(backend="openai", base_url=url, tokenizer=str(tiny_chat_model_dir)))
        try:
            conversation = [{"role": "user", "content": "Tell me about the weather."}]
            assert bare.style == served.style == "chat"
            out = bare.generate([conversation], GenerationParams(max_new_tokens=8, temperature=0.0))
            assert out[0].completion_tokens > 0
            with pytest.raises(ScoringUnsupportedError, match="--tokenizer"):
                bare.score_choices([conversation], [["The answer is: (A)", "The answer is: (B)"]])
            choices = [["The answer is: (A)", "The answer is: (B)"]]
            # llama.cpp puts BOS before any /completions text, the chat template here has none; the
            # reference is therefore the rendered text as a plain string, which gets BOS too.
            rendered = local.format(conversation)
            assert served.score_choices([conversation], choices)[0] == pytest.approx(
                local.score_choices([rendered], choices)[0], abs=5e-3)
        finally:
            bare.close()
            served.close()
            local.close()
