"""Fresh starts (issue 27, item 0): ROUNDS starts of 4 gunicorn workers, each on a new MODEL_DIR, as
scripts/start.sh runs the backend; each is stopped with SIGTERM while its pre-warm threads encode images.

Run: .venv/bin/python -m benchmarks.startup [--rounds 20] [--workers 4]   -> benchmarks/results/startup.json

Target: every start healthy with every worker ready (no "Worker failed to boot": the job store's migration race),
every stop exit code 0 with no worker aborted ("terminate called without an active exception", SIGABRT), every
log line JSON. tests/test_startup.py runs the same check for a few rounds.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

from benchmarks.common import machine
from tests.gunicorn_starts import fresh_start

RESULTS = Path(__file__).resolve().parent / "results" / "startup.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rounds = []
    for index in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="startup-") as root:
            report = fresh_start(Path(root), workers=args.workers)
            row = {k: v for k, v in dataclasses.asdict(report).items() if k != "log_path"}
            rounds.append({"round": index, "ok": report.ok and report.ready_workers == args.workers
                           and report.stopped_clean == args.workers, **row})
        print(json.dumps(rounds[-1]), flush=True)
    summary = {"rounds": args.rounds, "workers": args.workers, "healthy": sum(r["healthy"] for r in rounds),
               "all_workers_ready": sum(r["ready_workers"] == args.workers for r in rounds),
               "clean_stops": sum(r["exit_code"] == 0 and not r["abort_lines"] for r in rounds),
               "ok": sum(r["ok"] for r in rounds)}
    args.out.write_text(json.dumps({"machine": machine(), "summary": summary, "rounds": rounds}, indent=1) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
