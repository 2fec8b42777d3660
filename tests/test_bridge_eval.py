"""Multiple-choice evaluation of receiver, sharer, C2C and self bridge on questions the test writes."""

import json

import pytest

from cachetalk.bridges.data import load_samples
from cachetalk.bridges.evaluate import evaluate, format_table
from cachetalk.bridges.store import Bridge
from cachetalk.bridges.train import new_fuser

QUESTIONS = [
    ("What colour is the sky on a clear day?", ["A. green", "B. blue"], 1),
    ("How many legs does a dog have?", ["A. four", "B. two", "C. six"], 0),
]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_untrained_bridges_match_receiver(receiver, sharer, tmp_path):
    path = tmp_path / "questions.jsonl"
    lines = []
    for question, options, answer in QUESTIONS:
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": options[answer]}]
        lines.append(json.dumps({"messages": messages, "options": options, "answer": answer, "task": "tiny"}))
    path.write_text("\n".join(lines) + "\n")
    samples = load_samples(str(path))

    # A new fuser's output layer is zero, so C2C and the self bridge must score like the receiver.
    bridge = Bridge(new_fuser(receiver, sharer, hidden=16, depth=1), {})
    self_bridge = Bridge(new_fuser(receiver, receiver, hidden=16, depth=1), {})
    results = evaluate(samples, receiver, sharer, bridge, self_bridge)

    overall = results["overall"]
    assert overall["questions"] == 2
    assert overall["chance"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert overall["c2c"] == overall["receiver"]
    assert overall["self"] == overall["receiver"]
    assert 0 <= overall["sharer"] <= 1
    assert results["tasks"]["tiny"]["questions"] == 2

    table = format_table(results)
    assert table.splitlines()[0] == "| task | n | chance | receiver | sharer | c2c | self |"
    assert "| tiny | 2 |" in table
