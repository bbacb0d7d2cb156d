"""The judge server's key: read from the environment (`OPENAI_API_KEY`, or the variable `api_key_env` names) as
the OpenAI client does, and a key given literally in a config never lands in a file a run writes.

Against a real loopback server that refuses any request without the right bearer token, and the real
`veripo fit` CLI (a GRPO fit of the tiny model whose VerifierCallback and evaluation judge are OpenAIJudges
configured with a literal key): every file under the run's directory is searched for the key.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import DEMO_FIT_TEST_ARGS
from openai_server_for_tests import LoopbackServer, chat_reply

from lightning_veripo.cli import main
from lightning_veripo.verifier import JudgeItem, JudgeUnavailableError, OpenAIJudge

REPO = Path(__file__).resolve().parents[1]
SECRET = "sk-test-7c1f0e9a2b4d4e58a1d3"


class _KeyedServer(LoopbackServer):
    """An OpenAI-compatible judge that answers only requests carrying `Bearer {key}` (401 otherwise)."""

    def __init__(self, key: str) -> None:
        super().__init__()
        self.key = key
        self.accepted = self.refused = 0

    def _authorised(self, headers: Any) -> bool:
        ok = headers.get("Authorization") == f"Bearer {self.key}"
        with self.lock:
            self.accepted += ok
            self.refused += not ok
        return ok

    def get(self, path: str, headers: Any) -> tuple[int, dict]:
        return (
            super().get(path, headers) if self._authorised(headers) else (401, {"error": "invalid api key"})
        )

    def post(self, path: str, headers: Any, body: dict) -> tuple[int, dict]:
        if not self._authorised(headers):
            return 401, {"error": "invalid api key"}
        return 200, chat_reply({"content": "VERDICT: CONSISTENT\nREASON: keyed"})


@pytest.fixture
def server() -> Iterator[_KeyedServer]:
    with _KeyedServer(SECRET) as srv:
        yield srv


ITEM = JudgeItem("q", "What colour?", ("A. red", "B. green"), "So the answer is B.", "B", "")


def test_the_key_is_read_from_openai_api_key_when_not_given(server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(JudgeUnavailableError, match="OPENAI_API_KEY"):  # no key: the server refuses, said so
        OpenAIJudge(server.url, "judge", max_retries=0).judge([ITEM])
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    (verdict,) = OpenAIJudge(server.url, "judge", max_retries=0).judge([ITEM])
    assert verdict.consistent is True and verdict.rationale == "consistent: keyed"
    assert server.accepted == 2  # GET /models, then the rollout


def test_api_key_env_names_another_variable_and_an_unset_one_is_refused(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
    monkeypatch.setenv("JUDGE_KEY", SECRET)
    (verdict,) = OpenAIJudge(server.url, "judge", api_key_env="JUDGE_KEY", max_retries=0).judge([ITEM])
    assert verdict.consistent is True and server.refused == 0
    monkeypatch.delenv("JUDGE_KEY")
    with pytest.raises(ValueError, match="JUDGE_KEY"):
        OpenAIJudge(server.url, "judge", api_key_env="JUDGE_KEY")
    (literal,) = OpenAIJudge(server.url, "judge", api_key=SECRET, api_key_env="JUDGE_KEY").judge([ITEM])
    assert literal.consistent is True  # a key given literally needs no variable


@pytest.mark.slow
def test_a_literal_key_never_lands_in_a_file_a_veripo_fit_writes(server, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    judge = {
        "class_path": "lightning_veripo.verifier.llm_judges.OpenAIJudge",
        "init_args": {"base_url": server.url, "model": "judge", "api_key": SECRET, "max_retries": 0},
    }
    callback = {
        "class_path": "lightning_veripo.callbacks.VerifierCallback",
        "init_args": {"judge": judge, "progress": False},
    }
    (tmp_path / "keyed.yaml").write_text(
        json.dumps(
            {"trainer": {"callbacks": [callback]}, "model": {"init_args": {"evaluation": {"judge": judge}}}}
        )
    )
    args = ["fit", "--config", "configs/demo_grpo.yaml", "--config", "keyed.yaml", *DEMO_FIT_TEST_ARGS,
            "--data.init_args.synthetic.num_train=4", "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
            "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false",
            "--model.init_args.num_generations=2", "--model.init_args.max_new_tokens=8"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr()
    assert server.refused == 0  # (the tiny random policy writes no tags, so its rollouts need no LLM verdict)

    run_dir = tmp_path / "work" / "demo" / "grpo"
    (config,) = run_dir.glob("tensorboard/version_*/config.yaml")
    assert config.read_text().count("api_key: '***'") == 2, (
        config.read_text()
    )  # the callback's and the module's
    (stats,) = run_dir.glob("**/verifier/stats.json")
    assert json.loads(stats.read_text())["judge"] == "openai:judge"
    written = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_relative_to(tmp_path / "configs")]
    assert len(written) > 10, written
    leaking = [str(p.relative_to(tmp_path)) for p in written if SECRET.encode() in p.read_bytes()]
    assert leaking == [] or leaking == ["keyed.yaml"], leaking  # only the file the user wrote holds it
    assert SECRET not in out.out + out.err
