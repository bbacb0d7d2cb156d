"""Judges for the Rollout-Aware Verifier: does a rollout's reasoning actually lead to the answer it gives?

VerIPO (arXiv 2505.19000, Fig. 2) checks each rollout for length, consistency, repetition and accuracy; only
consistency needs a judge, which the paper calls "small LLMs". Three judges return the same `Verdict`: rules
(offline, deterministic, the default), a small local transformers model, and an OpenAI-compatible server
(vLLM, SGLang). Repetition, truncation and missing tags are rule checks every judge records the same way.
A judge that fails or answers garbage gives an *unjudged* verdict (`consistent=None`, the error or the raw
output kept), never a crash and never a silent "consistent"; only a judge that cannot start at all raises
`JudgeUnavailableError`.
"""

from __future__ import annotations

import http.client
import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple, Protocol, runtime_checkable

from lightning_veripo.parsing import extract_answer, extract_think, option_letters, parse_number
from lightning_veripo.records import Rollout


class JudgeUnavailableError(RuntimeError):
    """The judge cannot run at all (server unreachable, model directory missing): a configuration error."""


@dataclass(frozen=True)
class JudgeItem:
    """What a judge sees of one rollout: the question, the reasoning and the answer parsed out of it."""

    problem_id: str
    question: str
    options: tuple[str, ...]
    reasoning: str | None  # the <think> text; None when the tag is missing
    answer: str | None  # the <answer> text; None when the tag is missing
    completion: str
    problem_type: str = ""
    truncated: bool = False

    @classmethod
    def from_rollout(cls, rollout: Rollout) -> JudgeItem:
        return cls(
            problem_id=rollout.record.problem_id,
            question=rollout.record.problem,
            options=rollout.record.options,
            reasoning=extract_think(rollout.completion),
            answer=extract_answer(rollout.completion),
            completion=rollout.completion,
            problem_type=rollout.record.problem_type,
            truncated=rollout.truncated,
        )


@dataclass
class Verdict:
    """A judge's decision on one rollout and why. `consistent=None` means unjudged: never used as a good rollout."""

    consistent: bool | None
    repetitive: bool = False
    truncated: bool = False
    missing_tags: list[str] = field(default_factory=list)  # subset of ["think", "answer"]
    repeated_fraction: float = 0.0  # fraction of repeated word n-grams in the completion
    rationale: str = ""
    raw: str = ""  # the judge's raw output (LLM text, HTTP body), "" for the rule judge
    judge: str = ""
    latency_s: float = 0.0

    @property
    def judged(self) -> bool:
        return self.consistent is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Verdict:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@runtime_checkable
class Judge(Protocol):
    """Anything that judges a batch of rollouts, one `Verdict` per item, in order."""

    def judge(self, items: list[JudgeItem]) -> list[Verdict]: ...


def repeated_ngram_fraction(text: str, n: int) -> float:
    """1 - unique/total over the word n-grams of `text`: ~0 for prose, near 1 for a model stuck in a loop."""
    words = re.findall(r"\w+", text.lower())
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


class _Decision(NamedTuple):
    consistent: bool | None
    rationale: str
    raw: str
    latency_s: float


