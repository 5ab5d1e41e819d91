#!/usr/bin/env python
import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "orchestrator.settings")
    from django.core.management import execute_from_command_line

    from orchestrator.env import ConfigError

    try:
        execute_from_command_line(sys.argv)
    except ConfigError as error:  # a missing or malformed setting: the message says which
        sys.exit(f"error: {error}")
