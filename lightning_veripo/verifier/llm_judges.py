"""The LLM judges of the Rollout-Aware Verifier: a small local transformers model (`TransformersJudge`) or an
OpenAI-compatible server such as vLLM or SGLang (`OpenAIJudge`) reads each rollout and answers whether its
reasoning leads to its answer. What they are asked (the rollout as delimited, untrusted data) and how their reply
is read (the verdict only from the final answer, after the last closed thinking block) is
lightning_veripo.verifier.llm_prompt.
Both decide in one of two modes: `generate` (write `VERDICT: ...`, parsed) or `likelihood` (compare the
probabilities of the two verdict words as the reply's start: one forward pass, or one token's top_logprobs, per
rollout; the probability goes into the verdict). `HybridJudge` lets the rule judge decide where it can and asks an
LLM judge only about the rollouts the rules leave unjudged.

They share every judge's skeleton (lightning_veripo.verifier.protocol.RolloutJudge: rule checks for every
rollout, a failed batch recorded as unjudged) and return the same `Verdict`. In a config:
`class_path: lightning_veripo.verifier.llm_judges.OpenAIJudge`.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from lightning_veripo.verifier.http_json import NETWORK_ERRORS, read_within, with_retries
from lightning_veripo.verifier.judges import RuleJudge
from lightning_veripo.verifier.llm_prompt import (
    VERDICT_WORDS,
    judge_prompt,
    likelihood_decision,
    parse_verdict,
    reply_text,
)
from lightning_veripo.verifier.protocol import (
    Decision,
    Judge,
    JudgeItem,
    JudgeUnavailableError,
    RolloutJudge,
    Verdict,
)

MODES = ("generate", "likelihood")


def _check_mode(owner: str, mode: str, min_confidence: float) -> None:
    if mode not in MODES:
        raise ValueError(f"{owner}: mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not 0.5 <= min_confidence <= 1.0:
        raise ValueError(f"{owner}: min_confidence must be in [0.5, 1], got {min_confidence}")


class TransformersJudge(RolloutJudge):
    """A small local causal LM as the consistency judge, batched with left padding.

    `mode="generate"`: greedy decoding of `VERDICT: ...` (up to max_new_tokens), parsed; a reply with no
    verdict line is unjudged. `mode="likelihood"`: no generation; the prompt asks for one word and one forward
    pass per rollout compares the next-token log-probabilities of the two verdict words (at the first token where
    "CONSISTENT" and "INCONSISTENT" tokenise apart). The verdict records P(consistent) (`Verdict.probability`)
    and the two log-probs; the rollout stays unjudged when the likelier verdict's probability is below
    `min_confidence` (0.5: always decide). The model loads on first use, so building the judge from a config
    costs nothing until the verifier runs. The prompt goes through the tokenizer's chat template when it has one.
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
        mode: str = "generate",
        min_confidence: float = 0.5,
    ) -> None:
        super().__init__(repetition_ngram, repetition_threshold)
        _check_mode("TransformersJudge", mode, min_confidence)
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
        self.mode, self.min_confidence = mode, min_confidence
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
        prompt = judge_prompt(item, self.max_reasoning_chars, one_word=self.mode == "likelihood")
        if getattr(self._tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": prompt}]
            return self._tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return prompt

    def _decide(self, items: list[JudgeItem]) -> list[Decision]:
        self._load()
        if self.mode == "likelihood":
            return self._decide_by_likelihood(items)
        return self._decide_by_generation(items)

    def _decide_by_likelihood(self, items: list[JudgeItem]) -> list[Decision]:
        import torch

        t0 = time.perf_counter()
        tok = self._tokenizer
        special = not getattr(tok, "chat_template", None)
        rows, targets = [], []
        for item in items:
            prompt = self._render(item)
            yes, no = (tok(prompt + w, add_special_tokens=special)["input_ids"] for w in VERDICT_WORDS)
            k = next((i for i, (a, b) in enumerate(zip(yes, no, strict=False)) if a != b), None)
            if k is None:
                raise RuntimeError(
                    f"the tokenizer of {self.model_name_or_path} does not tell the verdicts apart"
                )
            rows.append(yes[:k])  # the prompt and what the two verdicts share; they part at the next token
            targets.append((yes[k], no[k]))
        width = max(len(r) for r in rows)
        pad = tok.pad_token_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        positions = (mask.cumsum(-1) - 1).clamp(
            min=0
        )  # left padding must not shift the real tokens' positions
        device = self._model.device
        with torch.no_grad():
            logits = self._model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                logits_to_keep=1,
            ).logits[:, -1]
        logp = logits.float().log_softmax(-1).cpu()
        latency = (time.perf_counter() - t0) / len(items)
        out = []
        for row, (yes_id, no_id) in zip(logp, targets, strict=True):
            a, b = row[yes_id].item(), row[no_id].item()
            raw = (
                f"log p(CONSISTENT)={a:.4f} log p(INCONSISTENT)={b:.4f} "
                f"(first tokens {tok.convert_ids_to_tokens(yes_id)!r} / {tok.convert_ids_to_tokens(no_id)!r}, "
                f"together {math.exp(a) + math.exp(b):.3f} of the next-token probability)"
            )
            out.append(likelihood_decision(a, b, self.min_confidence, raw, latency))
        return out

    def _decide_by_generation(self, items: list[JudgeItem]) -> list[Decision]:
        import torch

        t0 = time.perf_counter()
        tok = self._tokenizer
        templated = bool(getattr(tok, "chat_template", None))
        rendered_prompts = [self._render(i) for i in items]
        enc = tok(
            rendered_prompts,
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
        decisions = []
        for item, rendered, text in zip(items, rendered_prompts, texts, strict=True):
            # a chat template that opens the thinking block itself (Qwen3) leaves "<think>" out of the reply
            opened = "<think>" if rendered.rstrip().endswith("<think>") else ""
            decisions.append(
                Decision(
                    *parse_verdict(opened + text, judge_prompt(item, self.max_reasoning_chars)), text, latency
                )
            )
        return decisions


class OpenAIJudge(RolloutJudge):
    """A judge served over the OpenAI-compatible /v1/chat/completions API (vLLM, SGLang, llama.cpp, ...).

    Standard library only: a thread pool bounds concurrent requests, each with a timeout on every socket wait
    and on the whole request (checked as the answer's body arrives), so a server that hangs or trickles its
    answer costs at most about 2 x timeout_s per attempt; 5xx/429 answers,
    timeouts and connection errors are retried with exponential backoff (backoff_s, 2·backoff_s, ...). When
    `check_on_start`, the first use asks GET /models and raises `JudgeUnavailableError` if nothing answers, so
    a forgotten server fails the run loudly instead of leaving every rollout unjudged.

    The server's key: `api_key` if given, else the environment variable `api_key_env` names (`OPENAI_API_KEY`,
    as the OpenAI client reads it), read at each request; none is sent when neither is set. Prefer the
    variable: a key given in a config is masked in every config a run saves, but lives in the YAML you wrote.

    A thinking judge (Qwen3, DeepSeek-R1) writes its thinking before its verdict: `max_tokens` (4096) must
    leave room for both. Its verdict is read only from the final answer, after the last `</think>`; a
    server started with vLLM's `--reasoning-parser` returns the thinking in a field of its own
    (`reasoning_content` or `reasoning`) and the answer in `content`, read the same way; a reply cut off
    mid-thought (no `</think>`, or only thinking and no content) is unjudged, saying so.

    `mode="likelihood"` asks for one word with `max_tokens=1, logprobs=true, top_logprobs=N` and compares the
    probabilities of the first tokens that start each verdict word ("CON…" vs "IN…", summed over the listed
    tokens that do); a verdict missing from the list is taken at the lowest listed log-prob (an upper bound on
    it), neither listed leaves the rollout unjudged, and `min_confidence` is the abstention threshold as in
    `TransformersJudge`. vLLM and SGLang return logprobs; a server that does not (`transformers serve`, some
    proxies) gets one warning and the judge falls back to generation for the rest of its life.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        max_concurrency: int = 8,
        timeout_s: float = 30.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        temperature: float = 0.0,
        check_on_start: bool = True,
        max_tokens: int = 4096,
        max_reasoning_chars: int = 6000,
        repetition_ngram: int = 4,
        repetition_threshold: float = 0.3,
        mode: str = "generate",
        min_confidence: float = 0.5,
        top_logprobs: int = 20,
    ) -> None:
        super().__init__(repetition_ngram, repetition_threshold)
        _check_mode("OpenAIJudge", mode, min_confidence)
        self.mode, self.min_confidence, self.top_logprobs = mode, min_confidence, top_logprobs
        self._logprobs_missing = False  # set once the server answered a likelihood request without logprobs
        self._lock = threading.Lock()
        url = base_url.rstrip("/")
        if urllib.parse.urlsplit(url).path == "":  # "http://host:8000" means the usual /v1 root
            url += "/v1"
        if api_key is None and api_key_env != "OPENAI_API_KEY" and api_key_env not in os.environ:
            raise ValueError(
                f"OpenAIJudge: api_key_env names {api_key_env!r}, which is not set in the environment; export "
                "it with the server's key, or leave api_key_env out to read OPENAI_API_KEY"
            )
        self.base_url, self.model = url, model
        self._api_key, self.api_key_env = api_key, api_key_env  # never written out: see stage_cli
        self.name = f"openai:{model}"
        self.max_concurrency = max(1, max_concurrency)
        self.timeout_s, self.max_retries, self.backoff_s = timeout_s, max_retries, backoff_s
        self.temperature, self.max_tokens = temperature, max_tokens
        self.max_reasoning_chars = max_reasoning_chars
        self._checked = not check_on_start

    def _request(self, method: str, path: str, body: bytes | None) -> bytes:
        """One HTTP attempt, with the key as a bearer token; `_with_retries` retries it."""
        headers = {"Content-Type": "application/json"}
        if key := self._api_key or os.environ.get(self.api_key_env):
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.base_url + path, data=body, headers=headers, method=method)
        return read_within(request, self.timeout_s)

    def _with_retries(self, method: str, path: str, body: bytes | None) -> bytes:
        return with_retries(lambda: self._request(method, path, body), self.max_retries, self.backoff_s)

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
                    f"export {self.api_key_env} with a key it accepts (or set api_key_env to the variable "
                    "that holds one)."
                ) from err
            if err.code >= 500:
                raise JudgeUnavailableError(
                    f"OpenAIJudge: the server at {self.base_url} answers HTTP {err.code}. {start_hint}"
                ) from err
            # Any other answer means a server is listening: /models is optional for some servers.
        except NETWORK_ERRORS as err:
            raise JudgeUnavailableError(
                f"OpenAIJudge: no OpenAI-compatible server answers at {self.base_url} ({err}). {start_hint}"
            ) from err
        self._checked = True

    def _decide(self, items: list[JudgeItem]) -> list[Decision]:
        if not self._checked:
            self.check_server()
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(items))) as pool:
            return list(pool.map(self._judge_one, items))

    def _judge_one(self, item: JudgeItem) -> Decision:
        if self.mode == "likelihood" and not self._logprobs_missing:
            decision = self._judge_one_by_likelihood(item)
            if decision is not None:
                return decision
        decision = self._judge_one_by_generation(item)
        if self.mode == "likelihood":
            decision = decision._replace(
                rationale=f"{decision.rationale} (generated: the server returns no logprobs)"
            )
        return decision

    def _post(self, body: dict[str, Any]) -> tuple[dict[str, Any] | None, Decision | None, float]:
        """(the parsed chat completion, None, seconds) or (None, the unjudged decision saying why, seconds)."""
        t0 = time.perf_counter()
        try:
            raw = self._with_retries("POST", "/chat/completions", json.dumps(body).encode()).decode(
                "utf-8", "replace"
            )
        except urllib.error.HTTPError as err:
            detail = err.read().decode("utf-8", "replace")[:2000] if err.fp else ""
            why = f"judge error: HTTP {err.code} from {self.base_url}/chat/completions"
            latency = time.perf_counter() - t0
            return None, Decision(None, why, detail, latency), latency
        except NETWORK_ERRORS as err:
            why = f"judge error after {self.max_retries + 1} attempts: {type(err).__name__}: {err}"
            latency = time.perf_counter() - t0
            return None, Decision(None, why, "", latency), latency
        latency = time.perf_counter() - t0
        try:
            choice = json.loads(raw)["choices"][0]
            message = choice["message"]
            if not isinstance(message.get("content"), str | None):
                raise TypeError("message content is not a string")
        except (ValueError, KeyError, IndexError, TypeError):
            why = "unjudged: malformed response, not an OpenAI chat completion"
            return None, Decision(None, why, raw[:4000], latency), latency
        return choice, None, latency

    def _judge_one_by_generation(self, item: JudgeItem) -> Decision:
        messages = [{"role": "user", "content": judge_prompt(item, self.max_reasoning_chars)}]
        body = {"model": self.model, "messages": messages, "temperature": self.temperature}
        body["max_tokens"] = self.max_tokens
        choice, failed, latency = self._post(body)
        if choice is None:
            assert failed is not None
            return failed
        text = reply_text(choice["message"])
        return Decision(*parse_verdict(text, messages[0]["content"]), text, latency)

    def _judge_one_by_likelihood(self, item: JudgeItem) -> Decision | None:
        """The likelihood verdict, or None when the server answered without logprobs (warned once)."""
        messages = [{"role": "user", "content": judge_prompt(item, self.max_reasoning_chars, one_word=True)}]
        body = {"model": self.model, "messages": messages, "temperature": 0.0, "max_tokens": 1}
        body |= {"logprobs": True, "top_logprobs": self.top_logprobs}
        choice, failed, latency = self._post(body)
        if choice is None:
            assert failed is not None
            return failed
        try:
            top = choice["logprobs"]["content"][0]["top_logprobs"]
            listed = [(str(e["token"]), float(e["logprob"])) for e in top]
            if not listed:
                raise ValueError("empty top_logprobs")
        except (KeyError, IndexError, TypeError, ValueError):
            with self._lock:
                first = not self._logprobs_missing
                self._logprobs_missing = True
            if first:
                warnings.warn(
                    f"OpenAIJudge(mode='likelihood'): the server at {self.base_url} returned no logprobs "
                    f"for model {self.model!r} (vLLM and SGLang do; transformers serve does not), so this judge "
                    "falls back to generation (mode='generate') for every rollout from now on.",
                    UserWarning,
                    stacklevel=2,
                )
            return None
        raw = json.dumps(listed)
        logp = {}
        for word in VERDICT_WORDS:
            # "IN" starts only INCONSISTENT and "CON" only CONSISTENT: no token starts both.
            hits = [lp for tok, lp in listed if tok.strip() and word.startswith(tok.strip().upper())]
            if hits:
                logp[word] = math.log(sum(math.exp(lp) for lp in hits))
        if not logp:
            why = f"unjudged: neither verdict among the top {len(listed)} first tokens"
            return Decision(None, why, raw, latency)
        floor = min(lp for _, lp in listed)
        yes, no = (logp.get(w, floor) for w in VERDICT_WORDS)
        return likelihood_decision(yes, no, self.min_confidence, raw, latency)


class HybridJudge:
    """Rules first, an LLM only where they are blind: the rule judge decides every rollout it can (a stated
    conclusion of the right kind); the rollouts it leaves unjudged although both tags are there (no stated
    conclusion, free-form answers it cannot compare) go to `llm`. Each verdict names the judge that decided it
    (`Verdict.judge`), so stats.json's `decided_by` gives the share of rollouts each decided; the rationale of an
    LLM verdict keeps why the rules abstained. An LLM batch that raises leaves those rollouts unjudged with the
    error, the rule verdicts intact; `JudgeUnavailableError` still stops the run.
    """

    def __init__(self, llm: Judge, rule: RuleJudge | None = None) -> None:
        self.llm = llm
        self.rule = rule if rule is not None else RuleJudge()
        self.name = f"hybrid:{self.rule.name}+{getattr(llm, 'name', type(llm).__name__)}"

    def judge(self, items: list[JudgeItem]) -> list[Verdict]:
        verdicts = self.rule.judge(items)
        ask = [i for i, v in enumerate(verdicts) if v.consistent is None and not v.missing_tags]
        if not ask:
            return verdicts
        try:
            answers = self.llm.judge([items[i] for i in ask])
            if len(answers) != len(ask):
                raise RuntimeError(f"the LLM judge returned {len(answers)} verdicts for {len(ask)} items")
        except JudgeUnavailableError:
            raise
        except Exception as err:  # the rules' verdicts stand; the rest stay unjudged, with the reason
            for i in ask:
                verdicts[i].rationale += f"; LLM judge error: {type(err).__name__}: {err}"
            return verdicts
        for i, answer in zip(ask, answers, strict=True):
            answer.rationale = (
                f"{self.rule.name}: {verdicts[i].rationale}; {answer.judge}: {answer.rationale}"
            )
            verdicts[i] = answer
        return verdicts
