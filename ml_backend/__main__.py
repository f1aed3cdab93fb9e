"""python -m ml_backend <command>: see ml_backend/cli.py."""
import sys

from .cli import main

sys.exit(main())
