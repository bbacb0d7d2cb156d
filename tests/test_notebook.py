"""notebooks/explore.ipynb runs top to bottom: building its own small run offline, and reading a work directory.

The notebook is executed with nbclient in a kernel of *this* interpreter (a `python3` kernelspec written to a
temporary JUPYTER_PATH, which Jupyter searches before any user or system kernelspec), in a temporary working
directory, with TMPDIR pointing there so the run the notebook builds lands inside the test's tmp path.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "explore.ipynb"
CELL_TIMEOUT_S = 300
PROBE = "import sys; print('KERNEL_EXECUTABLE=' + sys.executable)"


def run_notebook(cwd: Path, **env: str) -> Any:
    """Execute the notebook (plus a last cell naming the kernel's interpreter) in `cwd`; return it executed."""
    kernels = cwd / "jupyter" / "kernels" / "python3"
    kernels.mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (test)",
        "language": "python",
    }
    (kernels / "kernel.json").write_text(json.dumps(spec))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(PROBE))
    kernel_env = {
        **os.environ,
        "JUPYTER_PATH": str(cwd / "jupyter"),
        "TMPDIR": str(cwd),
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",  # an inherited Agg would swallow figures
        **env,
    }
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", kernel_env["JUPYTER_PATH"])  # the client looks the kernelspec up in-process
        client.execute(env=kernel_env)
    return nb


def outputs(nb: Any) -> list[Any]:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def stdout(nb: Any) -> str:
    return "".join(o.text for o in outputs(nb) if o.output_type == "stream" and o.name == "stdout")


def html(nb: Any) -> list[str]:
    return [o.data["text/html"] for o in outputs(nb) if "text/html" in o.get("data", {})]


def images(nb: Any) -> int:
    return sum("image/png" in o.get("data", {}) for o in outputs(nb))


def check_common(nb: Any) -> None:
    assert not [o for o in outputs(nb) if o.output_type == "error"]
    assert f"KERNEL_EXECUTABLE={sys.executable}" in stdout(nb), "the notebook ran in another interpreter"
    tables = html(nb)
    assert any(
        "<th>reward</th>" in t and "<th>consistent</th>" in t and "<th>advantage</th>" in t for t in tables
    )
    assert any("<th>reason</th>" in t and "<th>pairs</th>" in t for t in tables)  # reason counts
    assert any("<th>chosen</th>" in t and "<th>rejected</th>" in t for t in tables)  # a few pairs
    assert any("<th>decoding</th>" in t for t in tables), "section 1b did not generate from the policy"
    assert images(nb) >= 2  # the four frames, the curves


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """The notebook run on the self-building path, and the directory it ran in."""
    cwd = tmp_path_factory.mktemp("notebook_built")
    return run_notebook(cwd, VERIPO_WORK_DIR=""), cwd


@pytest.mark.slow
def test_notebook_builds_its_own_run(built: tuple[Any, Path]) -> None:
    nb, cwd = built
    check_common(nb)
    out = stdout(nb)
    assert "built a small run in" in out
    assert "no TensorBoard event files" not in out  # the built run logs its steps to TensorBoard
    (verifier,) = cwd.glob("veripo-explore-*/work/iter_1/verifier")
    pairs = [line for line in (verifier / "pairs.jsonl").read_text().splitlines() if line.strip()]
    assert pairs, "the built run must have preference pairs to show"
    assert f"{len(pairs)} pairs" in out
    assert "0 stage(s) with answers.jsonl" in out  # the built run has no loop evaluation to compare


@pytest.mark.slow
def test_notebook_reads_a_work_dir_without_tensorboard(built: tuple[Any, Path], tmp_path: Path) -> None:
    """VERIPO_WORK_DIR set: nothing is built; with no event files the curves come from metrics.jsonl."""
    _, built_cwd = built
    (run,) = built_cwd.glob("veripo-explore-*")
    work = tmp_path / "work"
    shutil.copytree(run / "work", work)
    shutil.rmtree(work / "tensorboard")
    rows = [
        {"stage": "base", "index": 0, "accuracy": 0.0, "reasoning_tokens": 0.0, "inconsistency_rate": 0.0},
        {"stage": "sft", "index": 1, "accuracy": 0.25, "reasoning_tokens": 9.0, "inconsistency_rate": 0.4},
        {
            "stage": "iter_1/grpo",
            "index": 2,
            "accuracy": 0.5,
            "reasoning_tokens": 12.0,
            "inconsistency_rate": 0.2,
        },
    ]
    (work / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # the stages' greedy answers (as evaluate writes them): q0 fixed, q1 broken, q2 right twice, q3 wrong twice
    right, wrong = (
        "<think>so the answer is A.</think><answer>A</answer>",
        "<think>so B.</think><answer>B</answer>",
    )
    # the untrained base was evaluated too: "before RL" is still the warm start, not the base
    texts = {
        "base": [wrong] * 4,
        "sft": [wrong, right, right, wrong],
        "iter_1/grpo": [right, wrong, right, wrong + " "],
    }
    for stage, completions in texts.items():
        lines = [
            {"problem_id": f"q{i}", "problem": "?", "options": [], "solution": "<answer>A</answer>", "completion": c,
             "answer": "A" if c == right else "B", "accuracy": float(c == right), "consistent": True, "rationale": ""}
            for i, c in enumerate(completions)
        ]  # fmt: skip
        (work / stage).mkdir(parents=True, exist_ok=True)
        (work / stage / "answers.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))

    nb = run_notebook(tmp_path, VERIPO_WORK_DIR=str(work), VERIPO_MODEL_PATH=str(run / "tiny-model"))
    check_common(nb)
    out = stdout(nb)
    assert "built a small run" not in out
    assert f"work dir: {work}" in out
    assert "no TensorBoard event files" in out and "plotting metrics.jsonl (3 stages)" in out
    assert not list(tmp_path.glob("veripo-explore-*"))
    assert "sft -> iter_1/grpo on 4 questions: " in out
    assert all(f"{kind} 1" in out for kind in ("fixed", "broken", "right both times", "wrong both times"))
    assert "3 of 4 greedy answers changed between sft and iter_1/grpo" in out
