"""The package: `pip install .` gives one console script per job that runs without the checkout on any path, the
runtime pins are requirements.txt's, and the code never edits sys.path."""
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("esmm-generate", "esmm-etl", "esmm-train", "esmm-evaluate", "esmm-predict", "esmm-experiment",
           "esmm-pipeline")


def _pins(path):
    pins = {}
    for line in open(path):
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def test_runtime_dependencies_are_the_requirements_pins():
    project = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]
    req = _pins(os.path.join(ROOT, "requirements.txt"))
    deps = dict(d.lower().split("==") for d in project["dependencies"]
                + [d for extra in project["optional-dependencies"].values() for d in extra])
    assert {"torch", "pyspark", "pyarrow", "numpy", "petastorm"} <= set(deps)
    assert {k: req.get(k) for k in deps} == deps
    assert set(project["scripts"]) == set(SCRIPTS)


def test_the_code_never_edits_sys_path():
    for folder in ("esmm", "jobs", "schemas"):
        for name in os.listdir(os.path.join(ROOT, folder)):
            if name.endswith(".py"):
                text = open(os.path.join(ROOT, folder, name)).read()
                assert not re.search(r"sys\.path\s*(\.insert|\.append|\[|=|\+=)", text), f"{folder}/{name}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel built from this checkout, installed (without dependencies: this environment has them) into a
    prefix; its site-packages and scripts, to be used from a directory outside the checkout."""
    tmp = tmp_path_factory.mktemp("pkg")
    # built from a copy: an in-tree build leaves build/ and *.egg-info in the checkout
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", "data", "dist", ".git", "build", "*.egg-info",
                                                             "__pycache__", "bench", "tests"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "--no-cache-dir", "-w", str(tmp / "wheels"), str(src)], capture_output=True, text=True,
                           timeout=300, cwd=tmp)
    assert build.returncode == 0, build.stderr
    wheel = next((tmp / "wheels").glob("esmm_spark-*.whl"))
    prefix = tmp / "prefix"
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--prefix",
                           str(prefix), str(wheel)], capture_output=True, text=True, timeout=300, cwd=tmp)
    assert inst.returncode == 0, inst.stderr
    site = sysconfig.get_path("purelib", vars={"base": str(prefix), "platbase": str(prefix)})
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYSPARK_PYTHON")}
    env["PYTHONPATH"] = site
    work = tmp / "work"
    work.mkdir()
    return {"bin": prefix / "bin", "site": site, "env": env, "cwd": work}


def _run(installed, script, *args, timeout=600):
    return subprocess.run([str(installed["bin"] / script), *args], cwd=installed["cwd"], env=installed["env"],
                          capture_output=True, text=True, timeout=timeout)


def test_console_scripts_run_the_installed_package(installed):
    probe = subprocess.run([sys.executable, "-c", "import esmm, esmm.jobs.train, schemas; print(esmm.__file__)"],
                           cwd=installed["cwd"], env=installed["env"], capture_output=True, text=True)
    assert probe.returncode == 0 and probe.stdout.startswith(installed["site"]), probe.stderr
    for script in SCRIPTS:
        r = _run(installed, script, "--help", timeout=120)
        assert r.returncode == 0 and "--conf" in r.stdout, (script, r.stderr)
    bad = _run(installed, "esmm-train", "--set", "train.no_such_key=1", timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("esmm-train: error: ") and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_a_spark_job_runs_from_the_installed_package(installed):
    # Spark's Python workers must import the installed package too (no checkout anywhere on their path)
    out = installed["cwd"] / "raw"
    r = _run(installed, "esmm-generate", "--conf", os.path.join(ROOT, "conf", "test.yaml"), "--out", str(out),
             "--set", "generate.impressions=2000")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "_SUCCESS").exists() and (out / "ground_truth").is_dir()
