"""`python -m sdlora.families MODEL` prints the model's family (sd1, sd2, sdxl or sd3): for the launcher."""

from __future__ import annotations

import argparse

from ..errors import run_cli
from ..models import resolve_model
from . import detect_family


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", help="Hub id or local diffusers folder")
    model = parser.parse_args().model
    run_cli(lambda: print(detect_family(resolve_model(model)).name))


if __name__ == "__main__":
    main()
