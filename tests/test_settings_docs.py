"""The settings as declared (ml_backend/settings.py: environment variable, default, doc) against the places that
repeat them: the README's settings tables, docker/.env.example and the compose files' backend environment.
The declaration wins; a mismatch fails here. Fast: no model, no network."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from ml_backend.settings import Settings

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
ENV_EXAMPLE = REPO / "docker" / ".env.example"
COMPOSE_FILES = sorted((REPO / "docker").glob("docker-compose*.yml"))
TABLE_HEADER = "| variable | default | meaning |"
NO_VALUE = "–"  # the README's "not set"

# Variables of .env.example that are not backend settings: they configure the compose file itself (project name,
# images, build indexes, published ports) or Label Studio's own container.
COMPOSE_ONLY = {"COMPOSE_PROJECT_NAME", "BACKEND_IMAGE", "BASE_IMAGE", "TORCH_INDEX_URL", "PIP_INDEX_URL",
                "BACKEND_PORT", "LABEL_STUDIO_IMAGE", "LABEL_STUDIO_PORT", "LABEL_STUDIO_HOST",
                "LABEL_STUDIO_USERNAME", "LABEL_STUDIO_PASSWORD", "LABEL_STUDIO_USER_TOKEN",
                "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN", "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK"}
# Declared settings the compose backend environment leaves out, and why.
NOT_IN_COMPOSE = {"PORT": "the containers set BIND=0.0.0.0:9090, so PORT is never read"}
# Compose values that differ from the declared default on purpose (the compose deployment's own).
COMPOSE_VALUES = {"LABEL_STUDIO_URL", "MODEL_DIR", "BIND", "BACKEND_URL", "TRAINING_RUNNER", "REDIS_URL"}
DECLARED = Settings.declared()  # env -> (attribute, default, doc)


def shown(default: object) -> str:
    """A declared default as the docs write it."""
    if default is None or default == "":
        return NO_VALUE
    if isinstance(default, bool):
        return "true" if default else "false"
    return str(default)


def same(written: str, default: object) -> bool:
    expected = shown(default)
    if written == expected:
        return True
    try:
        return float(written) == float(expected)
    except ValueError:
        return False


# -- the README --------------------------------------------------------------------------------------------------
def readme_rows(text: str) -> list[tuple[list[str], str, str]]:
    """(variable names, default cell, the row) of every row of every `| variable | default | meaning |` table."""
    rows, in_table = [], False
    for line in text.splitlines():
        if line.strip() == TABLE_HEADER:
            in_table = True
            continue
        if in_table and line.startswith("|"):
            if set(line) <= set("|-: "):
                continue
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows.append((re.findall(r"`([A-Za-z0-9_]+)`", cells[0]), cells[1], line))
        else:
            in_table = False
    return rows


def readme_defaults(names: list[str], cell: str) -> list[str]:
    """The value the default cell states for each name: one part for all names, or one per name (split on ' / '
    or ', '); a part is a `code` value, a bare word or number (what follows it is a remark), or – (not set)."""
    parts = [cell] if len(names) == 1 else re.split(r"\s+/\s+|,\s+", cell)
    if len(parts) == 1:
        parts = parts * len(names)
    if len(parts) != len(names):
        raise ValueError(f"{len(names)} variables, {len(parts)} defaults: {cell!r}")
    values = []
    for part in parts:
        code = re.match(r"`([^`]*)`", part)
        values.append(code.group(1) if code else part.split()[0] if part.split() else "")
    return values


def readme_problems(text: str) -> list[str]:
    problems, seen = [], set()
    for names, cell, line in readme_rows(text):
        if not names:
            problems.append(f"README row names no variable: {line}")
        for name in names:
            if name not in DECLARED:
                problems.append(f"README names {name}, which is not a setting (ml_backend/settings.py)")
        try:
            values = readme_defaults(names, cell)
        except ValueError as exc:
            problems.append(f"README row {names}: {exc}")
            continue
        for name, value in zip(names, values):
            seen.add(name)
            if name in DECLARED and not same(value, DECLARED[name][1]):
                problems.append(f"README says {name} defaults to {value!r}; declared: {shown(DECLARED[name][1])!r}")
    problems += [f"README's settings tables lack {name}" for name in DECLARED if name not in seen]
    return problems


# -- docker/.env.example and the compose files -------------------------------------------------------------------
def env_example_lines(text: str) -> list[tuple[str, str, bool]]:
    """(name, value, commented out) of every NAME=value line, set or commented."""
    found = []
    for line in text.splitlines():
        match = re.match(r"^(#\s*)?([A-Z][A-Z0-9_]*)=(\S*)\s*$", line)
        if match:
            found.append((match.group(2), match.group(3), bool(match.group(1))))
    return found


def compose_backend_envs() -> list[tuple[str, dict[str, str]]]:
    """(file:service, environment) of each backend service (sam-backend, sam-worker) in every compose file."""
    envs = []
    for path in COMPOSE_FILES:
        tree = yaml.safe_load(path.read_text())
        for name, service in (tree.get("services") or {}).items():
            if name.startswith("sam-") and isinstance(service.get("environment"), dict):
                envs.append((f"{path.name}:{name}", {k: str(v) for k, v in service["environment"].items()}))
    return envs


def compose_values(raw: str) -> list[str]:
    """What a compose value can come to without docker/.env: a literal, or ${NAME:-default}'s default."""
    match = re.fullmatch(r"\$\{[A-Z0-9_]+(?::?-([^}]*)|:?\?[^}]*)?\}", raw)
    if match is None:
        return [raw]
    return [match.group(1)] if match.group(1) else []


