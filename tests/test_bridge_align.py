"""Token alignment between the real SmolLM2 (receiver) and Gemma 3 (sharer) tokenizers."""

import pytest
from transformers import AutoTokenizer

from cachetalk.bridges.align import ROLE, SPECIAL, TEXT, align_ids, align_tokens, label_tokens, template_markers
from cachetalk.server.models import ensure_default_model


@pytest.fixture(scope="module")
def smollm():
    return AutoTokenizer.from_pretrained(ensure_default_model("smollm2-135m"))


@pytest.fixture(scope="module")
def gemma():
    return AutoTokenizer.from_pretrained(ensure_default_model("gemma3-270m"))


CHATS = {
    "unicode and emoji": [{"role": "user", "content": "Café naïve 😀🎉 日本語 — ok?"}],
    "digits": [{"role": "user", "content": "What is 12345 + 67890? Answer: 80235"}],
    "whitespace runs": [{"role": "user", "content": "a    b\t\tc\n\n\n  d   "}],
    "system turn": [{"role": "system", "content": "You are terse."},
                    {"role": "user", "content": "Name a colour."}],
    "empty message": [{"role": "user", "content": ""}],
    "multi turn": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                   {"role": "user", "content": "Bye"}],
}


@pytest.mark.parametrize("name", list(CHATS))
def test_align_equal_length(smollm, gemma, name):
    receiver_ids, sharer_ids = align_tokens(smollm, gemma, CHATS[name])
    assert receiver_ids == smollm.apply_chat_template(CHATS[name], add_generation_prompt=True)["input_ids"]
    assert len(sharer_ids) == len(receiver_ids)
    assert all(0 <= i < len(gemma) for i in sharer_ids)


def test_align_keeps_ascii_text(smollm, gemma):
    for name in ("digits", "system turn"):
        content = CHATS[name][-1]["content"]
        _, sharer_ids = align_tokens(smollm, gemma, CHATS[name])
        assert content in gemma.decode(sharer_ids), name


def test_text_tokens_map_to_pieces(smollm, gemma):
    # One token per position: a receiver token that the sharer splits keeps its longest piece.
    messages = CHATS["unicode and emoji"]
    rendered = smollm.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    receiver_ids, labels = label_tokens(smollm, messages)
    sharer_ids = align_ids(smollm, gemma, receiver_ids, labels)
    for position, label in enumerate(labels):
        if label == TEXT:
            piece = gemma.decode([sharer_ids[position]])
            assert piece and piece in rendered, (position, piece)


def test_align_emoji_bytes_map_to_emoji(smollm, gemma):
    receiver_ids, sharer_ids = align_tokens(smollm, gemma, [{"role": "user", "content": "x 😀 y"}])
    text = "".join(gemma.decode([i]) for i in sharer_ids)
    assert "😀" in text
    assert "\ufffd" not in text


def test_special_tokens_map_to_counterparts(smollm, gemma):
    receiver_ids, sharer_ids = align_tokens(smollm, gemma, CHATS["system turn"])
    im_start, im_end = smollm.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    start_of_turn, end_of_turn = gemma.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"])

    assert receiver_ids[0] == im_start
    assert sharer_ids[0] == gemma.bos_token_id  # the Gemma template starts with BOS
    for r, s in zip(receiver_ids[1:], sharer_ids[1:]):
        if r == im_start:
            assert s == start_of_turn
        if r == im_end:
            assert s == end_of_turn
    assert receiver_ids.count(im_end) == sharer_ids.count(end_of_turn)


def test_role_words_map_to_sharer_roles(smollm, gemma):
    receiver_ids, sharer_ids = align_tokens(smollm, gemma, [{"role": "user", "content": "Hi"}])
    ids, labels = label_tokens(smollm, [{"role": "user", "content": "Hi"}])
    role_positions = [i for i, label in enumerate(labels) if label == ROLE]
    roles = {gemma.decode([sharer_ids[i]]) for i in role_positions}
    assert "model" in roles  # "assistant" of the generation prompt
    assert "user" in roles
    assert "assistant" not in roles


def test_template_markers_found(smollm, gemma):
    receiver = template_markers(smollm)
    sharer = template_markers(gemma)
    assert (receiver.turn_start, receiver.turn_end) == ("<|im_start|>", "<|im_end|>")
    assert (sharer.turn_start, sharer.turn_end) == ("<start_of_turn>", "<end_of_turn>")
    assert sharer.role_words["assistant"] == "model"
    assert receiver.role_words["assistant"] == "assistant"


def test_labels_cover_sections(smollm):
    ids, labels = label_tokens(smollm, CHATS["system turn"])
    assert len(ids) == len(labels)
    assert set(labels) == {SPECIAL, ROLE, TEXT}
    assert labels[0] == SPECIAL


def test_identical_tokenizers_same_ids(smollm):
    receiver_ids, sharer_ids = align_tokens(smollm, smollm, CHATS["multi turn"])
    assert sharer_ids == receiver_ids


def test_align_ids_rejects_label_mismatch(smollm, gemma):
    with pytest.raises(ValueError, match="labels"):
        align_ids(smollm, gemma, [1, 2, 3], [TEXT])


def test_reverse_direction_equal_length(smollm, gemma):
    receiver_ids, sharer_ids = align_tokens(gemma, smollm, CHATS["system turn"])
    assert len(receiver_ids) == len(sharer_ids)
    assert smollm.convert_tokens_to_ids("<|im_end|>") in sharer_ids
