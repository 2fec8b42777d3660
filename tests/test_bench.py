"""`cachetalk bench --quick` end to end: the default stack, the shipped bridges, real models."""

import json
import math
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

MODES = ("solo", "sharer", "t2t", "c2c", "self")


CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Egypt", "Cairo"), ("Peru", "Lima"),
            ("Kenya", "Nairobi"), ("Spain", "Madrid"), ("Norway", "Oslo"), ("Chile", "Santiago"),
            ("Canada", "Ottawa"), ("Greece", "Athens"), ("Poland", "Warsaw")]


def write_tasks(folder):
    """Write two small multiple-choice tasks in BIG-bench's task.json format; return their names."""
    cities = [city for _, city in CAPITALS]
    capitals = [{"input": f"What is the capital of {country}?",
                 "target_scores": {option: int(option == city) for option in [city, *[c for c in cities if c != city][:2]]}}
                for country, city in CAPITALS]
    sums = [{"input": f"What is {a} plus {b}?",
             "target_scores": {str(a + b): 1, str(a + b + 1): 0, str(a + b + 10): 0}}
            for a, b in [(i, 2 * i + 1) for i in range(1, 25)]]
    tasks = {"quick_capitals": capitals, "quick_sums": sums}
    for name, examples in tasks.items():
        (folder / name).mkdir()
        task = {"name": name, "description": "test task", "keywords": [], "metrics": ["multiple_choice_grade"],
                "examples": examples}
        (folder / name / "task.json").write_text(json.dumps(task))
    return list(tasks)


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    tasks_dir = tmp_path_factory.mktemp("bigbench")
    trained, heldout = write_tasks(tasks_dir)
    command = [sys.executable, "-m", "cachetalk.cli", "bench", "--quick", "--out", str(out),
               "--tasks", trained, "--heldout-tasks", heldout]
    env = {**os.environ, "CACHETALK_BIGBENCH_DIR": str(tasks_dir)}
    finished = subprocess.run(command, capture_output=True, text=True, timeout=1800, env=env)
    assert finished.returncode == 0, finished.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def results(bench_out):
    return json.loads((bench_out / "results.json").read_text())


def numbers(value, path="results"):
    """Yield (path, number) for every int and float in a nested result."""
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from numbers(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from numbers(item, f"{path}[{index}]")


def summaries(value, path="accuracy"):
    """Yield (path, summary) for every accuracy summary (a dict with accuracy and its interval)."""
    if isinstance(value, dict):
        if "accuracy" in value:
            yield path, value
        for key, item in value.items():
            yield from summaries(item, f"{path}.{key}")


def test_bench_writes_all_outputs(bench_out):
    for name in ("results.json", "RESULTS.md", "answers.jsonl", "accuracy.png", "latency.png", "wire.png",
                 "concurrency.png"):
        assert (bench_out / name).stat().st_size > 0, name


def test_bench_numbers_are_finite(results):
    found = list(numbers(results))
    assert found
    for path, value in found:
        assert math.isfinite(value), path


def test_bench_accuracy_has_every_mode(results):
    accuracy = results["accuracy"]
    tasks = results["meta"]["accuracy"]["tasks"]
    assert len(tasks) >= 2
    for mode in MODES:
        entry = accuracy[mode]
        for key in ("accuracy", "ci_low", "ci_high", "n", "tasks"):
            assert key in entry, f"accuracy.{mode}.{key}"
        assert entry["n"] == sum(info["n"] for info in tasks.values())
        assert set(entry["tasks"]) == set(tasks)
        assert entry["generated"]["n"] == entry["n"]
        assert entry["generated"]["errors"] == 0


def test_bench_intervals_contain_estimates(results):
    found = list(summaries(results["accuracy"]))
    assert len(found) >= 2 * len(MODES)
    for path, summary in found:
        assert 0 <= summary["ci_low"] <= summary["accuracy"] <= summary["ci_high"] <= 1, path
        assert summary["correct"] == round(summary["accuracy"] * summary["n"]), path


def test_bench_latency_ratios_positive(results):
    latency = results["latency"]
    for mode in MODES:
        assert latency[mode]["median_ms"] > 0, mode
        assert latency[mode]["p90_ms"] >= latency[mode]["median_ms"], mode
        assert latency[mode]["errors"] == 0, mode
    assert latency["ratio_t2t_over_c2c"] > 0
    assert latency["ratio_c2c_over_solo"] > 0
    assert latency["ratio_t2t_over_c2c"] == pytest.approx(latency["t2t"]["median_ms"] / latency["c2c"]["median_ms"])
    assert "bridge_ms" in latency["c2c"]["stages"]
    assert "sharer_decode_ms" in latency["t2t"]["stages"]


def test_bench_wire_ratios_positive(results):
    wire = results["wire"]
    assert 0 < wire["ratio_to_memcpy"]
    assert 0 < wire["share_of_c2c"] < 1
    tokens = sorted({point["tokens"] for point in wire["points"]})
    assert tokens[0] == 128
    assert tokens[-1] == 1024
    assert {point["model"] for point in wire["points"]} == {"smollm2-135m", "gemma3-270m"}


def test_bench_concurrency_levels(results):
    concurrency = results["concurrency"]
    for level in ("1", "4"):
        assert concurrency[level]["requests_per_s"] > 0, level
        assert concurrency[level]["errors"] == 0, level
    assert concurrency["speedup_highest_over_lowest"] > 0


def test_bench_answers_cover_every_request(bench_out, results):
    records = [json.loads(line) for line in (bench_out / "answers.jsonl").read_text().splitlines()]
    questions = results["accuracy"]["solo"]["n"]
    for mode in MODES:
        assert sum(1 for r in records if r["mode"] == mode) == questions, mode
    assert sum(1 for r in records if r["mode"] == "t2t_note") == questions


def test_bench_report_lists_targets(bench_out, results):
    report = (bench_out / "RESULTS.md").read_text()
    assert len(results["targets"]) == 5
    for target in results["targets"]:
        assert target["name"] in report
        assert target["met"] in (True, False)
        if target["met"] is False:
            assert target["note"] in report
    assert f"torch {results['meta']['machine']['torch']}" in report
    assert "cachetalk bench --quick" in report


def test_bench_compares_c2c_pairwise(results):
    questions = results["accuracy"]["c2c"]["n"]
    for other in ("solo", "t2t", "self", "sharer"):
        for measure in ("loglik", "generated"):
            entry = results["comparisons"][f"c2c_vs_{other}"][measure]
            assert entry["wins"] + entry["losses"] + entry["ties"] == questions, (other, measure)
            assert 0 < entry["p_value"] <= 1, (other, measure)
            c2c, rival = results["accuracy"]["c2c"], results["accuracy"][other]
            if measure == "generated":
                c2c, rival = c2c["generated"], rival["generated"]
            assert entry["wins"] - entry["losses"] == c2c["correct"] - rival["correct"], (other, measure)
