"""An installed wheel works on its own: `pip install .` carries the templates, static files,
presets and migrations, and keeps its data in the data folder, never inside site-packages.

The wheel goes into an empty venv that borrows this venv's dependencies through a path entry
(no second torch download), and runs from a folder outside the checkout.
"""

from __future__ import annotations

import os
import re
import shutil
import site
import subprocess
import sys
from pathlib import Path

import httpx

from tests.live_server import first_answer, free_port

REPO = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "setup.py", "README.md", "app", "frontend", "migrations",
           "models/presets.toml")



def _build_wheel(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    for name in SOURCES:
        source, target = REPO / name, src / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target,
                            ignore=shutil.ignore_patterns("__pycache__", "_shipped"))
        else:
            shutil.copy2(source, target)
    out = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out), str(src)], check=True, timeout=300)
    (wheel,) = out.glob("saescope-*.whl")
    return wheel


def _venv_with(wheel: Path, tmp_path: Path) -> Path:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (site_dir,) = (venv / "lib").glob("python3*/site-packages")
    # This venv's dependencies, as a plain path (its editable saescope finder is not loaded).
    (site_dir / "borrowed.pth").write_text(site.getsitepackages()[0] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
                    "install", "--no-deps", "-q", str(wheel)], check=True, timeout=300)
    return venv


def test_wheel_installs_and_serves_from_outside_the_checkout(tmp_path):
    venv = _venv_with(_build_wheel(tmp_path), tmp_path)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAESCOPE_")}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH="")
    cli = str(venv / "bin" / "saescope")

    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import app; print(app.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True)
    assert where.stdout.strip().startswith(str(venv)), where.stdout

    models = subprocess.run([cli, "models"], cwd=work, env=env, capture_output=True, text=True,
                            timeout=120)
    assert models.returncode == 0, models.stderr
    assert "smollm2-135m" in models.stdout

    upgraded = subprocess.run([cli, "db", "upgrade"], cwd=work, env=env, capture_output=True,
                              text=True, timeout=120)
    assert upgraded.returncode == 0, upgraded.stderr
    assert (work / "data" / "saescope.db").is_file()  # the data folder rule: ./data
    assert not list(venv.rglob("saescope.db"))

    port = free_port()
    server = subprocess.Popen([cli, "serve", "--port", str(port), "--no-model"], cwd=work,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    try:
        home = first_answer(f"http://127.0.0.1:{port}/", server)
        assert home.status_code == 200
        assert "saescope" in home.text
        css = re.search(r'<link rel="stylesheet" href="([^"]+)"', home.text)
        assert css, "the page links no stylesheet"
        sheet = httpx.get(f"http://127.0.0.1:{port}{css.group(1)}")
        assert sheet.status_code == 200 and "body" in sheet.text
    finally:
        server.terminate()
        server.wait(timeout=30)
