"""``python -m agent`` is the ``bedside`` command."""

from agent.cli.main import main

main()
