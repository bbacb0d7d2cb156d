"""LLM judges that decide: likelihood verdicts (a local causal LM scoring the two verdict words, an
OpenAI-compatible server's top_logprobs, and the warned fallback to generation where a server returns none),
and the hybrid judge (rules first, the LLM only where they abstain) with its shares in stats.json."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from openai_server_for_tests import LoopbackServer, chat_reply

from lightning_veripo.records import Rollout, VideoQARecord
from lightning_veripo.tiny import make_tiny_causal_lm
from lightning_veripo.verifier import JudgeItem, JudgeUnavailableError, RuleJudge, Verdict, run_verifier
from lightning_veripo.verifier.llm_judges import HybridJudge, OpenAIJudge, TransformersJudge
from lightning_veripo.verifier.run import read_pairs, read_rollouts, read_verdicts

OPTIONS = ("A. red", "B. green", "C. blue", "D. yellow")


def item(think: str | None, answer: str | None, question: str = "What colour is the square?") -> JudgeItem:
    completion = (f"<think>{think}</think>" if think is not None else "") + (
        f"<answer>{answer}</answer>" if answer is not None else ""
    )
    return JudgeItem("q1", question, OPTIONS, think, answer, completion, "multiple choice")


# --- TransformersJudge, likelihood mode -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_causal_lm(tmp_path_factory.mktemp("judge_lm"), seed=0)


ITEMS = [
    item("So the answer is B.", "B"),
    item("The square is green in every frame; wait, it turns red later, so the answer is A.", "B"),
    item("I see blue.", "C"),
]


def test_likelihood_mode_decides_every_item_with_a_probability(tiny_lm):
    judge = TransformersJudge(str(tiny_lm), mode="likelihood", batch_size=2, device="cpu")
    verdicts = judge.judge([*ITEMS, item("no answer tag here", None)])
    for v in verdicts[:3]:
        assert 0.0 < v.probability < 1.0
        assert v.consistent is (v.probability > 0.5), "decides for the likelier verdict"
        assert v.rationale.startswith(("consistent: P(consistent)=", "inconsistent: P(consistent)="))
        assert "log p(CONSISTENT)=" in v.raw and "log p(INCONSISTENT)=" in v.raw
    assert verdicts[3].consistent is None and verdicts[3].probability is None
    assert verdicts[3].rationale == "missing <answer>"
    assert Verdict.from_dict(verdicts[0].to_dict()) == verdicts[0], "the probability is in verdicts.jsonl"


def test_likelihood_matches_an_unpadded_forward_and_does_not_depend_on_the_batch(tiny_lm):
    judge = TransformersJudge(str(tiny_lm), mode="likelihood", batch_size=4, device="cpu")
    together = [v.probability for v in judge.judge(ITEMS)]
    alone = [judge.judge([it])[0].probability for it in ITEMS]
    assert together == pytest.approx(alone, abs=1e-5)
    # An independent computation: the full text of each verdict, unpadded, one row at a time.
    tok, model = judge._tokenizer, judge._model
    for it, p in zip(ITEMS, together, strict=True):
        prompt = judge._render(it)
        special = not getattr(tok, "chat_template", None)
        ids = {
            w: tok(prompt + w, add_special_tokens=special)["input_ids"]
            for w in ("CONSISTENT", "INCONSISTENT")
        }
        k = next(i for i, (a, b) in enumerate(zip(*ids.values(), strict=False)) if a != b)
        with torch.no_grad():
            logp = model(torch.tensor([ids["CONSISTENT"][:k]])).logits[0, -1].log_softmax(-1)
        diff = logp[ids["CONSISTENT"][k]] - logp[ids["INCONSISTENT"][k]]
        assert p == pytest.approx(1 / (1 + math.exp(-diff.item())), abs=1e-5)


def test_likelihood_abstains_below_the_confidence_threshold(tiny_lm):
    sure = TransformersJudge(str(tiny_lm), mode="likelihood", device="cpu").judge(ITEMS)
    confidence = [max(v.probability, 1 - v.probability) for v in sure]
    low, mid = sorted(confidence)[:2]
    threshold = (low + mid) / 2  # the least confident item falls below it, the others do not
    judge = TransformersJudge(str(tiny_lm), mode="likelihood", min_confidence=threshold, device="cpu")
    verdicts = judge.judge(ITEMS)
    for v, c in zip(verdicts, confidence, strict=True):
        assert (v.consistent is None) is (c < threshold)
        assert v.probability is not None, "an abstention keeps its probability"
    assert sum(v.consistent is None for v in verdicts) == 1
    assert "below min_confidence" in next(v.rationale for v in verdicts if v.consistent is None)


def test_transformers_judge_rejects_unknown_modes_and_thresholds(tiny_lm):
    with pytest.raises(ValueError, match="mode"):
        TransformersJudge(str(tiny_lm), mode="vote")
    with pytest.raises(ValueError, match="min_confidence"):
        TransformersJudge(str(tiny_lm), mode="likelihood", min_confidence=0.4)
    generate = TransformersJudge(str(tiny_lm), max_new_tokens=4, device="cpu")  # the default mode
    assert generate.mode == "generate" and generate.judge(ITEMS[:1])[0].probability is None


# --- OpenAIJudge, likelihood mode against a loopback server ----------------------------------------------------


class _Server(LoopbackServer):
    """An OpenAI-compatible server whose first-token top_logprobs come from the question text:
    'logprobs a=X b=Y' answers token 'CON' with log-prob X and 'IN' with Y (a missing one is left out, the rest of
    the list is 'The' at -9); any other question gets no logprobs, like `transformers serve`.

    Hand-written because `transformers serve` returns no logprobs, and the tiny random LM could not be made to
    list chosen ones; the protocol and its faults against the real server are at the end of this file."""

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[dict] = []

    def post(self, path: str, headers: object, body: dict) -> tuple[int, dict]:
        with self.lock:
            self.bodies.append(body)
        question = body["messages"][0]["content"].split("Question: ")[1].split("\n")[0]
        if question.startswith("logprobs") and body.get("logprobs"):
            given = dict(kv.split("=") for kv in question.split()[1:] if "=" in kv)
            top = [{"token": "The", "logprob": -9.0}]
            top += [
                {"token": t, "logprob": float(given[k])} for k, t in (("a", "CON"), ("b", "IN")) if k in given
            ]
            top.sort(key=lambda e: -e["logprob"])
            return 200, chat_reply(
                {"content": top[0]["token"]}, logprobs={"content": [{**top[0], "top_logprobs": top}]}
            )
        return 200, chat_reply({"content": "VERDICT: INCONSISTENT\nREASON: canned"})


@pytest.fixture
def server() -> Iterator[_Server]:
    with _Server() as srv:
        yield srv


def _judge(srv: _Server, **kw) -> OpenAIJudge:
    return OpenAIJudge(srv.url, "judge", timeout_s=2.0, backoff_s=0.01, **kw)


def test_openai_likelihood_reads_the_first_token_top_logprobs(server):
    judge = _judge(server, mode="likelihood", top_logprobs=5)
    questions = ["logprobs a=-0.5 b=-1.5", "logprobs a=-3 b=-0.2", "logprobs a=-1 b=-1.05"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a server that returns logprobs is not warned about
        verdicts = judge.judge([item("So the answer is B.", "B", question=q) for q in questions])
    expected = [1 / (1 + math.exp(-1.0)), 1 / (1 + math.exp(2.8)), 1 / (1 + math.exp(-0.05))]
    assert [v.probability for v in verdicts] == pytest.approx(expected, abs=1e-6)
    assert [v.consistent for v in verdicts] == [True, False, True]
    body = server.bodies[-1]
    assert body["logprobs"] is True and body["top_logprobs"] == 5 and body["max_tokens"] == 1
    assert (body["model"], body["temperature"]) == ("judge", 0.0)
    (message,) = body["messages"]
    assert message["role"] == "user"
    # the rollout the judge was given (server.bodies keeps arrival order: find this item's request by question)
    (asked,) = [
        b["messages"][0]["content"] for b in server.bodies if "a=-1 b=-1.05" in b["messages"][0]["content"]
    ]
    assert asked.endswith(  # delimited as in generation mode (tests/test_judges.py writes out the whole prompt)
        "Question: logprobs a=-1 b=-1.05\nOptions:\nA. red\nB. green\nC. blue\nD. yellow\n\n"
        "<rollout_reasoning>\nSo the answer is B.\n</rollout_reasoning>\n\n<rollout_answer>\nB\n</rollout_answer>\n\n"
        "Does the reasoning lead to this final answer? Reply with one word: CONSISTENT or INCONSISTENT."
    )

    strict = _judge(server, mode="likelihood", min_confidence=0.6)
    (close,) = strict.judge([item("So the answer is B.", "B", question=questions[2])])
    assert close.consistent is None and close.probability == pytest.approx(expected[2], abs=1e-6)


def test_openai_likelihood_bounds_a_verdict_missing_from_the_top_list_and_abstains_when_both_are(server):
    judge = _judge(server, mode="likelihood")
    only_con, neither = judge.judge(
        [item("So B.", "B", question="logprobs a=-0.1"), item("So B.", "B", question="logprobs none")]
    )
    # 'IN' is not listed: its log-prob is at most the lowest listed one (-9), so P(consistent) is at least this.
    assert only_con.consistent is True and only_con.probability == pytest.approx(1 / (1 + math.exp(-8.9)))
    assert neither.consistent is None and "neither verdict" in neither.rationale


def test_openai_likelihood_warns_once_and_falls_back_to_generation_without_logprobs(server):
    judge = _judge(server, mode="likelihood", max_concurrency=4)
    with pytest.warns(UserWarning, match="returned no logprobs") as record:
        first = judge.judge([item("So the answer is B.", "B", question=f"plain {i}") for i in range(4)])
        second = judge.judge([item("So the answer is B.", "B", question="plain again")])
    assert len([w for w in record if "logprobs" in str(w.message)]) == 1
    assert [v.consistent for v in first + second] == [False] * 5, "the generated VERDICT line decides"
    assert all(v.probability is None and "no logprobs" in v.rationale for v in first + second)
    # After the fallback is known, an item costs one request: the generation one.
    again = [b for b in server.bodies if "plain again" in b["messages"][0]["content"]]
    assert len(again) == 1 and not again[0].get("logprobs")


def test_openai_judge_rejects_unknown_modes():
    with pytest.raises(ValueError, match="mode"):
        OpenAIJudge("http://127.0.0.1:1/v1", "judge", mode="vote")


# --- HybridJudge ----------------------------------------------------------------------------------------------


class _RecordingJudge:
    """Stands in for an LLM judge: calls everything it is asked consistent, and remembers what it was asked."""

    name = "llm"

    def __init__(self) -> None:
        self.asked: list[str] = []

    def judge(self, items: list[JudgeItem]) -> list[Verdict]:
        self.asked += [i.reasoning or "" for i in items]
        return [Verdict(consistent=True, rationale="consistent: fake", judge=self.name) for _ in items]


def test_hybrid_asks_the_llm_only_where_the_rules_abstain():
    llm = _RecordingJudge()
    items = [
        item("In the video I see blue, so the answer is B.", "B"),  # rules: inconsistent
        item("So the answer is B.", "B"),  # rules: consistent
        item("Option B fits best.", "B"),  # rules: no conclusion
        item("no answer tag", None),  # nobody can judge it
    ]
    verdicts = HybridJudge(llm=llm).judge(items)
    assert llm.asked == ["Option B fits best."]
    assert [v.consistent for v in verdicts] == [False, True, True, None]
    assert [v.judge for v in verdicts] == ["rule", "rule", "llm", "rule"]
    assert verdicts[2].rationale == "rule: no conclusion in reasoning; llm: consistent: fake"
    assert HybridJudge(llm=llm).name == "hybrid:rule+llm"


def test_hybrid_keeps_the_rule_verdicts_when_the_llm_fails():
    class Broken:
        name = "broken"

        def judge(self, items):
            raise RuntimeError("CUDA out of memory")

    verdicts = HybridJudge(llm=Broken()).judge([item("So the answer is B.", "B"), item("Hmm.", "B")])
    assert verdicts[0].consistent is True and verdicts[1].consistent is None
    assert "CUDA out of memory" in verdicts[1].rationale


def _rollout(think: str, index: int) -> Rollout:
    record = VideoQARecord(
        "q1", "What colour?", "video", "multiple choice", "<answer>B</answer>", None, OPTIONS
    )
    completion = f"<think>{think}</think><answer>B</answer>"
    return Rollout(record, completion, [], {"accuracy": 1.0}, 1.0, 0.0, 1.0, False, 0, index)


def test_hybrid_shares_are_in_stats_json(tiny_lm, tmp_path):
    thinks = ["So the answer is B.", "I see blue, so the answer is B.", "Option B fits best.", "Hmm, B."]
    rollouts = [_rollout(t, i) for i, t in enumerate(thinks)]
    llm = TransformersJudge(str(tiny_lm), mode="likelihood", device="cpu")
    stats = run_verifier(rollouts, HybridJudge(llm=llm), None, tmp_path, progress=False)
    assert stats["judge"] == f"hybrid:rule+transformers:{tiny_lm}"
    assert stats["decided_by"] == {"rule": 0.5, f"transformers:{tiny_lm}": 0.5}
    assert json.loads((tmp_path / "stats.json").read_text())["decided_by"] == stats["decided_by"]
    lines = [json.loads(line) for line in (tmp_path / "verdicts.jsonl").read_text().splitlines()]
    assert [d["probability"] is not None for d in lines] == [False, False, True, True]

    rule_only = run_verifier(rollouts, RuleJudge(), None, tmp_path / "rule", progress=False)
    assert rule_only["decided_by"] == {"rule": 0.5} and rule_only["unjudged"] == 2


def test_stats_count_the_rollouts_lost_to_judge_errors(tmp_path):
    """`unjudged` mixes abstentions (the judge read the rollout and named no verdict) with rollouts a failing
    judge never read; `judge_errors` counts the latter, so a dead server shows in stats.json."""

    class Broken:
        name = "broken"

        def judge(self, items):
            raise RuntimeError("CUDA out of memory")

    rollouts = [_rollout(t, i) for i, t in enumerate(["So the answer is B.", "Option B fits.", "Hmm, B."])]
    rules = run_verifier(rollouts, RuleJudge(), None, tmp_path / "rules", progress=False)
    assert (rules["unjudged"], rules["judge_errors"]) == (2, 0), "an abstention is not an error"
    hybrid = run_verifier(rollouts, HybridJudge(llm=Broken()), None, tmp_path / "hybrid", progress=False)
    assert (hybrid["unjudged"], hybrid["judge_errors"]) == (2, 2), "the LLM failed on the two it was asked"
    assert json.loads((tmp_path / "hybrid" / "stats.json").read_text())["judge_errors"] == 2
    alone = run_verifier(rollouts, Broken(), None, tmp_path / "alone", progress=False)
    assert (alone["unjudged"], alone["judge_errors"]) == (3, 3), "the verifier's own catch counts too"


# --- OpenAIJudge against a real `transformers serve` on loopback --------------------------------------------
# The faults a real server produces are tested on one: a server that is not running (connection refused), one
# killed mid-run with requests in flight (connection reset), one restarted on the same port (retried). The
# hand-written loopback servers (above, test_judges.py, test_robustness.py) stay only for what `transformers
# serve` cannot be made to do: return top_logprobs, answer 5xx / 400 / malformed bodies, hang, trickle.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_transformers_serve(model_dir: Path, port: int, log: Path) -> subprocess.Popen:
    """`transformers serve` (extra transformers[serving]) serving `model_dir` on 127.0.0.1:`port`, returned
    once GET /v1/models answers (polled, 180 s at most); its stderr goes to `log`, quoted if it fails."""
    pytest.importorskip("fastapi", reason="transformers serve needs the extra transformers[serving]")
    pytest.importorskip("uvicorn", reason="transformers serve needs the extra transformers[serving]")
    exe = shutil.which("transformers") or str(Path(sys.executable).with_name("transformers"))
    with open(log, "ab") as err:
        proc = subprocess.Popen(
            [exe, "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
    url = f"http://127.0.0.1:{port}/v1/models"
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                _stop(proc)
                tail = log.read_text(errors="replace")[-2000:]
                pytest.fail(f"transformers serve did not come up on {url}: {tail}")
            time.sleep(0.5)


def _stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def served_tiny_lm(
    tiny_lm: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, subprocess.Popen]]:
    """One `transformers serve` of the tiny causal LM, for the tests that leave it running."""
    port = _free_port()
    proc = _start_transformers_serve(tiny_lm, port, tmp_path_factory.mktemp("serve") / "serve.log")
    try:
        yield f"http://127.0.0.1:{port}/v1", proc
    finally:
        _stop(proc)


@pytest.fixture
def serve_tiny_lm(tiny_lm: Path, tmp_path: Path) -> Iterator[Callable[[int], subprocess.Popen]]:
    """Starts a `transformers serve` of the tiny causal LM on a given port, for a test that kills it; every
    server it started is stopped at teardown."""
    started: list[subprocess.Popen] = []

    def start(port: int) -> subprocess.Popen:
        proc = _start_transformers_serve(tiny_lm, port, tmp_path / f"serve-{port}-{len(started)}.log")
        started.append(proc)
        return proc

    yield start
    for proc in started:
        _stop(proc)


@pytest.mark.slow
def test_openai_judge_against_transformers_serve(served_tiny_lm, tiny_lm):
    url, _ = served_tiny_lm
    model = str(tiny_lm)
    judge = OpenAIJudge(url, model, max_tokens=8, max_concurrency=4, timeout_s=60.0, backoff_s=0.05)
    judge.check_server()  # GET /models answers
    items = [item(f"So the answer is {c}.", "B") for c in "ABCD"]
    verdicts = judge.judge(items)  # concurrently: 4 requests in flight
    # A random tiny LM writes no VERDICT line: each rollout is unjudged *because of the text*, not an error.
    assert [v.consistent for v in verdicts] == [None] * 4
    assert all(v.rationale.startswith("unjudged: no VERDICT line") for v in verdicts), verdicts[0].rationale

    likely = OpenAIJudge(url, model, mode="likelihood", max_tokens=8, timeout_s=60.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        answers = likely.judge(items[:2])
    returned_logprobs = all(v.probability is not None for v in answers)
    if not returned_logprobs:  # transformers serve ignores logprobs: one warning, then generation
        assert sum("returned no logprobs" in str(w.message) for w in caught) == 1
        assert all("no logprobs" in v.rationale for v in answers)


def _until(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    """Poll `condition` until it holds; AssertionError naming `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout_s} s in vain until {what}")
        time.sleep(0.01)


def _unread_connections(port: int) -> int:
    """Connections to 127.0.0.1:`port` holding bytes the server has not read: the server side's ESTABLISHED
    sockets in /proc/net/tcp with a non-empty receive queue (a frozen server's wait in its accept queue)."""
    suffix, count = f":{port:04X}", 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, _, state, queues = line.split()[1:5]
        count += local.endswith(suffix) and state == "01" and int(queues.split(":")[1], 16) > 0
    return count


_CLIP = re.compile(r"clip (\d+)\.")


class _ServerDiesMidRun:
    """Makes a real server die at a fixed point of an `OpenAIJudge` run, however the judge's threads run.

    It wraps the judge's `_request` (one HTTP attempt; `_with_retries` above it is the code under test). The
    first `answered_before` POSTs go through; later ones wait at a gate. When the last of those has its
    answer, all the other workers' POSTs are waiting there: the server is frozen (SIGSTOP), they are let
    through to it (polled: as many connections to its port holding unread bytes), and it is killed (SIGKILL),
    so they are reset mid-request and every later attempt is refused. With `restart`, the first attempt that
    fails starts a new server on the same port, and every failed attempt waits until it answers before the
    judge may retry. A POST is tied to its rollout by the "clip N." in the reasoning it carries.
    """

    def __init__(
        self,
        judge: OpenAIJudge,
        proc: subprocess.Popen,
        port: int,
        answered_before: int,
        restart: Callable[[], subprocess.Popen] | None = None,
    ) -> None:
        self.judge, self.proc, self.port, self.restart = judge, proc, port, restart
        self.answered_before = answered_before
        self.real_request = judge._request
        judge._request = self._request  # type: ignore[method-assign]
        self.lock = threading.Lock()
        self.tickets = self.held = 0
        self.gate = threading.Event()  # opened once the server is frozen
        self.answered: list[int] = []  # the clips the first server answered
        self.answered_after: list[int] = []  # the clips answered after the kill (by a restarted server)
        self.failures: list[tuple[int, bool, Exception]] = []  # (clip, held at the gate, error) per attempt
        self.restarting = False
        self.restarted = threading.Event()
        self.new_proc: subprocess.Popen | None = None
        self.problems: list[str] = []  # what went wrong in the instrumentation itself

    def _request(self, method: str, path: str, body: bytes | None) -> bytes:
        if method != "POST" or body is None:
            return self.real_request(method, path, body)
        clip = int(_CLIP.search(json.loads(body)["messages"][0]["content"]).group(1))
        with self.lock:
            first_server = self.tickets < self.answered_before
            self.tickets += 1
            held = not first_server and not self.gate.is_set()
            self.held += held
        if held and not self.gate.wait(120):
            self.problems.append(f"clip {clip}: the gate never opened")
        try:
            answer = self.real_request(method, path, body)
        except Exception as err:
            with self.lock:
                self.failures.append((clip, held, err))
            if self.restart is not None:
                self._restart_once()
            raise
        with self.lock:
            (self.answered if first_server else self.answered_after).append(clip)
            last = first_server and len(self.answered) == self.answered_before
        if last:
            self._kill()
        return answer

    def _kill(self) -> None:
        others = self.judge.max_concurrency - 1
        try:
            _until(lambda: self.held == others, f"the other {others} workers' POSTs wait at the gate")
            os.kill(self.proc.pid, signal.SIGSTOP)
            self.gate.set()
            _until(lambda: _unread_connections(self.port) >= others, "the held POSTs reach the frozen server")
        except AssertionError as err:
            self.problems.append(str(err))
        finally:
            self.gate.set()
            _stop(self.proc)

    def _restart_once(self) -> None:
        with self.lock:
            first, self.restarting = not self.restarting, True
        if first:
            try:
                self.new_proc = self.restart()  # type: ignore[misc]
            except BaseException as err:
                self.problems.append(f"the restart failed: {err}")
                raise
            finally:
                self.restarted.set()
        elif not self.restarted.wait(240):
            self.problems.append("the restarted server never answered")


N_ROLLOUTS, ANSWERED_BEFORE_KILL, CONCURRENCY = 16, 6, 4


def _clip_rollouts(n: int) -> list[Rollout]:
    # "Option X fits" states no conclusion the rules can read: a HybridJudge asks its LLM about every one.
    return [_rollout(f"Option {'ABCD'[i % 4]} fits, clip {i}.", i) for i in range(n)]


def _judge_dying_mid_run(serve, tiny_lm: Path, restart: bool) -> tuple[OpenAIJudge, _ServerDiesMidRun, str]:
    if not Path("/proc/net/tcp").exists():
        pytest.skip("tells requests in flight from /proc/net/tcp (Linux)")
    port = _free_port()
    proc = serve(port)
    url = f"http://127.0.0.1:{port}/v1"
    judge = OpenAIJudge(
        url,
        str(tiny_lm),
        max_tokens=8,
        max_concurrency=CONCURRENCY,
        timeout_s=60.0,
        max_retries=1,
        backoff_s=0.05,
    )
    dies = _ServerDiesMidRun(
        judge, proc, port, ANSWERED_BEFORE_KILL, restart=(lambda: serve(port)) if restart else None
    )
    return judge, dies, url


def _whole_files(out: Path, stats: dict) -> list[dict]:
    """The verifier's files are whole JSON, one verdict per rollout; the verdicts, by sample_index."""
    assert json.loads((out / "stats.json").read_text()) == stats
    assert read_pairs(out / "pairs.jsonl") == [] and stats["pairs"] == 0, "nothing judged, nothing chosen"
    assert [r.sample_index for r in read_rollouts(out / "rollouts.jsonl")] == list(range(N_ROLLOUTS))
    verdicts = read_verdicts(out / "verdicts.jsonl")
    assert [v["sample_index"] for v in verdicts] == list(range(N_ROLLOUTS))
    assert all(v["consistent"] is None for v in verdicts)
    return verdicts


@pytest.mark.slow
def test_transformers_serve_killed_mid_run_loses_the_rest_to_clear_errors_and_files_stay_whole(
    serve_tiny_lm, tiny_lm, tmp_path
):
    judge, dies, url = _judge_dying_mid_run(serve_tiny_lm, tiny_lm, restart=False)
    rollouts = _clip_rollouts(N_ROLLOUTS)
    stats = run_verifier(rollouts, judge, None, tmp_path, progress=False)  # nothing raises out of it

    assert dies.problems == []
    answered = set(dies.answered)
    assert len(answered) == ANSWERED_BEFORE_KILL and dies.answered_after == []
    in_flight = [err for _, held, err in dies.failures if held]
    assert len(in_flight) == CONCURRENCY - 1, "every other worker had a POST at the server when it died"
    assert all(isinstance(err, ConnectionResetError) for err in in_flight), in_flight
    lost = [i for i in range(N_ROLLOUTS) if i not in answered]
    assert Counter(clip for clip, _, _ in dies.failures) == dict.fromkeys(lost, 2), "max_retries + 1 tries"

    verdicts = _whole_files(tmp_path, stats)
    for v in verdicts:
        if v["sample_index"] in answered:  # the server's answer stands: its text named no verdict
            assert v["rationale"].startswith("unjudged: no VERDICT line"), v
        else:
            assert v["rationale"].startswith("judge error after 2 attempts: URLError:"), v
            assert "Connection refused" in v["rationale"], v
    assert (stats["num_rollouts"], stats["judged"], stats["unjudged"]) == (N_ROLLOUTS, 0, N_ROLLOUTS)
    assert stats["judge_errors"] == len(lost), "stats.json says how many rollouts the dead server lost"

    # The server stays dead. A run that checks it first fails loudly, naming the URL, and claims nothing...
    fresh = OpenAIJudge(url, str(tiny_lm), max_retries=1, backoff_s=0.01)
    with pytest.raises(
        JudgeUnavailableError, match=rf"no OpenAI-compatible server answers at {re.escape(url)} .*refused"
    ):
        run_verifier(rollouts, fresh, None, tmp_path / "checked", progress=False)
    assert not (tmp_path / "checked" / "stats.json").exists()
    # ...one that does not check loses what the rules leave to the LLM, counted as judge errors.
    unchecked = OpenAIJudge(url, str(tiny_lm), max_retries=1, backoff_s=0.01, check_on_start=False)
    some = [*rollouts[:3], _rollout("So the answer is B.", 3)]
    hybrid = run_verifier(some, HybridJudge(llm=unchecked), None, tmp_path / "hybrid", progress=False)
    assert (hybrid["judge_errors"], hybrid["decided_by"]) == (3, {"rule": 0.25})


@pytest.mark.slow
def test_transformers_serve_restarted_mid_run_is_retried_and_no_rollout_is_lost(
    serve_tiny_lm, tiny_lm, tmp_path
):
    judge, dies, _ = _judge_dying_mid_run(serve_tiny_lm, tiny_lm, restart=True)
    stats = run_verifier(_clip_rollouts(N_ROLLOUTS), judge, None, tmp_path, progress=False)

    assert dies.problems == []
    assert dies.new_proc is not None and dies.new_proc.poll() is None, "a new server answered the retries"
    assert len(dies.answered) == ANSWERED_BEFORE_KILL
    in_flight = [err for _, held, err in dies.failures if held]
    assert len(in_flight) == CONCURRENCY - 1 and all(isinstance(e, ConnectionResetError) for e in in_flight)
    # Every worker's attempt failed once (reset in flight, or refused while the new server started), then its
    # retry reached the new server; every rollout was answered exactly once, by one server or the other.
    failed = Counter(clip for clip, _, _ in dies.failures)
    assert len(failed) == CONCURRENCY and set(failed.values()) == {1}, failed
    assert sorted(dies.answered + dies.answered_after) == list(range(N_ROLLOUTS))
    assert set(failed) <= set(dies.answered_after)

    verdicts = _whole_files(tmp_path, stats)
    assert all(v["rationale"].startswith("unjudged: no VERDICT line") for v in verdicts), verdicts
    assert stats["judge_errors"] == 0, "no rollout lost to the restart"
