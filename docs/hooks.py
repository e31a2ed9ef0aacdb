"""mkdocs hook: the reference pages are generated from the code at every build, so they cannot
go stale. ``<!-- generated: cli -->`` becomes every ``fleetnest`` verb's ``--help``;
``<!-- generated: configuration -->`` a table of every configuration's keys, types and defaults."""

from __future__ import annotations

import dataclasses
import os
import typing

CLI, CONFIGURATION = "<!-- generated: cli -->", "<!-- generated: configuration -->"


def on_page_markdown(markdown: str, page, config, files) -> str:
    if CLI in markdown:
        markdown = markdown.replace(CLI, cli_reference())
    if CONFIGURATION in markdown:
        markdown = markdown.replace(CONFIGURATION, configuration_reference())
    return markdown


def cli_reference() -> str:
    from simulator.cli import build_parser, parsers

    os.environ["COLUMNS"] = "100"  # argparse wraps help at the terminal's width
    parts = []
    for path, parser in parsers(build_parser()):
        level = "#" * min(2 + path.count(" "), 4)
        parts.append(f"{level} `{path}`\n\n```text\n{parser.format_help().rstrip()}\n```\n")
    return "\n".join(parts)


def _type(hint) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _dataclass_table(cls) -> str:
    hints = typing.get_type_hints(cls)
    rows = ["| key | type | default |", "|---|---|---|"]
    for field in dataclasses.fields(cls):
        if field.default is not dataclasses.MISSING:
            default = f"`{field.default!r}`"
        elif field.default_factory is not dataclasses.MISSING:
            default = "a section (below)" if dataclasses.is_dataclass(field.type) else "see below"
        else:
            default = "required"
        rows.append(f"| `{field.name}` | `{_type(hints[field.name])}` | {default} |")
    doc = (cls.__doc__ or "").strip()
    doc = "" if doc.startswith(f"{cls.__name__}(") else doc + "\n\n"  # dataclasses' generated signature
    return doc + "\n".join(rows) + "\n"


def configuration_reference() -> str:
    from app_custom.nested.config import LevelConfig, ModelConfig, NestedConfig, TrainingConfig
    from app_custom.privacy.dp import DPConfig
    from edge_runtime.config import SECTIONS

    parts = ["## Nested learning (`config` of a job, `learning.job_config` on a device)\n"]
    for title, cls in (
        ("top level", NestedConfig),
        ("`levels[]`", LevelConfig),
        ("`model`", ModelConfig),
        ("`training`", TrainingConfig),
    ):
        parts.append(f"### {title}\n\n{_dataclass_table(cls)}")
    parts.append(f"## Privacy (`privacy.dp`)\n\n{_dataclass_table(DPConfig)}")
    parts.append(
        "## Edge daemon (`/etc/fleetnest/edge.yaml`)\n\n`device_id` and `state_dir` are required; "
        "each section below switches a part on.\n"
    )
    for section, settings in SECTIONS.items():
        rows = ["| key | default | accepted |", "|---|---|---|"]
        for key, (default, check) in settings.items():
            shown = "required" if default is ... else f"`{default!r}`"
            if isinstance(check, tuple) and len(check) == 2 and all(isinstance(v, (int, float)) for v in check):
                accepted = f"{check[0]} to {check[1]}"
            elif isinstance(check, tuple):
                accepted = ", ".join(f"`{v}`" for v in check)
            elif isinstance(check, type):
                accepted = check.__name__
            else:
                accepted = str(check)
            rows.append(f"| `{key}` | {shown} | {accepted} |")
        parts.append(f"### `{section}`\n\n" + "\n".join(rows) + "\n")
    return "\n".join(parts)
