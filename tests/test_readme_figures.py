"""Numbers that describe the code: every decimal figure README.md quotes comes from a committed benchmark result
(a section that names `benchmarks/results/<name>.json` quotes values of those results, at the precision shown or
as a percentage; the few figures measured elsewhere, by hand or by a test, are listed here with where they come
from), and `benchmarks/run_all.sh` re-runs every benchmark."""
from __future__ import annotations

import json
import re
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
# 0.747, 4.35, 1.2 -- not versions (1.23.2, Label Studio 1.23, SAM 2.1, python:3.11-slim, redis:7.2-alpine) nor
# a test's thresholds (IoU ≥ 0.99)
FIGURE = re.compile(r"(?<![\w.:])(?<!Studio )(?<!SAM )(?<!Python )(?<!≥ )(?<!docker-compose` )(\d+\.\d+)(?![\w.-]|\.\d)")
MEASURED_ELSEWHERE = {
    "6.6": "the .venv's size (du, README 'Install size')",
    "6.65": "the .venv's and the backend image's size (du / docker image ls)",
    "3.2": "the nvidia-* wheels' size in the .venv (du)",
    "0.9": "triton's size in the .venv (du)",
    "0.24": "requirements-dev.txt's share of the .venv (du)",
    "1.2": "torch's size in the .venv (du); a new image's encoder seconds (predict.json, quoted rounded)",
    "15.1": "tests/test_e2e_scale.py: the slowest Retrieve predictions call",
    "9.7": "tests/test_compose_stack.py: `down -v` (its TIMINGS)",
    "6.5": "tests/test_compose_stack.py: `down -v` (its TIMINGS); the backend image's cold build time",
    "0.06": "tests/test_compose_stack.py: the worker's exit after SIGTERM (its log)",
    "0.005": "PROMOTION_MARGIN's default (a setting, not a measurement)",
}


def values(node: object) -> list[float]:
    if isinstance(node, dict):
        return [v for value in node.values() for v in values(value)]
    if isinstance(node, list):
        return [v for value in node for v in values(value)]
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return [abs(float(node))]
    return []


def shown(numbers: list[float]) -> set[str]:
    """Each number as the README may print it: 1-4 decimals, rounded half up or as Python formats it, or x 100."""
    out: set[str] = set()
    for number in numbers:
        for scaled in (number, 100 * number):
            for places in range(1, 5):
                exact = Decimal(repr(scaled)).quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP)
                out |= {f"{scaled:.{places}f}", str(exact)}
    return out


def sections() -> list[tuple[int, str]]:
    """README.md's sections (a heading and what follows it), with the line each starts at."""
    text = (REPO / "README.md").read_text()
    starts = [0] + [m.start() + 1 for m in re.finditer(r"\n(?=#+ )", text)]
    ends = starts[1:] + [len(text)]
    return [(text.count("\n", 0, a) + 1, text[a:b]) for a, b in zip(starts, ends)]


def orphans() -> list[str]:
    found = []
    for line, section in sections():
        names = sorted(set(re.findall(r"results/(\w+)\.json", section)))
        sources = [RESULTS / f"{name}.json" for name in names if (RESULTS / f"{name}.json").exists()]
        allowed = shown([v for path in sources for v in values(json.loads(path.read_text()))])
        for figure in FIGURE.findall(section):
            if figure not in allowed and figure not in MEASURED_ELSEWHERE:
                found.append(f"README.md section at line {line} ({', '.join(names) or 'names no result'}): {figure}")
    return found


def test_every_readme_figure_comes_from_the_results_its_section_names() -> None:
    assert sum(len(FIGURE.findall(s)) for _, s in sections()) > 50  # a parser that finds nothing proves nothing
    missing = orphans()
    assert not missing, "figures that are not in the results their section names:\n" + "\n".join(missing)


def test_the_figures_measured_elsewhere_are_still_quoted() -> None:
    quoted = {figure for _, section in sections() for figure in FIGURE.findall(section)}
    assert not set(MEASURED_ELSEWHERE) - quoted, "drop what the README no longer quotes from MEASURED_ELSEWHERE"


def test_run_all_runs_every_benchmark() -> None:
    """`benchmarks/run_all.sh` re-runs every benchmark script (the ones with a __main__)."""
    script = (REPO / "benchmarks" / "run_all.sh").read_text()
    listed = {name for group in re.findall(r"ALL\+?=\(([^)]*)\)", script) for name in group.split()}
    scripts = {p.stem for p in (REPO / "benchmarks").glob("*.py") if "__main__" in p.read_text()}
    assert scripts and scripts <= listed, f"not in run_all.sh: {sorted(scripts - listed)}"
