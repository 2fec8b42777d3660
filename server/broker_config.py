"""Broker configuration, read from a YAML or TOML file.

Example (YAML):

    agents:
      - name: smollm2-135m          # the model name the agent serves
        url: http://127.0.0.1:8001
      - name: gemma3-270m
        url: http://127.0.0.1:8002
    bridges:                        # folders, relative to this file
      - ../bridges/trained          # a folder of bridge folders, or one bridge folder
    timeouts:                       # seconds
      connect: 5
      read: 300
      request: 900
      health: 2
    t2t_max_tokens: 256

`agents` may also be a map from name to URL. An agent entry may add `model`, the name
the agent serves, when it differs from the broker's name for it (two agents serving
the same model need two names). A bridge folder contains `bridge.json` and
`bridge.safetensors`. A folder without `bridge.json` is searched one level down.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import yaml

BRIDGE_CARD = "bridge.json"


class ConfigError(ValueError):
    """An invalid broker configuration; the message names the file and the entry."""


@dataclass(frozen=True)
class AgentConfig:
    name: str  # what clients call the agent: `model` and `cachetalk.sharers` of a request
    url: str
    model: str | None = None  # the model name the agent serves, when it is not `name`

    @property
    def served_model(self) -> str:
        return self.model or self.name


@dataclass(frozen=True)
class Timeouts:
    """Seconds the broker waits on an agent before it returns 504 to the client."""

    connect: float = 5.0  # to open a connection
    read: float = 300.0  # between two reads of one response
    request: float = 900.0  # for one whole call to an agent
    health: float = 2.0  # for a health probe


@dataclass
class BrokerConfig:
    agents: dict[str, AgentConfig]
    bridge_dirs: list[Path] = field(default_factory=list)
    timeouts: Timeouts = field(default_factory=Timeouts)
    t2t_max_tokens: int = 256
    source: Path | None = None


def load_config(path: str | Path) -> BrokerConfig:
    """Read a broker config file (.yaml, .yml or .toml); relative paths are resolved against its folder."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"broker config {path} not found")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        else:
            data = yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"broker config {path} is not valid {path.suffix.lstrip('.').upper()}: {exc}") from None
    return parse_config(data or {}, path.parent, source=path)


def parse_config(data: dict, base: Path, source: Path | None = None) -> BrokerConfig:
    """Validate a config mapping; `base` is the folder that relative bridge paths start from."""
    where = f"broker config {source}" if source else "broker config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    unknown = sorted(set(data) - {"agents", "bridges", "timeouts", "t2t_max_tokens"})
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; expected agents, bridges, timeouts, t2t_max_tokens")

    agents = _parse_agents(data.get("agents"), where)
    bridge_dirs = [_resolve_bridge_path(entry, base, where) for entry in data.get("bridges") or []]
    timeouts = _parse_timeouts(data.get("timeouts") or {}, where)
    t2t_max_tokens = data.get("t2t_max_tokens", 256)
    if not isinstance(t2t_max_tokens, int) or isinstance(t2t_max_tokens, bool) or t2t_max_tokens < 1:
        raise ConfigError(f"{where}: t2t_max_tokens must be a positive integer, got {t2t_max_tokens!r}")
    return BrokerConfig(agents, bridge_dirs, timeouts, t2t_max_tokens, source)


def _parse_agents(raw: object, where: str) -> dict[str, AgentConfig]:
    if isinstance(raw, dict):
        raw = [{"name": name, "url": url} for name, url in raw.items()]
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}: 'agents' must list at least one agent with a name and a url")

    agents: dict[str, AgentConfig] = {}
    for index, entry in enumerate(raw):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not isinstance(entry.get("url"), str):
            raise ConfigError(f"{where}: agents[{index}] needs string fields 'name' and 'url', got {entry!r}")
        if unknown := sorted(set(entry) - {"name", "url", "model"}):
            raise ConfigError(f"{where}: agents[{index}] has unknown keys {unknown}; expected name, url, model")
        if entry.get("model") is not None and not isinstance(entry["model"], str):
            raise ConfigError(f"{where}: agents[{index}].model must be a string, got {entry['model']!r}")
        url = entry["url"].rstrip("/")
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ConfigError(f"{where}: agent {entry['name']!r} has URL {url!r}; expected http://HOST:PORT")
        if entry["name"] in agents:
            raise ConfigError(f"{where}: agent {entry['name']!r} is listed twice")
        agents[entry["name"]] = AgentConfig(entry["name"], url, entry.get("model"))
    return agents


def _resolve_bridge_path(entry: object, base: Path, where: str) -> Path:
    if not isinstance(entry, str):
        raise ConfigError(f"{where}: each entry of 'bridges' must be a folder path, got {entry!r}")
    path = (base / Path(entry).expanduser()).resolve()
    if not path.is_dir():
        raise ConfigError(f"{where}: bridge folder {path} not found")
    return path


def _parse_timeouts(raw: object, where: str) -> Timeouts:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: 'timeouts' must be a mapping of seconds")
    known = set(Timeouts.__dataclass_fields__)
    if unknown := sorted(set(raw) - known):
        raise ConfigError(f"{where}: unknown timeouts {unknown}; expected {sorted(known)}")
    for name, value in raw.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{where}: timeouts.{name} must be a positive number of seconds, got {value!r}")
    return Timeouts(**{name: float(value) for name, value in raw.items()})


def find_bridge_folders(paths: list[Path]) -> list[Path]:
    """Expand config entries into bridge folders: a folder with `bridge.json`, or its subfolders that have one."""
    found: list[Path] = []
    for path in paths:
        candidates = [path] if (path / BRIDGE_CARD).is_file() else sorted(p for p in path.iterdir() if p.is_dir())
        for folder in candidates:
            if (folder / BRIDGE_CARD).is_file() and folder not in found:
                found.append(folder)
    return found
