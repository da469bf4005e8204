"""python -m sdlora.lora_tools COMMAND ...: see sdlora/lora_tools/cli.py."""

from ..errors import run_cli
from .cli import main

if __name__ == "__main__":
    run_cli(main)
