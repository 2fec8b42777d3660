"""Matching generated answers to options, and per-task summaries of the bench."""

import pytest

from cachetalk.benchmarks.accuracy import HELDOUT_EXAMPLES, HELDOUT_TASKS_SPLIT, Question, describe_questions, \
    load_questions, match_option, summarize_outcomes
from cachetalk.bridges.data import Sample

OPTIONS = ["A. a man walks", "B. the dog", "C. plausible", "D. implausible"]


@pytest.mark.parametrize("answer, expected", [
    ("B. the dog", 1),
    ("(C)", 2),
    ("D", 3),
    ("C) it is", 2),
    ("Answer: b", 1),
    ("The answer is the dog.", 1),
    ("implausible, because nobody does that", 3),
    ("it is plausible", 2),
    ("plaus", 2),
    ("A man walks into a bar", 0),
])
def test_match_option_finds_choice(answer, expected):
    assert match_option(answer, OPTIONS) == expected


@pytest.mark.parametrize("answer", [
    "",
    "no idea",
    "A. a man walks\nB. the dog\nC. plausible",
    "plausible or implausible",
    "E. none of these",
])
def test_match_option_rejects_no_or_many(answer):
    assert match_option(answer, OPTIONS) is None


def test_match_option_prefers_longer_nested_option():
    options = ["A. two", "B. twenty two", "C. four"]
    assert match_option("I think twenty two", options) == 1


def question(task, split, answer=0, options=2):
    texts = [f"{chr(65 + i)}. option {i}" for i in range(options)]
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": texts[answer]}]
    return Question(Sample(messages, texts, answer, task), split)


def test_summarize_outcomes_splits_and_tasks():
    questions = [question("t1", HELDOUT_EXAMPLES), question("t1", HELDOUT_EXAMPLES), question("t2", HELDOUT_TASKS_SPLIT)]
    summary = summarize_outcomes(questions, [True, False, True])
    assert summary["n"] == 3
    assert summary["accuracy"] == pytest.approx(2 / 3)
    assert summary["tasks"]["t1"]["n"] == 2
    assert summary["tasks"]["t1"]["accuracy"] == 0.5
    assert summary["tasks"]["t2"]["accuracy"] == 1.0
    assert summary["splits"][HELDOUT_EXAMPLES]["n"] == 2
    assert summary["splits"][HELDOUT_TASKS_SPLIT]["n"] == 1


def test_describe_questions_chance_level():
    questions = [question("t1", HELDOUT_EXAMPLES, options=2), question("t1", HELDOUT_EXAMPLES, options=4)]
    tasks = describe_questions(questions)
    assert tasks["t1"]["n"] == 2
    assert tasks["t1"]["split"] == HELDOUT_EXAMPLES
    assert tasks["t1"]["chance"] == pytest.approx((1 / 2 + 1 / 4) / 2)


def test_gpqa_counts_as_a_heldout_task():
    questions = load_questions((), ("gpqa",), per_task=3)
    assert len(questions) == 3
    assert {q.task for q in questions} == {"gpqa"}
    assert {q.split for q in questions} == {HELDOUT_TASKS_SPLIT}
