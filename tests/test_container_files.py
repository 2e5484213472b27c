"""The container's build files: a lint-clean Dockerfile and run-time pins that match the project's.

Building and running the image needs buildah/podman and minutes (container/build_and_check.sh);
these checks need neither.
"""

import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_dockerfile_is_clean_under_hadolint():
    hadolint = Path(sys.executable).parent / "hadolint"
    completed = subprocess.run([str(hadolint), str(ROOT / "Dockerfile")], capture_output=True,
                               text=True, encoding="utf-8", errors="replace", timeout=60)
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_runtime_pins_are_the_closure_of_app_imports_at_the_project_versions():
    completed = subprocess.run([sys.executable, str(ROOT / "container" / "check_pins.py")],
                               capture_output=True, text=True, encoding="utf-8", errors="replace",
                               timeout=120, cwd=ROOT)
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_only_runtime_files_enter_the_build_context():
    allowed = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip().startswith("!")]
    assert {"!predict.sh", "!app/", "!weights/"} <= set(allowed)
    assert not [line for line in allowed
                if any(part in line for part in ("tests", "training", "data"))]
