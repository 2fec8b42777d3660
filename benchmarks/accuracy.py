"""Multiple-choice accuracy of each mode: option log-likelihood in process, generated answers matched to options.

Questions are BIG-bench multiple-choice examples in the chat format of
`cachetalk.bridges.data` ("A. option" lines, the answer "B. text"): the test split of
the tasks the bridges were trained on (held-out examples) and every example of tasks
they never saw (held-out tasks).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import httpx
import torch

from cachetalk.benchmarks.stats import accuracy_summary
from cachetalk.bridges.data import GPQA_TASK, Sample, load_samples
from cachetalk.bridges.evaluate import encode_options, evaluate_sample, option_scores
from cachetalk.bridges.store import Bridge
from cachetalk.bridges.train import prefill_layers
from cachetalk.server.broker_modes import with_sharer_notes
from cachetalk.server.models import LoadedModel

logger = logging.getLogger(__name__)

# Tasks the default bridges were trained on: their test split gives held-out examples.
TRAINING_TASKS = (
    "social_iqa", "winowhy", "timedial", "strategyqa", "epistemic_reasoning", "reasoning_about_colored_objects",
    "logical_fallacy_detection", "play_dialog_same_or_different", "question_selection", "sports_understanding",
    "navigate", "temporal_sequences", "disambiguation_qa", "date_understanding",
)
# Tasks the bridges never saw: all their examples are held out.
HELDOUT_TASKS = ("general_knowledge", "physical_intuition", "emoji_movie", "odd_one_out", "anachronisms",
                 "understanding_fables")
QUICK_TRAINING_TASKS = ("sports_understanding",)
QUICK_HELDOUT_TASKS = ("general_knowledge",)

HELDOUT_EXAMPLES = "heldout_examples"
HELDOUT_TASKS_SPLIT = "heldout_tasks"


@dataclass
class Question:
    sample: Sample
    split: str  # HELDOUT_EXAMPLES or HELDOUT_TASKS_SPLIT

    @property
    def task(self) -> str:
        return self.sample.task

    @property
    def messages(self) -> list[dict]:
        return self.sample.prompt


def load_questions(training_tasks: tuple[str, ...], heldout_tasks: tuple[str, ...], per_task: int) -> list[Question]:
    """Load at most `per_task` questions of each task: test split of training tasks, all of held-out ones."""
    questions = []
    for tasks, split, split_name in ((training_tasks, "test", HELDOUT_EXAMPLES),
                                     (heldout_tasks, "all", HELDOUT_TASKS_SPLIT)):
        bigbench = [task for task in tasks if task != GPQA_TASK]
        samples = []
        if bigbench:
            samples += load_samples("bigbench:" + ",".join(bigbench), split=split, max_per_task=per_task)
        if GPQA_TASK in tasks:  # a dataset of its own, outside BIG-bench
            samples += load_samples(GPQA_TASK, max_per_task=per_task)
        usable = [s for s in samples if s.answer is not None and len(s.options) >= 2]
        questions += [Question(sample, split_name) for sample in usable]
    logger.info("loaded %d questions from %d tasks", len(questions), len({q.task for q in questions}))
    return questions


def check_heldout_tasks(bridge_card: dict, heldout_tasks: tuple[str, ...]) -> None:
    """Raise ValueError when a task counted as held out was part of the bridge's training data."""
    data = bridge_card.get("training", {}).get("data", "")
    if not data.startswith("bigbench:"):
        return
    trained = set(filter(None, data.removeprefix("bigbench:").split(",")))
    if overlap := sorted(trained & set(heldout_tasks)):
        raise ValueError(f"tasks {overlap} are listed as held out, but bridge {bridge_card.get('sharer')}->"
                         f"{bridge_card.get('receiver')} was trained on them; drop them from the held-out tasks")


def _normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


# A leading option letter with its punctuation: "B.", "(B)", "B)", "B:", "Answer: B", or "B" alone.
# A bare letter followed by a space is not taken, so that "A man ..." stays text.
_LETTER = re.compile(r"^\s*(?:answer\s*(?:is)?\s*:?\s*)?\(?([A-Z])(?:[.):]|$)", re.IGNORECASE)
# An option line such as "B. text" or "(B) text", anywhere in the answer.
_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])[.)]", re.MULTILINE)


