"""The fuser, the layer map and the bridge store, on the real default models."""

import json

import pytest
import torch

from cachetalk.bridges.align import align_tokens
from cachetalk.bridges.fuser import Fuser, FuserConfig, terminal_layer_map
from cachetalk.bridges.store import (BridgeFormatError, BridgeMismatchError, default_bridge_dir, load_bridge,
                                     save_bridge)
from cachetalk.bridges.train import Encoded, new_fuser, prefill_layers, sample_loss


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def caches(receiver, sharer):
    messages = [{"role": "user", "content": "Which is heavier, a kilogram of iron or of feathers?"}]
    receiver_ids, sharer_ids = align_tokens(receiver.tokenizer, sharer.tokenizer, messages)
    return prefill_layers(receiver, receiver_ids[:-1]), prefill_layers(sharer, sharer_ids[:-1])


@pytest.mark.parametrize("receiver_layers, sharer_layers, expected", [
    (4, 6, [2, 3, 4, 5]),  # deeper sharer: the last layers line up
    (6, 4, [0, 0, 0, 1, 2, 3]),  # shallower sharer: early receiver layers clamp to 0
    (3, 3, [0, 1, 2]),  # equal depth
])
def test_terminal_layer_map(receiver_layers, sharer_layers, expected):
    assert terminal_layer_map(receiver_layers, sharer_layers) == expected


def test_layer_map_default_pair():
    layer_map = terminal_layer_map(30, 18)
    assert layer_map[-1] == 17
    assert layer_map[:13] == [0] * 13
    assert layer_map[12:] == list(range(0, 18))


def test_fuser_shapes(receiver, sharer, caches):
    receiver_layers, sharer_layers = caches
    fuser = new_fuser(receiver, sharer, hidden=32, depth=2)
    with torch.no_grad():
        torch.nn.init.normal_(fuser.key_projectors[5].out.weight)  # make the update visible
        fused = fuser(receiver_layers, sharer_layers)
    assert len(fused) == receiver.num_layers
    for (k, v), (fk, fv) in zip(receiver_layers, fused):
        assert fk.shape == k.shape == (1, 3, k.shape[2], 64)
        assert fv.shape == v.shape
    assert not torch.equal(fused[5][0], receiver_layers[5][0])


def test_closed_gates_return_receiver_cache(receiver, sharer, caches):
    receiver_layers, sharer_layers = caches
    fuser = new_fuser(receiver, sharer, hidden=16, depth=1)
    for projector in [*fuser.key_projectors, *fuser.value_projectors]:
        torch.nn.init.normal_(projector.out.weight)
    with torch.no_grad():
        fuser.gate_logits.fill_(-1.0)
    fuser.eval()
    fused = fuser(receiver_layers, sharer_layers)
    for (k, v), (fk, fv) in zip(receiver_layers, fused):
        assert torch.equal(fk, k)
        assert torch.equal(fv, v)
    assert fuser.open_layers() == [(False, False)] * receiver.num_layers


def test_fuser_rejects_unaligned_lengths(receiver, sharer, caches):
    receiver_layers, sharer_layers = caches
    shorter = [(k[:, :, :-1], v[:, :, :-1]) for k, v in sharer_layers]
    fuser = new_fuser(receiver, sharer, hidden=16, depth=1)
    with pytest.raises(ValueError, match="align the tokens"):
        fuser(receiver_layers, shorter)


def test_gradients_reach_bridge_only(receiver, sharer):
    messages = [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "Yes."}]
    receiver_ids, sharer_ids = align_tokens(receiver.tokenizer, sharer.tokenizer, messages, False)
    prompt_len = len(align_tokens(receiver.tokenizer, sharer.tokenizer, messages[:1])[0])
    sample = Encoded(receiver_ids, sharer_ids, prompt_len, 3)

    fuser = new_fuser(receiver, sharer, hidden=16, depth=1)
    for projector in [*fuser.key_projectors, *fuser.value_projectors]:
        torch.nn.init.normal_(projector.out.weight, std=0.01)
    fuser.train()
    sample_loss(fuser, receiver, sharer, sample).backward()

    for name, parameter in fuser.named_parameters():
        assert parameter.grad is not None, name
    assert fuser.key_projectors[0].into_hidden.weight.grad.abs().sum() > 0
    assert fuser.value_projectors[-1].into_hidden.weight.grad.abs().sum() > 0
    assert fuser.gate_logits.grad.abs().sum() > 0
    for model in (receiver, sharer):
        for parameter in model.model.parameters():
            assert not parameter.requires_grad
            assert parameter.grad is None


def small_fuser() -> Fuser:
    config = FuserConfig(4, 2, 8, 3, 1, 16, hidden=12, depth=2)
    fuser = Fuser(config, terminal_layer_map(4, 3))
    for parameter in fuser.parameters():
        torch.nn.init.normal_(parameter)
    return fuser


CARD = {"sharer": "sharer-model", "receiver": "receiver-model",
        "sharer_fingerprint": "aaaa", "receiver_fingerprint": "bbbb"}


def test_store_round_trip(tmp_path):
    fuser = small_fuser()
    save_bridge(tmp_path, fuser, CARD, dtype="float16")
    bridge = load_bridge(tmp_path)

    assert bridge.card["layer_map"] == [0, 0, 1, 2]
    assert bridge.card["format_version"] == 1
    assert bridge.card["dtype"] == "float16"
    assert bridge.card["size_bytes"] == (tmp_path / "bridge.safetensors").stat().st_size
    saved = fuser.state_dict()
    for name, tensor in bridge.fuser.state_dict().items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, saved[name].to(torch.float16).to(torch.float32)), name

    layers = [(torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)) for _ in range(4)]
    sharer_layers = [(torch.randn(1, 1, 5, 16), torch.randn(1, 1, 5, 16)) for _ in range(3)]
    fused = bridge.fuse(layers, sharer_layers)
    assert [tuple(k.shape) for k, _ in fused] == [(1, 2, 5, 8)] * 4


def test_store_rejects_other_format(tmp_path):
    save_bridge(tmp_path, small_fuser(), CARD)
    card = json.loads((tmp_path / "bridge.json").read_text())
    card["format_version"] = 99
    (tmp_path / "bridge.json").write_text(json.dumps(card))
    with pytest.raises(BridgeFormatError, match="format version 99"):
        load_bridge(tmp_path)


def test_mismatched_fingerprint_rejected(tmp_path):
    save_bridge(tmp_path, small_fuser(), CARD)
    bridge = load_bridge(tmp_path)
    bridge.check("aaaa", "bbbb")
    with pytest.raises(BridgeMismatchError) as error:
        bridge.check("aaaa", "cccc")
    message = str(error.value)
    for word in ("sharer-model", "receiver-model", "aaaa", "bbbb", "cccc"):
        assert word in message


def test_default_bridge_dir():
    assert default_bridge_dir().name == "trained"
    assert default_bridge_dir().parent.name == "bridges"