def env_example_problems(text: str, compose: list[tuple[str, dict[str, str]]]) -> list[str]:
    problems = []
    allowed: dict[str, set[str]] = {name: {shown(default)} for name, (_, default, _) in DECLARED.items()}
    for _, env in compose:
        for name, raw in env.items():
            if name in allowed:
                allowed[name] |= {v or NO_VALUE for v in compose_values(raw)}
    listed = set()
    for name, value, commented in env_example_lines(text):
        listed.add(name)
        if name in COMPOSE_ONLY:
            continue
        if name not in DECLARED:
            problems.append(f".env.example sets {name}, which is neither a setting nor one of the compose file's")
        elif commented and (value or NO_VALUE) not in allowed[name] and not any(same(value, a) for a in allowed[name]):
            problems.append(f".env.example shows {name}={value}; the default is {sorted(allowed[name])}")
    user_settable = {name for _, env in compose for name, raw in env.items() if raw.startswith("${")}
    problems += [f".env.example does not list {name}, which the compose file reads from it"
                 for name in sorted(user_settable - listed)]
    return problems


def compose_problems(compose: list[tuple[str, dict[str, str]]]) -> list[str]:
    problems = []
    main = dict(compose).get("docker-compose.yml:sam-backend")
    if main is None:
        return ["docker-compose.yml has no sam-backend environment"]
    if dict(compose).get("docker-compose.yml:sam-worker") != main:
        problems.append("docker-compose.yml: sam-worker's environment differs from sam-backend's")
    problems += [f"docker-compose.yml's backend environment lacks {name}" for name in DECLARED
                 if name not in main and name not in NOT_IN_COMPOSE]
    problems += [f"docker-compose.yml's backend environment passes {name}, which the backend should not get"
                 for name in NOT_IN_COMPOSE if name in main]
    for where, env in compose:
        for name, raw in env.items():
            if name not in DECLARED:
                problems.append(f"{where} sets {name}, which is not a setting")
                continue
            for value in compose_values(raw):
                if name not in COMPOSE_VALUES and not same(value, DECLARED[name][1]):
                    problems.append(f"{where}: {name} comes to {value!r}; declared default: "
                                    f"{shown(DECLARED[name][1])!r}")
    return problems


# -- the tests ---------------------------------------------------------------------------------------------------
def test_every_setting_is_declared_with_its_variable_and_doc() -> None:
    assert len(DECLARED) == len(Settings.__dataclass_fields__)  # one variable per attribute, none shared
    for name, (attribute, _, doc) in DECLARED.items():
        assert re.fullmatch(r"[A-Z][A-Z0-9_]*", name), name
        assert doc.strip() and "\n" not in doc, f"{name}: a one-line doc"
    assert Settings.from_env({"TIMEOUT": "42", "EMBEDDING_CACHE_MB": "7"}).worker_timeout_s == 42
    assert Settings.from_env({"WORKER_TIMEOUT_S": "42"}).worker_timeout_s == 300  # only the declared name is read


def test_readme_tables_match_the_declared_settings() -> None:
    assert readme_problems(README.read_text()) == []


def test_env_example_matches_the_declared_settings() -> None:
    assert env_example_problems(ENV_EXAMPLE.read_text(), compose_backend_envs()) == []


def test_compose_backend_environment_matches_the_declared_settings() -> None:
    assert compose_problems(compose_backend_envs()) == []


def test_compose_only_variables_are_the_compose_files() -> None:
    """The non-settings .env.example may hold are read by a compose file (no stale names hide behind the list)."""
    text = "\n".join(path.read_text() for path in COMPOSE_FILES)
    assert sorted(n for n in COMPOSE_ONLY if n != "COMPOSE_PROJECT_NAME" and f"${{{n}" not in text) == []


@pytest.mark.parametrize("edit, problem", [
    (lambda t: t.replace("| `PREFETCH_IMAGES` | `4` |", "| `PREFETCH_IMAGES` | `5` |"), "PREFETCH_IMAGES defaults"),
    (lambda t: t.replace("| `PREFETCH_IMAGES` |", "| `PREFETCH_IMAGE` |"), "PREFETCH_IMAGE, which is not"),
    (lambda t: re.sub(r"\n\| `KEEP_VERSIONS` \|[^\n]*", "", t), "lack KEEP_VERSIONS"),
])
def test_readme_check_finds_a_mismatch(edit, problem: str) -> None:
    text = README.read_text()
    edited = edit(text)
    assert edited != text
    assert any(problem in p for p in readme_problems(edited))


def test_env_example_check_finds_a_mismatch() -> None:
    compose = compose_backend_envs()
    text = ENV_EXAMPLE.read_text()
    assert any("TRAIN_EPOCHS=9" in p for p in env_example_problems(text.replace("# TRAIN_EPOCHS=8", "# TRAIN_EPOCHS=9"),
                                                                      compose))
    assert any("TRAIN_EPOCH," in p for p in env_example_problems(text + "\n# TRAIN_EPOCH=8\n", compose))
    changed = [(w, {**env, "THREADS": "${THREADS:-8}"}) for w, env in compose]
    assert any("THREADS comes to '8'" in p for p in compose_problems(changed))