def match_option(answer: str, options: list[str]) -> int | None:
    """Return the index of the option a generated answer names, or None when it names none or several.

    Options are "A. text" as in the sample. In order: a leading option letter; then the
    one option whose text occurs in the answer as whole words; then the one option whose
    text starts with the answer, for an answer cut by the token limit. An answer that
    lists several options (lines "A. ..." and "B. ...") or contains the text of several
    names none: repeating the options is not choosing one.
    """
    if len({letter.upper() for letter in _OPTION_LINE.findall(answer)}) > 1:
        return None
    texts = [option.split(". ", 1)[1] if ". " in option else option for option in options]
    found = _LETTER.match(answer)
    if found:
        index = ord(found.group(1).upper()) - ord("A")
        if index < len(options):
            return index

    said = _normalize(answer)
    if not said:
        return None
    normalized = [_normalize(text) for text in texts]
    # Whole words only: "plausible" does not occur in "implausible".
    contained = [i for i, text in enumerate(normalized) if text and f" {text} " in f" {said} "]
    # An option inside a longer one that also occurs ("two" in "twenty two") does not count on its own.
    contained = [i for i in contained
                 if not any(j != i and f" {normalized[i]} " in f" {normalized[j]} " for j in contained)]
    if contained:
        return contained[0] if len(contained) == 1 else None
    prefixes = [i for i, text in enumerate(normalized) if len(said) >= 3 and text.startswith(said)]
    return prefixes[0] if len(prefixes) == 1 else None


def summarize_outcomes(questions: list[Question], outcomes: list[bool]) -> dict:
    """Return the overall accuracy summary with `splits` and per-task `tasks` summaries, each with a Wilson interval."""
    summary = accuracy_summary(outcomes)
    by_split: dict[str, list[bool]] = {}
    by_task: dict[str, list[bool]] = {}
    for question, right in zip(questions, outcomes):
        by_split.setdefault(question.split, []).append(right)
        by_task.setdefault(question.task, []).append(right)
    summary["splits"] = {split: accuracy_summary(values) for split, values in by_split.items()}
    summary["tasks"] = {task: accuracy_summary(values) for task, values in by_task.items()}
    return summary


def describe_questions(questions: list[Question]) -> dict[str, dict]:
    """Per task: its split, question count and chance level (mean of 1 / options)."""
    tasks: dict[str, dict] = {}
    for question in questions:
        entry = tasks.setdefault(question.task, {"split": question.split, "n": 0, "chance": 0.0})
        entry["n"] += 1
        entry["chance"] += 1 / len(question.sample.options)
    for entry in tasks.values():
        entry["chance"] /= entry["n"]
    return tasks


def fetch_sharer_notes(sharer_url: str, sharer: str, questions: list[Question], max_tokens: int,
                       timeout_s: float = 900.0) -> list[str]:
    """Ask the sharer agent for its t2t note on each question: the request the broker sends in t2t mode.

    Greedy, at most `max_tokens` tokens (the broker's `t2t_max_tokens`), stripped as the
    broker strips it.
    """
    notes = []
    with httpx.Client(base_url=sharer_url, timeout=timeout_s) as http:
        for number, question in enumerate(questions, 1):
            body = {"model": sharer, "messages": question.messages, "max_tokens": max_tokens, "temperature": 0}
            response = http.post("/v1/chat/completions", json=body)
            response.raise_for_status()
            notes.append((response.json()["choices"][0]["message"]["content"] or "").strip())
            logger.info("sharer note %d/%d (%s): %d characters", number, len(questions), question.task,
                        len(notes[-1]))
    return notes


def best_option(scores: list[float]) -> int:
    return max(range(len(scores)), key=scores.__getitem__)


@torch.inference_mode()
def t2t_is_right(receiver: LoadedModel, sharer_name: str, question: Question, note: str,
                 max_prompt_tokens: int) -> bool:
    """Score the options under the receiver's cache of the t2t prompt: the sharer's note, then the question."""
    messages = with_sharer_notes(question.messages, [(sharer_name, note)])
    sample = question.sample
    t2t_sample = Sample(messages + sample.messages[-1:], sample.options, sample.answer, sample.task)
    encoded = encode_options(receiver, receiver, t2t_sample, max_prompt_tokens)
    layers = prefill_layers(receiver, encoded[0].receiver_ids[:encoded[0].prompt_len - 1])
    return best_option(option_scores(receiver, layers, encoded)) == sample.answer


def loglik_outcomes(questions: list[Question], receiver: LoadedModel, sharer: LoadedModel, bridge: Bridge,
                    self_bridge: Bridge | None, notes: list[str] | None, max_prompt_tokens: int,
                    t2t_max_tokens: int) -> dict[str, list[bool]]:
    """Per mode, whether the top log-likelihood option of each question is the right one.

    solo, sharer, c2c and self come from the bridges' evaluation code. A t2t prompt also
    contains the note and its preamble. Its truncation limit therefore grows by the note
    budget plus 128 tokens, so that the note does not push the question out of the prompt.
    """
    outcomes: dict[str, list[bool]] = {}
    for number, question in enumerate(questions):
        result = evaluate_sample(question.sample, receiver, sharer, bridge, self_bridge, max_prompt_tokens)
        result["solo"] = result.pop("receiver")
        if notes is not None:
            result["t2t"] = t2t_is_right(receiver, sharer.name, question, notes[number],
                                         max_prompt_tokens + t2t_max_tokens + 128)
        for mode, right in result.items():
            outcomes.setdefault(mode, []).append(right)
        logger.info("log-likelihood %d/%d (%s): %s", number + 1, len(questions), question.task,
                    ", ".join(f"{mode} {'right' if right else 'wrong'}" for mode, right in result.items()))
    return outcomes