class _RolloutJudge:
    """Shared skeleton: rule checks for every item, the consistency decision only for items that have both
    tags, and any exception inside a batch turned into unjudged verdicts for that batch."""

    name = "judge"
    batch_size: int | None = None  # items per `_decide` call; None = all at once

    def __init__(self, repetition_ngram: int, repetition_threshold: float) -> None:
        if repetition_ngram < 1 or not 0.0 <= repetition_threshold <= 1.0:
            raise ValueError(
                f"{type(self).__name__}: repetition_ngram must be >= 1 and repetition_threshold in [0, 1], "
                f"got {repetition_ngram} and {repetition_threshold}"
            )
        self.repetition_ngram = repetition_ngram
        self.repetition_threshold = repetition_threshold

    def judge(self, items: list[JudgeItem]) -> list[Verdict]:
        verdicts = [self._rule_checks(item) for item in items]
        todo = [i for i, v in enumerate(verdicts) if not v.missing_tags]
        step = self.batch_size or max(len(todo), 1)
        for start in range(0, len(todo), step):
            chunk = todo[start : start + step]
            t0 = time.perf_counter()
            try:
                decisions = self._decide([items[i] for i in chunk])
                if len(decisions) != len(chunk):
                    raise RuntimeError(f"judge returned {len(decisions)} decisions for {len(chunk)} items")
            except JudgeUnavailableError:
                raise
            except Exception as err:  # a failing batch is recorded, never fatal (see module docstring)
                failed = _Decision(
                    None, f"judge error: {type(err).__name__}: {err}", "", time.perf_counter() - t0
                )
                decisions = [failed] * len(chunk)
            for i, d in zip(chunk, decisions, strict=True):
                v = verdicts[i]
                v.consistent, v.rationale, v.raw, v.latency_s = d.consistent, d.rationale, d.raw, d.latency_s
        return verdicts

    def _rule_checks(self, item: JudgeItem) -> Verdict:
        missing = [tag for tag, text in (("think", item.reasoning), ("answer", item.answer)) if text is None]
        fraction = repeated_ngram_fraction(item.completion, self.repetition_ngram)
        return Verdict(
            consistent=None,
            repetitive=fraction > self.repetition_threshold,
            truncated=item.truncated,
            missing_tags=missing,
            repeated_fraction=round(fraction, 6),
            rationale="missing " + " and ".join(f"<{t}>" for t in missing) if missing else "",
            judge=self.name,
        )

    def _decide(self, items: list[JudgeItem]) -> list[_Decision]:
        raise NotImplementedError


# --- rule judge -------------------------------------------------------------------------------------------

# Phrases after which a reasoning states its conclusion. "Strong" cues name the answer; adverbs conclude a
# step; copulas ("... is 3") only count for numbers, where a stated value is unambiguous.
_STRONG = (
    r"\b(?:answer|option|choice)\s*(?:is|should be|would be|must be|will be|[:=])"
    r"|\bi\s+(?:would\s+|will\s+)?(?:choose|pick|select|go with)\b|\b(?:i|we)\s+conclude(?:\s+that)?\b"
)
_ADVERB = r"\b(?:so|therefore|thus|hence|consequently)\b"
_COPULA = r"\b(?:is|are|was|were|equals|makes|gives)\b|="
_CUES = {
    "choice": re.compile(f"(?P<strong>{_STRONG})|{_ADVERB}", re.I),
    "number": re.compile(f"(?P<strong>{_STRONG})|{_ADVERB}|{_COPULA}", re.I),
    "text": re.compile(f"(?P<strong>{_STRONG})", re.I),
}
_SENTENCE_END = re.compile(r"(?<!\d)\.|\.(?!\d)|[!?;\n]")
_OPTION_LABEL = re.compile(r"^\s*\(?([A-Z])\s*[.):]\s*(.*)$", re.S)


def _normalise(text: str) -> str:
    text = re.sub(r"[^\w\s]", " ", text.lower())
    return " ".join(w for w in text.split() if w not in {"a", "an", "the"})


def _answer_kind(item: JudgeItem) -> str:
    if item.options or item.problem_type == "multiple choice":
        return "choice"
    return "number" if item.problem_type in ("numerical", "regression") else "text"


def _options_by_letter(options: tuple[str, ...]) -> dict[str, str]:
    """'A. red' -> {'A': 'red'}; unlabelled options are lettered A, B, ... in order."""
    out = {}
    for i, opt in enumerate(options):
        m = _OPTION_LABEL.match(opt)
        letter, text = (m.group(1), m.group(2)) if m else (chr(ord("A") + i), opt)
        out[letter] = _normalise(text)
    return out


def _choice_in(text: str, options: dict[str, str], strong: bool = True) -> str | None:
    """The option a phrase names: its first standalone option letter, else the one option whose text it contains.
    After a weak cue ("so I compared A and C") a phrase naming several letters names none."""
    letters = option_letters(text, "".join(options) or "ABCDEFGHIJ")
    if letters:
        return letters[0] if strong or len(set(letters)) == 1 else None
    padded = f" {_normalise(text)} "
    named = [k for k, v in options.items() if v and f" {v} " in padded]
    return named[0] if len(named) == 1 else None


def _value(text: str, kind: str, options: dict[str, str], strong: bool = True) -> str | float | None:
    if kind == "choice":
        return _choice_in(text, options, strong)
    if kind == "number":
        return parse_number(text)
    return _normalise(text) or None


