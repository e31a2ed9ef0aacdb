"""The command line explains itself: a version, and help for every option of every verb."""

import argparse
import subprocess
import sys
from importlib.metadata import version

from simulator.cli import build_parser, parsers


def test_every_option_of_every_verb_has_help():
    silent = []
    for path, parser in parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            if not (action.help or "").strip():
                silent.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
    assert silent == []


def test_help_shows_defaults_and_version_is_the_installed_one():
    run = [sys.executable, "-m", "simulator.cli"]
    serve = subprocess.run([*run, "ota", "serve", "--help"], capture_output=True, text=True, check=True).stdout
    assert "(default: 127.0.0.1)" in " ".join(serve.split()) and "(default: 8765)" in serve
    shown = subprocess.run([*run, "--version"], capture_output=True, text=True, check=True).stdout
    assert shown.strip() == f"fleetnest {version('fleetnest')}"
