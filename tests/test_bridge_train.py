"""Bridge training on data the tests write: loss goes down, resume continues exactly, BIG-bench conversion."""

import json
from collections import Counter

import pytest
import torch

from cachetalk.bridges.data import gpqa_samples, letter, load_samples, split_of
from cachetalk.bridges.train import TrainConfig, encode_sample, new_fuser, train, validation_loss

FACTS = [
    ("What is the code word?", "The code word is zebra."),
    ("Name the secret colour.", "The secret colour is teal."),
    ("Which planet is ours?", "Our planet is Earth."),
    ("What does the sign say?", "The sign says stop."),
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def jsonl(tmp_path):
    path = tmp_path / "chats.jsonl"
    lines = [json.dumps({"messages": [{"role": "system", "content": "Reply in one sentence."},
                                      {"role": "user", "content": q}, {"role": "assistant", "content": a}]})
             for q, a in FACTS]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_training_lowers_loss(receiver, sharer, jsonl, tmp_path):
    samples = load_samples(str(jsonl))
    assert len(samples) == 4
    encoded = [encode_sample(receiver, sharer, s.messages, 384) for s in samples[:2]]
    torch.manual_seed(0)
    fuser = new_fuser(receiver, sharer, hidden=32, depth=1)
    before = validation_loss(fuser, receiver, sharer, encoded)

    config = TrainConfig(steps=5, batch=2, lr=3e-3, warmup=0.1, checkpoint_every=100)
    state = train(fuser, receiver, sharer, encoded, config, tmp_path / "out")
    after = validation_loss(fuser, receiver, sharer, encoded)

    assert state["step"] == 5
    assert len(state["losses"]) == 5
    assert after < before - 0.05, (before, after)


def test_resume_continues_exactly(receiver, jsonl, tmp_path):
    samples = load_samples(str(jsonl))
    encoded = [encode_sample(receiver, receiver, s.messages, 384) for s in samples]
    config = TrainConfig(steps=4, batch=1, lr=1e-3, seed=3, checkpoint_every=2)

    torch.manual_seed(3)
    straight = new_fuser(receiver, receiver, hidden=16, depth=1)
    train(straight, receiver, None, encoded, config, tmp_path / "straight")

    torch.manual_seed(3)
    interrupted = new_fuser(receiver, receiver, hidden=16, depth=1)
    train(interrupted, receiver, None, encoded, config, tmp_path / "resumed", until=2)
    state = json.loads((tmp_path / "resumed" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 2
    assert state["position"] == 2

    torch.manual_seed(99)  # a fresh process: other weights and RNG state until the checkpoint loads
    resumed = new_fuser(receiver, receiver, hidden=16, depth=1)
    final = train(resumed, receiver, None, encoded, config, tmp_path / "resumed", resume=True)
    assert final["step"] == 4
    expected = straight.state_dict()
    for name, tensor in resumed.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


TASK = {
    "name": "tiny_task",
    "task_prefix": "Pick the animal.",
    "examples": [
        {"input": "Which one barks?", "target_scores": {"cat": 0, "dog": 1, "fish": 0}},
        {"input": "Free text only", "target": "no options"},
        {"input": "Which one swims?", "target_scores": {"fish": 1, "cat": 0}},
    ],
}


@pytest.fixture()
def tasks_dir(tmp_path):
    (tmp_path / "tiny_task").mkdir()
    (tmp_path / "tiny_task" / "task.json").write_text(json.dumps(TASK))
    big = {"examples": [{"input": f"q{i}", "target_scores": {"yes": 1, "no": 0}} for i in range(2000)]}
    (tmp_path / "big_task" / "part_a").mkdir(parents=True)
    (tmp_path / "big_task" / "part_a" / "task.json").write_text(json.dumps(big))
    return tmp_path


def test_bigbench_example_to_chat(tasks_dir):
    samples = load_samples("bigbench:tiny_task", "all", tasks_dir=tasks_dir)
    assert len(samples) == 2  # the free-text example is skipped
    first = samples[0]
    user, assistant = first.messages
    assert user["role"] == "user"
    assert user["content"].startswith("Pick the animal.\nWhich one barks?")
    assert sorted(option[3:] for option in first.options) == ["cat", "dog", "fish"]
    assert "\n".join(first.options) in user["content"]
    assert first.options[first.answer].endswith(". dog")
    assert assistant == {"role": "assistant", "content": first.options[first.answer]}
    assert [option[0] for option in first.options] == ["A", "B", "C"]
    assert first.task == "tiny_task"
    assert letter(27) == "Z2"


def test_bigbench_splits(tasks_dir):
    splits = {name: load_samples("bigbench:big_task", name, tasks_dir=tasks_dir)
              for name in ("train", "validation", "test")}
    counts = {name: len(samples) for name, samples in splits.items()}
    assert sum(counts.values()) == 2000
    assert 1300 < counts["train"] < 1500
    assert 140 < counts["validation"] < 260
    assert 330 < counts["test"] < 470
    inputs = {name: {s.messages[0]["content"] for s in samples} for name, samples in splits.items()}
    assert not inputs["train"] & inputs["test"]
    assert not inputs["train"] & inputs["validation"]
    assert splits["train"][0].task == "big_task/part_a"
    assert split_of("big_task/part_a", 7) == split_of("big_task/part_a", 7)
    capped = load_samples("bigbench:big_task", "train", max_per_task=5, tasks_dir=tasks_dir)
    assert len(capped) == 5
    assert Counter(split_of("t", i) for i in range(100)).keys() <= {"train", "validation", "test"}


def test_unknown_bigbench_task(tasks_dir):
    with pytest.raises(FileNotFoundError, match="no_such_task"):
        load_samples("bigbench:no_such_task", "all", tasks_dir=tasks_dir)


def test_gpqa_rows_to_chat():
    row = {"Question": "Which gas do plants take in?", "Correct Answer": "carbon dioxide",
           "Incorrect Answer 1": "helium", "Incorrect Answer 2": "neon", "Incorrect Answer 3": "argon"}
    samples = gpqa_samples([row] * 8)
    for sample in samples:
        user, assistant = sample.messages
        assert user["content"].startswith("Which gas do plants take in?\n\nOptions:\n")
        assert sorted(option[3:] for option in sample.options) == ["argon", "carbon dioxide", "helium", "neon"]
        assert sample.options[sample.answer].endswith(". carbon dioxide")
        assert assistant == {"role": "assistant", "content": sample.options[sample.answer]}
        assert sample.task == "gpqa"
    # Shuffled per question, so the right option is not always in the same place.
    assert len({sample.answer for sample in samples}) > 1


def test_gpqa_from_its_wheel():
    samples = load_samples("gpqa")
    assert len(samples) == 198  # GPQA Diamond
    assert all(len(sample.options) == 4 and sample.answer in range(4) for sample in samples)
    assert len(load_samples("gpqa", max_per_task=5)) == 5