def reasoning_conclusion(reasoning: str, kind: str, options: dict[str, str]) -> str | float | None:
    """The last conclusion the reasoning states ("so the answer is B", "... is 3"), as a letter, number or
    normalised phrase; None when no cue is followed by a value of that kind."""
    for cue in reversed(list(_CUES[kind].finditer(reasoning))):
        rest = reasoning[cue.end() :]
        end = _SENTENCE_END.search(rest)
        value = _value(
            rest[: end.start() if end else len(rest)][:120], kind, options, bool(cue.group("strong"))
        )
        if value is not None:
            return value
    return None


class RuleJudge(_RolloutJudge):
    """Deterministic offline judge: the reasoning's last stated conclusion must match the answer.

    Letters for multiple choice, numbers within `numeric_rel_tol` for numerical/regression, normalised text
    containment otherwise. When the reasoning states no conclusion at all the rules cannot tell, so the verdict
    is unjudged ("no conclusion in reasoning") rather than a guess either way.
    """

    name = "rule"

    def __init__(
        self, numeric_rel_tol: float = 0.01, repetition_ngram: int = 4, repetition_threshold: float = 0.3
    ) -> None:
        super().__init__(repetition_ngram, repetition_threshold)
        self.numeric_rel_tol = numeric_rel_tol

    def _decide(self, items: list[JudgeItem]) -> list[_Decision]:
        t0 = time.perf_counter()
        decided = [self._decide_one(item) for item in items]
        latency = (time.perf_counter() - t0) / max(len(items), 1)
        return [_Decision(c, why, "", latency) for c, why in decided]

    def _decide_one(self, item: JudgeItem) -> tuple[bool | None, str]:
        kind, options = _answer_kind(item), _options_by_letter(item.options)
        answer = _value(item.answer or "", kind, options)
        if answer is None:
            return None, f"answer states no {'option' if kind == 'choice' else kind}"
        concluded = reasoning_conclusion(item.reasoning or "", kind, options)
        if concluded is None:
            return None, "no conclusion in reasoning"
        if kind == "number":
            tol = self.numeric_rel_tol * max(abs(concluded), abs(answer), 1e-12)
            same = abs(concluded - answer) <= tol
        elif kind == "text":
            same = f" {answer} " in f" {concluded} " or f" {concluded} " in f" {answer} "
        else:
            same = concluded == answer
        return same, f"reasoning concludes {concluded!r}, answer is {answer!r}"


# --- LLM judges -------------------------------------------------------------------------------------------

JUDGE_INSTRUCTION = (
    "You check a model's answer to a video question. You cannot see the video. Judge only whether the "
    "reasoning leads to the final answer, not whether the answer is right."
)
_VERDICT = re.compile(r"verdict\W{0,8}(inconsistent|not\s+consistent|consistent)", re.I)
_REASON = re.compile(r"reason\W{0,8}(\S.*)", re.I)


def judge_prompt(item: JudgeItem, max_reasoning_chars: int) -> str:
    """The consistency question for one rollout. Long reasoning keeps its tail, where the conclusion is."""
    reasoning = item.reasoning or ""
    if len(reasoning) > max_reasoning_chars:
        reasoning = "…" + reasoning[-max_reasoning_chars:]
    options = "".join(f"\n{o}" for o in item.options)
    return (
        f"{JUDGE_INSTRUCTION}\n\nQuestion: {item.question}"
        + (f"\nOptions:{options}" if options else "")
        + f"\n\nReasoning:\n{reasoning}\n\nFinal answer: {item.answer}\n\n"
        "Does the reasoning lead to this final answer? Reply with exactly two lines:\n"
        "VERDICT: CONSISTENT or VERDICT: INCONSISTENT\nREASON: <one short sentence>"
    )


def parse_verdict(text: str) -> tuple[bool | None, str]:
    """(consistent, rationale) from a judge's reply; (None, 'unjudged: …') when it names no single verdict."""
    answer_part = re.sub(r"<think>.*?</think>", "", text, flags=re.S)
    found = {
        "consistent" if m.group(1).lower() == "consistent" else "inconsistent"
        for m in _VERDICT.finditer(answer_part)
    }
    if len(found) != 1:
        why = "conflicting verdicts" if found else "no VERDICT line"
        return None, f"unjudged: {why} in judge output"
    consistent = found == {"consistent"}
    reason = _REASON.search(answer_part)
    label = "consistent" if consistent else "inconsistent"
    return consistent, f"{label}: {reason.group(1).strip()[:200]}" if reason else label


