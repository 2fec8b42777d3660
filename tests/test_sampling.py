"""OpenAI's frequency and presence penalties on the logits of the next token."""

from __future__ import annotations

import torch

from cachetalk.server.generate import SamplingParams, penalize


def test_penalties_scale_with_counts():
    logits = torch.zeros(8)
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)

    penalized = penalize(logits, params, generated=[3, 3, 5])

    assert penalized[3].item() == -1.25  # twice: 2 x 0.5 + 0.25
    assert penalized[5].item() == -0.75  # once: 0.5 + 0.25
    assert penalized[[0, 1, 2, 4, 6, 7]].eq(0).all()
    assert logits.eq(0).all()  # the caller's logits are left as they were


def test_negative_penalties_favour_repeats():
    penalized = penalize(torch.zeros(4), SamplingParams(presence_penalty=-1.0), generated=[2])
    assert penalized[2].item() == 1.0


def test_no_penalty_returns_logits_unchanged():
    logits = torch.arange(4.0)
    assert penalize(logits, SamplingParams(), generated=[1, 2]) is logits
    assert penalize(logits, SamplingParams(frequency_penalty=1.0), generated=[]) is logits
