"""Broker config files (YAML, TOML), bridge folder discovery and the t2t prompt; no models needed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cachetalk.server.broker_config import ConfigError, Timeouts, find_bridge_folders, load_config, parse_config
from cachetalk.server.broker_modes import T2T_PREAMBLE, with_sharer_notes

YAML = """
agents:
  - name: smollm2-135m
    url: http://127.0.0.1:8001/
  - name: gemma3-270m
    url: http://127.0.0.1:8002
bridges: [bridges]
timeouts: {connect: 2, request: 60}
t2t_max_tokens: 64
"""

TOML = """
t2t_max_tokens = 64
bridges = ["bridges"]

[[agents]]
name = "smollm2-135m"
url = "http://127.0.0.1:8001/"

[[agents]]
name = "gemma3-270m"
url = "http://127.0.0.1:8002"

[timeouts]
connect = 2
request = 60
"""


def make_bridge_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "bridge.json").write_text(json.dumps({"sharer": "a", "receiver": "b"}))
    return path


@pytest.mark.parametrize("name, text", [("broker.yaml", YAML), ("broker.toml", TOML)])
def test_yaml_and_toml_read_alike(tmp_path, name, text):
    (tmp_path / "bridges").mkdir()
    (tmp_path / name).write_text(text)

    config = load_config(tmp_path / name)

    assert list(config.agents) == ["smollm2-135m", "gemma3-270m"]
    assert config.agents["smollm2-135m"].url == "http://127.0.0.1:8001"
    assert config.agents["gemma3-270m"].served_model == "gemma3-270m"
    assert config.bridge_dirs == [(tmp_path / "bridges").resolve()]
    assert config.timeouts == Timeouts(connect=2.0, read=Timeouts.read, request=60.0, health=Timeouts.health)
    assert config.t2t_max_tokens == 64


def test_defaults_and_agent_map(tmp_path):
    config = parse_config({"agents": {"r": "http://127.0.0.1:1", "s": "https://example.test:2"}}, tmp_path)

    assert config.agents["s"].url == "https://example.test:2"
    assert config.bridge_dirs == []
    assert config.timeouts == Timeouts()
    assert config.t2t_max_tokens == 256


def test_served_model_differs_from_name(tmp_path):
    config = parse_config({"agents": [{"name": "b", "model": "smollm2-135m", "url": "http://127.0.0.1:1"}]}, tmp_path)

    assert config.agents["b"].served_model == "smollm2-135m"


@pytest.mark.parametrize("data, words", [
    ({}, "at least one agent"),
    ({"agents": [{"name": "a"}]}, "'name' and 'url'"),
    ({"agents": [{"name": "a", "url": "127.0.0.1:8001"}]}, "expected http://HOST:PORT"),
    ({"agents": [{"name": "a", "url": "http://h:1"}, {"name": "a", "url": "http://h:2"}]}, "listed twice"),
    ({"agents": [{"name": "a", "url": "http://h:1", "port": 3}]}, "unknown keys ['port']"),
    ({"agents": {"a": "http://h:1"}, "bridges": ["missing"]}, "not found"),
    ({"agents": {"a": "http://h:1"}, "timeouts": {"connect": 0}}, "positive number"),
    ({"agents": {"a": "http://h:1"}, "timeouts": {"total": 3}}, "unknown timeouts ['total']"),
    ({"agents": {"a": "http://h:1"}, "t2t_max_tokens": 0}, "positive integer"),
    ({"agents": {"a": "http://h:1"}, "bridge": []}, "unknown keys ['bridge']"),
])
def test_invalid_config_is_rejected(tmp_path, data, words):
    with pytest.raises(ConfigError) as error:
        parse_config(data, tmp_path)

    assert words in str(error.value)


def test_unparsable_file_names_format(tmp_path):
    path = tmp_path / "broker.toml"
    path.write_text("agents = [")

    with pytest.raises(ConfigError) as error:
        load_config(path)

    assert "not valid TOML" in str(error.value)


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_config(tmp_path / "none.yaml")

    assert "not found" in str(error.value)


def test_bridge_folders_expand_one_level(tmp_path):
    single = make_bridge_folder(tmp_path / "one")
    make_bridge_folder(tmp_path / "many" / "b-pair")
    make_bridge_folder(tmp_path / "many" / "a-pair")
    (tmp_path / "many" / "not-a-bridge").mkdir()

    found = find_bridge_folders([single, tmp_path / "many", single])

    assert found == [single, tmp_path / "many" / "a-pair", tmp_path / "many" / "b-pair"]


def test_sharer_notes_lead_the_conversation():
    messages = [{"role": "user", "content": "Q?"}]

    result = with_sharer_notes(messages, [("gemma3-270m", "It is 4.")])

    assert result[0]["role"] == "system"
    assert result[0]["content"].startswith(T2T_PREAMBLE)
    assert "Notes from gemma3-270m:\nIt is 4." in result[0]["content"]
    assert result[1:] == messages


def test_sharer_notes_join_existing_system_message():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q?"}]

    result = with_sharer_notes(messages, [("a", "x"), ("b", "y")])

    assert len(result) == 2
    assert result[0]["content"].startswith("Be brief.\n\n" + T2T_PREAMBLE)
    assert result[0]["content"].index("Notes from a:") < result[0]["content"].index("Notes from b:")
    assert messages[0]["content"] == "Be brief."  # the request's own messages are not changed
