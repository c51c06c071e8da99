"""A wheel built from the checkout, installed with its declared dependencies into a fresh virtual environment,
works outside the checkout: configs and sbatch scripts come from the package, the three commands run, a stage's
config checks out against real shards and weights, the demo runs, and a missing extra names its pip command."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from adala.config import options, override

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


@dataclass
class Installed:
    venv: Path
    wheel: Path
    workdir: Path  # outside the checkout
    env: dict[str, str]

    def run(self, command: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.venv / "bin" / command), *args], cwd=self.workdir, env=self.env,
                              capture_output=True, text=True, timeout=timeout)


def _source_copy(destination: Path) -> Path:
    """The checkout's files without what .gitignore names (the virtual environment, build output, runs), so the
    wheel is built from the sources alone and nothing is written into the checkout."""
    ignored = [line.strip().rstrip("/") for line in (REPO / ".gitignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    shutil.copytree(REPO, destination, ignore=shutil.ignore_patterns(".git", "dist", *ignored))
    return destination


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    root = tmp_path_factory.mktemp("package")
    source = _source_copy(root / "source")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(source), "-w", str(root)],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = root.glob("adala-*.whl")
    venv = root / "venv"
    workdir = root / "work"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "ADALA_CONFIG_DIR")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", PYTHONNOUSERSITE="1",
               ADALA_CACHE=str(root / "cache"))
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        started = time.perf_counter()
        pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-compile",
                              "-c", str(REPO / "constraints.txt"), str(wheel)], capture_output=True, text=True)
        assert pip.returncode == 0, pip.stderr[-3000:]
        print(f"installed the wheel and its dependencies in {time.perf_counter() - started:.0f} s")
        yield Installed(venv=venv, wheel=wheel, workdir=workdir, env=env)
    finally:
        shutil.rmtree(venv, ignore_errors=True)  # several GB of CUDA wheels


def test_the_wheel_carries_the_configs_and_sbatch_scripts_inside_the_package(installed: Installed) -> None:
    names = zipfile.ZipFile(installed.wheel).namelist()
    assert all(n.startswith(("adala/", "adala-")) for n in names), "only the adala package is installed"
    for group in ("model", "stage", "data", "attention", "strategy"):
        stems = sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml"))
        assert sorted(Path(n).stem for n in names if n.startswith(f"adala/conf/{group}/")) == stems
    assert "adala/conf/config.yaml" in names
    assert {n for n in names if n.startswith("adala/slurm/")} == {f"adala/slurm/stage{i}.sh" for i in (1, 2, 3)}

    where = installed.run("python", "-c", "import adala.paths as p; print(p.config_dir()); print(p.slurm_dir())")
    config_dir, slurm_dir = where.stdout.split()
    site = installed.venv / "lib"
    assert Path(config_dir).is_relative_to(site) and Path(config_dir).name == "conf"
    assert Path(slurm_dir).is_relative_to(site) and Path(slurm_dir).name == "slurm"


def test_commands_from_the_install(installed: Installed) -> None:
    help_text = installed.run("adala", "--help")
    assert help_text.returncode == 0 and str(installed.venv) in help_text.stdout
    assert all(model in help_text.stdout for model in options("model"))
    script = installed.run("adala", "slurm-script", "stage2")
    assert script.returncode == 0 and script.stdout == (REPO / "slurm" / "stage2.sh").read_text()
    for command, option in (("adala-submit", "--gpus-per-node"), ("adala-ray-sweep", "--workers")):
        usage = installed.run(command, "--help")
        assert usage.returncode == 0 and usage.stdout.startswith(f"usage: {command}") and option in usage.stdout


def _stage2(installed: Installed, demo_shards: dict[str, str], teacher: str, *extra: str) -> list[str]:
    return ["--check", "stage=align_features", "data=demo", override("data.train", demo_shards["pretrain"]),
            f"model.weights={teacher}", "train.max_steps=2", f"run_dir={installed.workdir / 'checked'}", *extra]


def test_a_stage_checks_out(installed: Installed, demo_shards: dict[str, str], random_teacher: str) -> None:
    done = installed.run("adala", *_stage2(installed, demo_shards, random_teacher))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("adala: config ok: stage align_features, model demo_tiny")
    assert not (installed.workdir / "checked").exists(), "--check writes nothing"


def test_a_missing_extra_names_its_pip_command(installed: Installed, demo_shards: dict[str, str],
                                               random_teacher: str) -> None:
    """The fresh environment has none of the extras: each command that needs one says which, in one line."""
    deepspeed = installed.run("adala", *_stage2(installed, demo_shards, random_teacher, "strategy=deepspeed"))
    assert (deepspeed.returncode, deepspeed.stderr.strip()) == (
        2, "adala: error: strategy=deepspeed needs DeepSpeed: pip install 'adala[deepspeed]'")
    ray = installed.run("adala-ray-sweep", "--demo")
    assert (ray.returncode, ray.stderr.strip()) == (
        2, "ray_sweep: error: the Ray sweep needs Ray Train: pip install 'adala[ray]'")
    submitit = installed.run("adala-submit", "--demo")
    assert (submitit.returncode, submitit.stderr.strip()) == (
        2, "submit: error: submitting the pipeline needs submitit: pip install 'adala[submitit]'")
    assert not (installed.workdir / "checked").exists() and not (installed.workdir / "runs").exists()


def test_the_demo_starts(installed: Installed) -> None:
    """The demo's first steps from the install: its data set is generated, its teacher trained and its first stage
    run exported (the rest is the same code on the same install; the whole demo in miniature is a pipeline test)."""
    sizes = ["demo.pretrain_samples=128", "demo.finetune_samples=64", "demo.val_samples=32",
             "demo.samples_per_shard=32", "demo.teacher_steps=2", "demo.align_attention_steps=2",
             "demo.teacher_batch_size=8", "demo.align_batch_size=8", "demo.run_dir=demo", "demo.cache_dir=cache"]
    log = installed.workdir / "demo.log"
    with log.open("w") as out:
        demo = subprocess.Popen([str(installed.venv / "bin" / "adala"), *sizes], cwd=installed.workdir,
                                env=installed.env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while demo.poll() is None and time.monotonic() < deadline:
            if any((installed.workdir / "demo").glob("**/export/model.safetensors")):
                break
            time.sleep(1)
        assert demo.poll() in (None, 0), log.read_text()[-3000:]
        assert any((installed.workdir / "demo").glob("**/export/model.safetensors")), log.read_text()[-3000:]
    finally:
        demo.kill()
        demo.wait()
    assert list((installed.workdir / "cache").glob("demo-*/pretrain-*.tar"))
    assert list((installed.workdir / "cache").glob("demo-*/teacher-*.safetensors"))
