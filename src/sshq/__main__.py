"""``python -m sshq``."""

from .cli.main import main

main()
