"""The committed job folders are exactly what their job.py exports, and their components validate their arguments."""

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from app_custom.flare.job_builder import sorted_task_lists
from app_custom.flare.learner_executor import NestedLearnerExecutor
from app_custom.flare.nested_controller import NestedFedAvg
from app_custom.nested.config import ConfigError
from simulator.job_script import CUSTOM_README
from simulator.methods import method_config

ROOT = Path(__file__).resolve().parents[2]
JOB = ROOT / "jobs" / "nested_fedavg"


def _imported_modules(path: Path, package: str) -> set[str]:
    """The ``app_custom`` modules a source file imports (absolute and relative imports)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            if base.startswith("app_custom"):
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in node.names)  # "from pkg import module"
    return found


@pytest.mark.parametrize("name", ["nested_fedavg", "nested_private", "nested_fleet"])
def test_committed_job_folder_matches_a_fresh_export_and_carries_all_its_code(tmp_path, name):
    job = ROOT / "jobs" / name
    proc = subprocess.run(
        [sys.executable, str(job / "job.py"), "--export", "--export-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    fresh = tmp_path / name
    for config in ("meta.json", "app/config/config_fed_server.json", "app/config/config_fed_client.json"):
        fresh_config, committed = json.loads((fresh / config).read_text()), json.loads((job / config).read_text())
        assert sorted_task_lists(fresh_config) == sorted_task_lists(committed), config
    # FLARE copies the components' modules and what they import; a module it missed would be
    # imported from wherever the site happens to have app_custom, or not at all
    custom = fresh / "app/custom"
    missing = []
    for source in custom.rglob("*.py"):
        package = ".".join(source.relative_to(custom).with_suffix("").parts[:-1])
        for module in _imported_modules(source, package):
            as_file = custom / Path(*module.split(".")).with_suffix(".py")
            as_package = custom / Path(*module.split("."))
            if not as_file.exists() and not as_package.is_dir() and (ROOT / as_file.relative_to(custom)).exists():
                missing.append(f"{source.relative_to(custom)} imports {module}")
    assert missing == []


@pytest.mark.parametrize("name", ["nested_fedavg", "nested_private", "nested_fleet"])
def test_committed_job_folder_loads_its_components_from_the_installed_project(name):
    """``nvflare simulator jobs/<name>`` from a fresh clone: FLARE refuses components outside its
    class allow-list (nvflare.* only) unless the job brings its own code, which a job with an
    app/custom folder does; the components then import from the installed project."""
    from nvflare.apis.app_validation import AppValidationKey
    from nvflare.private.fed.app.default_app_validator import DefaultAppValidator

    app = ROOT / "jobs" / name / "app"
    assert sorted(p.name for p in (app / "custom").iterdir()) == ["README.md"]
    assert (app / "custom" / "README.md").read_text() == CUSTOM_README
    for site_type, config in (("server", "config_fed_server.json"), ("client", "config_fed_client.json")):
        error, result = DefaultAppValidator(site_type).validate(str(app))
        assert error == "" and result.get(AppValidationKey.BYOC) is True, (site_type, error, result)
        paths = _component_paths(json.loads((app / "config" / config).read_text()))
        assert paths, config
        for path in paths:
            module, _, attr = path.rpartition(".")
            assert hasattr(importlib.import_module(module), attr), path


def _component_paths(node) -> list[str]:
    """Every component class path (``"path": ...``) in a FLARE job configuration."""
    found = []
    if isinstance(node, dict):
        if isinstance(node.get("path"), str):
            found.append(node["path"])
        for value in node.values():
            found.extend(_component_paths(value))
    elif isinstance(node, list):
        for value in node:
            found.extend(_component_paths(value))
    return found


def test_components_reject_malformed_arguments_in_their_constructors():
    data = {"fn": "simulator.fleets:make_fleet", "kwargs": {}}
    with pytest.raises(ConfigError, match="levels"):
        NestedLearnerExecutor(config={"levels": "all"}, data=data)
    with pytest.raises(ValueError, match="data must be"):
        NestedLearnerExecutor(config=method_config("nested"), data={"function": "x"})
    with pytest.raises(ValueError, match="num_rounds"):
        NestedFedAvg(config=method_config("nested"), data=data, num_rounds=0)
    with pytest.raises(ValueError, match="server_lr"):
        NestedFedAvg(config=method_config("nested"), data=data, server_lr=-1.0)
