"""Check that container/requirements-runtime.txt is what app/ needs, pinned as constraints.txt.

    .venv/bin/python container/check_pins.py
    .venv/bin/python container/check_pins.py --installed FREEZE_FILE --tensorflow SPEC

Run with the development environment's Python (the one of requirements.txt): the third-party
modules that app/ imports are mapped to their installed distributions, and the dependency closure of
those (the packages `python -m app` can load) is compared with the file, TensorFlow itself left out
(the Dockerfile's TENSORFLOW build argument chooses it). Every pin must have the version of
constraints.txt; a package that constraints.txt lacks (setuptools, wheel: `pip freeze` omits them)
must have the installed version. Prints each difference and exits 1 if there is any.

With --installed, it checks an image instead: FREEZE_FILE is `pip list --format=freeze` run in
the image, which must hold exactly the runtime pins, the TensorFlow of SPEC (the TENSORFLOW build
argument) and, for tensorflow[and-cuda], the CUDA packages of container/constraints-cuda.txt
(pip, which builds the environment, may be there too).
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = ROOT / "container" / "requirements-runtime.txt"
CUDA_CONSTRAINTS = ROOT / "container" / "constraints-cuda.txt"
CONSTRAINTS = ROOT / "constraints.txt"
TENSORFLOW_DISTRIBUTIONS = {"tensorflow", "tensorflow-cpu"}


def normalize(name: str) -> str:
    """PEP 503 name: lower case, runs of '-', '_' and '.' as one '-'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> dict[str, str]:
    """{normalized name: version} of the `name==version` lines of a requirements file."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        name, separator, version = line.partition("==")
        if not separator:
            raise SystemExit(f"{path}: '{line}' is not pinned with ==")
        pins[normalize(name)] = version.strip()
    return pins


def imported_top_level_modules(folder: Path) -> set[str]:
    """Top-level names of every absolute import in the folder's .py files."""
    modules = set()
    for source in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text(), str(source))):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return modules


def runtime_closure(roots: set[str]) -> dict[str, str]:
    """{normalized name: installed version} of the roots and all they require (no extras)."""
    closure: dict[str, str] = {}
    pending = list(roots)
    while pending:
        name = normalize(pending.pop())
        if name in closure:
            continue
        distribution = metadata.distribution(name)
        closure[name] = distribution.version
        for line in distribution.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(requirement.name)
    return closure


def check_requirements() -> int:
    """The pins against app/'s imports and constraints.txt; 0 when they agree."""
    modules = imported_top_level_modules(ROOT / "app")
    third_party = modules - set(sys.stdlib_module_names) - {"app"}
    providers = metadata.packages_distributions()
    missing = sorted(m for m in third_party if m not in providers)
    if missing:
        print(f"app/ imports modules no installed package provides: {', '.join(missing)}")
        return 1
    roots = {normalize(d) for m in third_party for d in providers[m]}
    expected = runtime_closure(roots)
    for name in TENSORFLOW_DISTRIBUTIONS:
        expected.pop(name, None)

    runtime, constraints = read_pins(RUNTIME), read_pins(CONSTRAINTS)
    problems = [f"missing from {RUNTIME.name}: {name}=={expected[name]} (needed at run time)"
                for name in sorted(set(expected) - set(runtime))]
    problems += [f"not needed at run time, remove from {RUNTIME.name}: {name}"
                 for name in sorted(set(runtime) - set(expected))]
    for name in sorted(set(runtime) & set(expected)):
        wanted = constraints.get(name, expected[name])
        source = "constraints.txt" if name in constraints else "the installed version"
        if runtime[name] != wanted:
            problems.append(f"{name}: {RUNTIME.name} pins {runtime[name]}, {source} has {wanted}")
    for problem in problems:
        print(problem)
    if problems:
        return 1
    print(f"{RUNTIME.relative_to(ROOT)}: {len(runtime)} pins = the run-time closure of "
          f"app/'s imports ({', '.join(sorted(roots))}) without TensorFlow, versions as "
          f"constraints.txt")
    return 0


def check_installed(freeze: Path, tensorflow: str) -> int:
    """An image's `pip list --format=freeze` against the pins; 0 when it holds exactly those."""
    requirement = Requirement(tensorflow)
    pinned = [s.version for s in requirement.specifier if s.operator == "=="]
    if not pinned:
        print(f"--tensorflow {tensorflow!r} is not pinned with ==")
        return 1
    expected = read_pins(RUNTIME) | {normalize(requirement.name): pinned[0]}
    if "and-cuda" in requirement.extras:
        expected |= read_pins(CUDA_CONSTRAINTS)
    installed = read_pins(freeze)
    installed.pop("pip", None)
    problems = [f"missing in the image: {name}=={expected[name]}"
                for name in sorted(set(expected) - set(installed))]
    problems += [f"in the image but not a runtime requirement: {name}=={installed[name]}"
                 for name in sorted(set(installed) - set(expected))]
    problems += [f"{name}: the image has {installed[name]}, the pins say {expected[name]}"
                 for name in sorted(set(installed) & set(expected))
                 if installed[name] != expected[name]]
    for problem in problems:
        print(problem)
    if problems:
        return 1
    print(f"the image holds exactly the {len(expected)} pinned runtime packages (and pip)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--installed", type=Path, help="pip list --format=freeze of an image")
    parser.add_argument("--tensorflow", default="tensorflow-cpu==2.21.0",
                        help="the image's TENSORFLOW build argument (with --installed)")
    args = parser.parse_args(argv)
    if args.installed is not None:
        return check_installed(args.installed, args.tensorflow)
    return check_requirements()


if __name__ == "__main__":
    sys.exit(main())
