"""The README's commands run as written from a fresh clone (issue 27, item 5).

Every command in its ```bash blocks and every inline `...` command with arguments is read with shlex:
- `python -m ml_backend ...` is `.venv/bin/python -m ml_backend ...` (the venv scripts/install.sh makes; a bare
  `python` has no torch), except inside a container (`docker compose ... exec <service> python -m ...`);
- every `python -m ml_backend` command parses with the command line's own argparse (placeholders such as
  `<id>` filled in);
- the scripts, benchmark modules and compose files they name exist;
- those that need no Label Studio, no model and no network run as written, in a fresh checkout (a folder with
  the repository's files and `../shared` beside it): `versions`, the Auth section's `connect` without
  LABEL_STUDIO_URL (it must say so), `python3 -c ...`.
Synopses (`[--json]`, `<command>`, `ID`) are descriptions, not commands, and are skipped.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from ml_backend.cli import build_parser, command_of
from ml_backend.settings import Settings

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
PLACEHOLDERS = {"<id>": "12", "<project id>": "12", "<token>": "token", "<its sha256>": "0" * 64}


@dataclass(frozen=True)
class Command:
    words: tuple[str, ...]
    where: str  # the README line, for messages

    @property
    def text(self) -> str:
        return " ".join(self.words)


def _fill(text: str) -> str:
    for placeholder, value in PLACEHOLDERS.items():
        text = text.replace(placeholder, value)
    return text


def _is_synopsis(text: str) -> bool:
    return bool(re.search(r"\[|\||<[a-z ]+>|\.\.\.|\s[A-Z]{1,3}(\s|$)", text))


def readme_commands() -> list[Command]:
    """The README's shell commands: lines of bash blocks (continuations joined) and inline code with arguments."""
    commands: list[Command] = []
    fenced = re.compile(r"```(\w*)\n(.*?)```", re.S)
    for match in fenced.finditer(README):
        if match.group(1) != "bash":
            continue
        for line in match.group(2).replace("\\\n", " ").splitlines():
            text = _fill(line.strip())
            if text and not text.startswith("#") and not _is_synopsis(text.split("  #")[0]):
                commands.append(Command(tuple(shlex.split(text, comments=True)), line.strip()))
    prose = fenced.sub("", README)
    for span in re.findall(r"`([^`]+)`", prose):
        text = _fill(" ".join(span.split()))
        if re.match(r"^(\.venv/bin/)?python3? -m ml_backend \S+ .*--", text) or text.startswith(
                ("docker compose ", "docker-compose ")) or re.match(r"^(\w+=\S+ )*scripts/\w+\.sh", text):
            if not _is_synopsis(text):
                commands.append(Command(tuple(shlex.split(text)), span))
    return commands


COMMANDS = readme_commands()
BACKEND_COMMANDS = [c for c in COMMANDS if "ml_backend" in c.words and "-m" in c.words]


def test_the_readme_has_the_commands_this_test_checks() -> None:
    assert len(BACKEND_COMMANDS) >= 10, [c.text for c in BACKEND_COMMANDS]
    assert any("scripts/start.sh" in c.words for c in COMMANDS)


@pytest.mark.parametrize("command", BACKEND_COMMANDS, ids=lambda c: c.text[:80])
def test_backend_commands_use_the_venv_and_parse(command: Command) -> None:
    words = list(command.words)
    python = words[words.index("-m") - 1]
    in_container = "exec" in words[:words.index("-m")]
    assert python == ".venv/bin/python" or (in_container and python == "python"), (
        f"{command.where!r}: outside a container the backend's python is .venv/bin/python")
    args = words[words.index("ml_backend") + 1:]
    try:
        build_parser(Settings(), command_of(args)).parse_args(args)
    except SystemExit:
        pytest.fail(f"{command.where!r}: the command line refuses {args}")


@pytest.mark.parametrize("command", [c for c in COMMANDS if any(w.startswith(("scripts/", "benchmarks")) or
                                                                w.startswith("-m") for w in c.words)
                                     or c.words[:2] in (("docker", "compose"), ("docker-compose",))],
                         ids=lambda c: c.text[:80])
def test_named_files_exist(command: Command) -> None:
    words = list(command.words)
    for word in words:
        if re.fullmatch(r"scripts/\w+\.sh", word):
            assert os.access(REPO / word, os.X_OK), f"{command.where!r}: {word} is not an executable script"
        if re.fullmatch(r"benchmarks/\w+\.py", word):
            assert (REPO / word).is_file(), f"{command.where!r}: no {word}"
    if "-m" in words and words[words.index("-m") + 1].startswith("benchmarks."):
        module = words[words.index("-m") + 1]
        assert (REPO / (module.replace(".", "/") + ".py")).is_file(), f"{command.where!r}: no module {module}"
    if words[:2] == ["docker", "compose"] or words[:1] == ["docker-compose"]:
        options = words[2:] if words[0] == "docker" else words[1:]
        files = []  # compose's own -f options, before its subcommand (`logs -f` follows)
        while len(options) >= 2 and options[0] == "-f":
            files.append(options[1])
            options = options[2:]
        assert files, f"{command.where!r}: run from the repository root, compose needs -f docker/docker-compose.yml"
        for name in files:
            assert (REPO / name).is_file() or name == "docker/weights.yml", f"{command.where!r}: no {name}"


@pytest.fixture(scope="module")
def fresh_clone(tmp_path_factory) -> Path:
    """A checkout as a new user has it (the repository's files, the installed .venv, ../shared beside it)."""
    root = tmp_path_factory.mktemp("clone")
    clone = root / "repo"
    clone.mkdir()
    for entry in REPO.iterdir():
        if entry.name not in (".git", "models", "test-artifacts"):
            (clone / entry.name).symlink_to(entry)
    (root / "shared").symlink_to((REPO.parent / "shared").resolve())
    return clone


def _run(clone: Path, command: Command) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "MODEL_DIR", "BASIC_AUTH",
                                                                    "AUTH_TOKEN", "VIRTUAL_ENV"))}
    return subprocess.run(list(command.words), cwd=clone, env=env, capture_output=True, text=True, timeout=300)


OFFLINE = [c for c in BACKEND_COMMANDS if not any(w == "exec" for w in c.words)
           and c.words[c.words.index("ml_backend") + 1] in ("versions", "connect")]
PYTHON_SNIPPETS = [c for c in COMMANDS if c.words[:2] == ("python3", "-c")]


@pytest.mark.parametrize("command", OFFLINE + PYTHON_SNIPPETS, ids=lambda c: c.text[:80])
def test_offline_commands_run_as_written(fresh_clone: Path, command: Command) -> None:
    done = _run(fresh_clone, command)
    assert "Traceback" not in done.stderr and "ModuleNotFoundError" not in done.stderr, done.stderr[-2000:]
    if "connect" in command.words:  # no Label Studio here: it must say what is missing, nothing else
        assert done.returncode == 2 and "LABEL_STUDIO_URL" in done.stderr, done.stderr
    else:
        assert done.returncode == 0, done.stderr[-2000:]


def test_the_offline_set_is_not_empty() -> None:
    assert any("versions" in c.words for c in OFFLINE) and any("connect" in c.words for c in OFFLINE)
    assert PYTHON_SNIPPETS