class TransformersJudge(_RolloutJudge):
    """A small local causal LM as the consistency judge: batched greedy decoding with left padding.

    The model loads on first use, so building the judge from a config costs nothing until the verifier runs.
    The prompt goes through the tokenizer's chat template when it has one.
    """

    def __init__(
        self,
        model_name_or_path: str,
        max_new_tokens: int = 64,
        batch_size: int = 8,
        dtype: str = "auto",
        device: str | None = None,
        max_reasoning_chars: int = 6000,
        repetition_ngram: int = 4,
        repetition_threshold: float = 0.3,
    ) -> None:
        super().__init__(repetition_ngram, repetition_threshold)
        if dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(
                f"TransformersJudge: dtype must be auto, float32, bfloat16 or float16, got {dtype!r}"
            )
        self.name = f"transformers:{model_name_or_path}"
        self.model_name_or_path = model_name_or_path
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.dtype = dtype
        self.device = device
        self.max_reasoning_chars = max_reasoning_chars
        self._model: Any = None
        self._tokenizer: Any = None

    def _load(self) -> None:
        if self._model is not None:
            return
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(self.model_name_or_path)
            dtype = self.dtype if self.dtype == "auto" else getattr(torch, self.dtype)
            model = AutoModelForCausalLM.from_pretrained(self.model_name_or_path, dtype=dtype)
        except (OSError, ValueError) as err:
            raise JudgeUnavailableError(
                f"TransformersJudge could not load {self.model_name_or_path!r}: {err}. Point model_name_or_path "
                "at a directory holding a causal LM and its tokenizer (as written by save_pretrained), or at a "
                "hub name already in the local cache."
            ) from err
        tokenizer.padding_side = "left"  # generation continues from the right end of every row
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._model, self._tokenizer = model.to(device).eval(), tokenizer

    def _render(self, item: JudgeItem) -> str:
        prompt = judge_prompt(item, self.max_reasoning_chars)
        if getattr(self._tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": prompt}]
            return self._tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return prompt

    def _decide(self, items: list[JudgeItem]) -> list[_Decision]:
        import torch

        self._load()
        t0 = time.perf_counter()
        tok = self._tokenizer
        templated = bool(getattr(tok, "chat_template", None))
        enc = tok(
            [self._render(i) for i in items],
            return_tensors="pt",
            padding=True,
            add_special_tokens=not templated,
        )
        enc = enc.to(self._model.device)
        with torch.no_grad():
            out = self._model.generate(
                **enc, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
            )
        texts = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        latency = (time.perf_counter() - t0) / len(items)
        return [_Decision(*parse_verdict(text), text, latency) for text in texts]


_NETWORK_ERRORS = (urllib.error.URLError, OSError, http.client.HTTPException)


class OpenAIJudge(_RolloutJudge):
    """A judge served over the OpenAI-compatible /v1/chat/completions API (vLLM, SGLang, llama.cpp, ...).

    Standard library only: a thread pool bounds concurrent requests, each with a timeout on every socket wait
    and on the whole request (checked as the answer's body arrives), so a server that hangs or trickles its
    answer costs at most about 2 x timeout_s per attempt; 5xx/429 answers,
    timeouts and connection errors are retried with exponential backoff (backoff_s, 2·backoff_s, ...). When
    `check_on_start`, the first use asks GET /models and raises `JudgeUnavailableError` if nothing answers, so
    a forgotten server fails the run loudly instead of leaving every rollout unjudged.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        max_concurrency: int = 8,
        timeout_s: float = 30.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        temperature: float = 0.0,
        check_on_start: bool = True,
        max_tokens: int = 256,
        max_reasoning_chars: int = 6000,
        repetition_ngram: int = 4,
        repetition_threshold: float = 0.3,
    ) -> None:
        super().__init__(repetition_ngram, repetition_threshold)
        url = base_url.rstrip("/")
        if urllib.parse.urlsplit(url).path == "":  # "http://host:8000" means the usual /v1 root
            url += "/v1"
        self.base_url, self.model, self.api_key = url, model, api_key
        self.name = f"openai:{model}"
        self.max_concurrency = max(1, max_concurrency)
        self.timeout_s, self.max_retries, self.backoff_s = timeout_s, max_retries, backoff_s
        self.temperature, self.max_tokens = temperature, max_tokens
        self.max_reasoning_chars = max_reasoning_chars
        self._checked = not check_on_start

    def _request(self, method: str, path: str, body: bytes | None) -> bytes:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.base_url + path, data=body, headers=headers, method=method)
        deadline = time.monotonic() + self.timeout_s
        with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
            # The socket timeout bounds each wait only: a server that trickles its answer a byte at a time
            # would hold the judge forever, so the whole answer must also arrive within timeout_s.
            chunks = []
            while chunk := resp.read1(1 << 16):
                chunks.append(chunk)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"timed out: the answer took longer than timeout_s={self.timeout_s}")
            return b"".join(chunks)

    def _with_retries(self, method: str, path: str, body: bytes | None) -> bytes:
        for attempt in range(self.max_retries + 1):
            try:
                return self._request(method, path, body)
            except urllib.error.HTTPError as err:
                if (err.code < 500 and err.code != 429) or attempt == self.max_retries:
                    raise
            except _NETWORK_ERRORS:
                if attempt == self.max_retries:
                    raise
            time.sleep(self.backoff_s * 2**attempt)
        raise AssertionError("unreachable")

    def check_server(self) -> None:
        """Raise `JudgeUnavailableError` unless a server answers GET {base_url}/models."""
        start_hint = (
            f"Start one first, e.g. `vllm serve {self.model} --port 8000` or `python -m sglang.launch_server "
            f"--model-path {self.model} --port 8000`, and set base_url to http://127.0.0.1:8000/v1; or use "
            "the offline RuleJudge."
        )
        try:
            self._with_retries("GET", "/models", None)
        except urllib.error.HTTPError as err:
            if err.code in (401, 403):
                raise JudgeUnavailableError(
                    f"OpenAIJudge: the server at {self.base_url} refused the request (HTTP {err.code}); "
                    "set api_key to a key it accepts."
                ) from err
            if err.code >= 500:
                raise JudgeUnavailableError(
                    f"OpenAIJudge: the server at {self.base_url} answers HTTP {err.code}. {start_hint}"
                ) from err
            # Any other answer means a server is listening: /models is optional for some servers.
        except _NETWORK_ERRORS as err:
            raise JudgeUnavailableError(
                f"OpenAIJudge: no OpenAI-compatible server answers at {self.base_url} ({err}). {start_hint}"
            ) from err
        self._checked = True

    def _decide(self, items: list[JudgeItem]) -> list[_Decision]:
        if not self._checked:
            self.check_server()
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(items))) as pool:
            return list(pool.map(self._judge_one, items))

    def _judge_one(self, item: JudgeItem) -> _Decision:
        messages = [{"role": "user", "content": judge_prompt(item, self.max_reasoning_chars)}]
        body = {"model": self.model, "messages": messages, "temperature": self.temperature}
        body["max_tokens"] = self.max_tokens
        t0 = time.perf_counter()
        try:
            raw = self._with_retries("POST", "/chat/completions", json.dumps(body).encode()).decode(
                "utf-8", "replace"
            )
        except urllib.error.HTTPError as err:
            detail = err.read().decode("utf-8", "replace")[:2000] if err.fp else ""
            why = f"judge error: HTTP {err.code} from {self.base_url}/chat/completions"
            return _Decision(None, why, detail, time.perf_counter() - t0)
        except _NETWORK_ERRORS as err:
            why = f"judge error after {self.max_retries + 1} attempts: {type(err).__name__}: {err}"
            return _Decision(None, why, "", time.perf_counter() - t0)
        latency = time.perf_counter() - t0
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
            if not isinstance(content, str):
                raise TypeError("message content is not a string")
        except (ValueError, KeyError, IndexError, TypeError):
            return _Decision(
                None, "unjudged: malformed response, not an OpenAI chat completion", raw[:4000], latency
            )
        return _Decision(*parse_verdict(content), content, latency)
