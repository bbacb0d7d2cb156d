"""The LLM judges of the Rollout-Aware Verifier: a small local transformers model (`TransformersJudge`) or an
OpenAI-compatible server such as vLLM or SGLang (`OpenAIJudge`) reads each rollout and answers whether its
reasoning leads to its answer; `judge_prompt` is the question they are asked, `parse_verdict` reads the reply.

They share the rule judge's skeleton (lightning_veripo.verifier.judges: rule checks for every rollout, a failed
batch recorded as unjudged) and return the same `Verdict`. `lightning_veripo.verifier.judges` re-exports
them, so `lightning_veripo.verifier.judges.OpenAIJudge` keeps working as a class path.
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
from typing import Any

from lightning_veripo.verifier.judges import JudgeItem, JudgeUnavailableError, _Decision, _RolloutJudge

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
