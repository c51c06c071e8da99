"""Every shell command the READMEs show runs, with the README's paths replaced by small real files.

Each command found by ``tests.doc_commands`` is one test case. ``RULES`` says how it runs: as written, with
``--check`` or ``--dry-run`` where it would train a ViT-L, in a fresh copy of the checkout where it installs, and
so on; the first rule whose pattern matches the command's start applies. A command no rule matches fails, so
a README that grows a command nobody checked fails here, and so does one that drifts from the code.

The README's placeholders become fixtures: ``/weights/<file>`` a full-size file in the release's original layout
(``WEIGHTS``, written by ``tests.weight_layouts``), ``/datasets/...`` small source trees in each data set's layout,
``/data/<name>/<split>-{...}.tar`` shards written from them by ``python -m adala.data write``,
``runs/<run>/export/model.safetensors`` a stand-in export of the run's model, and a quoted ``"..."`` the fixture
shards of the data set the command's job reads. Commands run in a fresh directory that shows the checkout's files
(``runs/`` starts empty there).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import pytest
import torch

from tests.data_layouts import write_shards, write_sources
from tests.doc_commands import REPO, DocCommand, all_commands
from tests.weight_layouts import ReleaseFiles, release_files  # noqa: F401 (a fixture)

VENV_BIN = str(Path(sys.executable).parent)
ROOTED = r"(?<![\w/.-])"  # a README path starts here: not inside a longer path the fixtures put in
SLURM_PROGRAMS = {"sinfo", "sbatch", "squeue", "scontrol", "scancel", "srun", "salloc", "sacct"}
MODELS = sorted((p.stem for p in (REPO / "conf" / "model").glob("*.yaml")), key=len, reverse=True)
TASK_DATA = {"in1k": "in1k", "ade20k": "ade20k", "cityscapes": "cityscapes"}  # pipeline task -> data set
STAGE_DATA = {"align_attention": "coco", "align_features": "in22k", "finetune_cls": "in1k", "finetune_seg": "ade20k"}
DEMO_TINY = ["demo.pretrain_samples=256", "demo.finetune_samples=128", "demo.val_samples=64", "demo.teacher_steps=5",
             "demo.align_attention_steps=3", "demo.align_features_steps=3", "demo.finetune_steps=3"]

# README weight file -> (release, original layout); see tests.weight_layouts.RELEASES.
WEIGHTS = {
    "dinov2_vitl14.pth": ("dinov2_l", "dinov2_hub"),
    "dinov2_l.safetensors": ("dinov2_l", "timm"),
    "clip_l.safetensors": ("clip_l", "timm"),
    "clip_vitl14.bin": ("clip_l", "openai_clip"),
    "siglip_l.npz": ("siglip_l", "big_vision"),
    "vit_l_in1k.pth": ("vit_l_in1k", "timm"),
}


# --- the world the commands see ------------------------------------------------------------------------------------

@dataclass
class World:
    """Session-wide fixture files: source trees, their shards, release weights and stand-in exports."""

    root: Path
    releases: ReleaseFiles
    sources: Path = field(init=False)
    shards: dict[tuple[str, str], str] = field(init=False)

    def __post_init__(self) -> None:
        self.sources = write_sources(self.root / "datasets")
        self.shards = write_shards(self.sources, self.root / "data")

    def checkout_copy(self, name: str) -> Path:
        """A copy of the checkout's files (git's tracked and unignored ones), made once per name."""
        copy = self.root / "checkouts" / name
        if not copy.is_dir():
            listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                                    capture_output=True, text=True).stdout.split("\0")
            for file in filter(None, listed):
                if (REPO / file).is_file():
                    (copy / file).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(REPO / file, copy / file)
        return copy

    def weights(self, file: str) -> Path:
        if file not in WEIGHTS:
            pytest.fail(f"the README names weights /weights/{file}; add it to WEIGHTS in {Path(__file__).name} "
                        f"with the release and layout it stands for")
        name, layout = WEIGHTS[file]
        return self.releases.file(name, layout, Path(file).suffix)

    def weights_of(self, model: str) -> Path:
        """The release file of registry model ``model`` in timm's layout (for ``model.weights=...``)."""
        return self.releases.file(model, "timm", ".safetensors")

    def export(self, model: str) -> Path:
        """A stand-in for a Stage-1/2 export of ``model``: its architecture with linear attention, random
        weights stored in fp16, adala's export metadata."""
        from adala.models import attention_config, build_vfm, save_export

        path = self.releases.root / f"{model}.export.safetensors"
        if not path.is_file():
            vit = build_vfm(model, attention={"kind": "linear", "kernel": "elu1"})
            state = {k: v.to(torch.float16) for k, v in vit.state_dict().items()}
            save_export(state, path, {"model": model, "img_size": vit.patch_embed.img_size[0],
                                      "attention": attention_config(vit)})
        return path

    def segmenter(self, model: str, data: str) -> Path:
        """A stand-in for a softmax ``finetune_seg`` export of ``model`` on ``data``: its architecture with softmax
        attention and a linear head for the data set's classes, random weights stored in fp16, adala's metadata."""
        from adala.config import compose
        from adala.models import attention_config, build_vfm, save_export
        from adala.stages.seg_heads import LinearHead

        path = self.releases.root / f"{model}.{data}-segmenter.safetensors"
        if not path.is_file():
            classes = compose([f"data={data}"]).data.num_seg_classes
            vit = build_vfm(model, attention={"kind": "softmax"})
            head = LinearHead(vit.embed_dim, classes, len(vit.blocks))
            state = {**vit.state_dict(), **{f"seg_head.{k}": v for k, v in head.state_dict().items()}}
            state = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in state.items()}
            save_export(state, path, {"model": model, "img_size": vit.patch_embed.img_size[0], "stage": "finetune_seg",
                                      "num_seg_classes": classes, "seg_head": "linear",
                                      "attention": attention_config(vit)})
        return path


@pytest.fixture(scope="session")
def world(release_files: ReleaseFiles, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    world = World(tmp_path_factory.mktemp("docs"), release_files)
    yield world
    shutil.rmtree(world.root / "checkouts", ignore_errors=True)  # a fresh install's environment: several GB


# --- one command, made runnable --------------------------------------------------------------------------------------

@dataclass
class Case:
    """A README command on its way to running: its text (placeholders being replaced), the directory it runs in
    and its environment."""

    command: DocCommand
    world: World
    cwd: Path
    text: str = ""
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.text = self.command.text
        self.env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "HEAD": "127.0.0.1",
                    "OMP_NUM_THREADS": "1", "ADALA_PYTHON": sys.executable, "ADALA_CACHE": str(self.cwd / ".cache")}
        self.env.pop("WORLD_SIZE", None)

    def sibling(self, pattern: str) -> str:
        """The text of another README command (its first match), e.g. the full form a ``...`` stands for."""
        for other in all_commands():
            if re.match(pattern, other.text):
                return other.text
        pytest.fail(f"no README command matches {pattern!r}, which {self.command.id} refers to")

    def run(self, text: Optional[str] = None, *, timeout: float = 900, expect: int = 0) -> subprocess.CompletedProcess:
        text = self.resolved(text if text is not None else self.text)
        out = subprocess.run(["bash", "-c", text], cwd=self.cwd, env=self.env, capture_output=True, text=True,
                             timeout=timeout)
        if out.returncode != expect:
            pytest.fail(f"{self.command.doc}:{self.command.line}: exit {out.returncode} (expected {expect})\n"
                        f"README: {self.command.text}\nran:    {text}\n--- stderr (end)\n{out.stderr[-3000:]}\n"
                        f"--- stdout (end)\n{out.stdout[-1500:]}", pytrace=False)
        return out

    # placeholders

    def resolved(self, text: str) -> str:
        text = self._fill_data(text)
        text = self._fill_weights(text)
        text = re.sub(rf"{ROOTED}/weights/([\w.-]+)", lambda m: str(self.world.weights(m[1])), text)
        text = re.sub(rf"{ROOTED}/data/(\w+)/([\w-]+)-\{{(\d+)\.\.(\d+)\}}\.tar", self._shards, text)
        text = re.sub(rf"{ROOTED}/datasets/", f"{self.world.sources}/", text)
        text = re.sub(rf"{ROOTED}/data/(\w+)", lambda m: str(self.cwd / "data" / m[1]), text)
        for init in re.findall(r"(?:^|\s)'?stage\.init=(runs/\S+?/export/model\.safetensors)", text):
            self._place_export(init)
        left = re.search(rf"{ROOTED}/(weights|datasets|data)/|(?<!\.)\.\.\.(?!\.)", text)
        if left:
            pytest.fail(f"{self.command.id}: placeholder {left[0]!r} left in: {text}; give its rule a fill")
        return text

    def _shards(self, match: re.Match) -> str:
        name, split, first, last = match.groups()
        if (name, split) not in self.world.shards:
            pytest.fail(f"{self.command.doc}:{self.command.line} names shards {match[0]}, but `python -m adala.data "
                        f"write` writes <split>-NNNNNN.tar (train, val) for data sets "
                        f"{sorted({n for n, _ in self.world.shards})}", pytrace=False)
        if len(first) != 6 or len(last) != 6:
            pytest.fail(f"{self.command.doc}:{self.command.line} names shards {match[0]}, but `python -m adala.data "
                        "write` numbers shards with 6 digits", pytrace=False)
        return self.world.shards[name, split]

    def _fill_data(self, text: str) -> str:
        """``[scope:]data.train="..."`` / ``data.val="..."``: the fixture shards of the data set that job reads."""
        def data_set(scope: Optional[str]) -> str:
            if scope in TASK_DATA:
                return TASK_DATA[scope]
            chosen = re.search(r"(?:^|\s)data=(\w+)", text)
            if chosen:
                return chosen[1]
            stage = re.search(r"(?:^|\s)stage=(\w+)", text)
            stage_name = stage[1] if stage else self.script_stage(text)
            if stage_name not in STAGE_DATA:
                pytest.fail(f"{self.command.id}: cannot tell which data set a '...' stands for")
            return STAGE_DATA[stage_name]

        def shards(match: re.Match) -> str:
            scope, split = match[1], match[2]
            return f"{match[0].split('=')[0]}=\"{self.world.shards[data_set(scope), split]}\""

        return re.sub(r"(?:(\w+):)?data\.(train|val)=\"\.\.\.\"", shards, text)

    def _fill_weights(self, text: str) -> str:
        """``[model:]model.weights=...``: that model's release in timm's layout."""
        def weights(match: re.Match) -> str:
            model = match[1] or re.search(r"(?:^|\s)model=(\w+)", text)[1]
            return f"{match[0].split('=')[0]}={self.world.weights_of(model)}"

        return re.sub(r"(?:(\w+):)?model\.weights=\.\.\.(?=\s|$)", weights, text)

    def _place_export(self, relative: str) -> None:
        run = relative.split("/")[1]
        model = next((m for m in MODELS if run.startswith(m)), None)
        if model is None:
            pytest.fail(f"{self.command.id}: stage.init={relative}: no model name in the run's name")
        target = self.cwd / relative
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(self.world.export(model))

    def script_stage(self, text: str) -> Optional[str]:
        script = re.search(r"(\S+\.sh)\b", text)
        return self.script(script[1]).stage if script else None

    def script(self, name: str) -> "SbatchScript":
        """An sbatch script the command names: one of the checkout's, or one saved into the working directory."""
        return SbatchScript.read(REPO / name if (REPO / name).is_file() else self.cwd / name)


@dataclass(frozen=True)
class SbatchScript:
    stage: str  # the job body's argument
    nodes: int  # the #SBATCH defaults
    gpus_per_node: int

    @classmethod
    def read(cls, path: Path) -> "SbatchScript":
        text = path.read_text()
        option = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", text, re.M))
        stage = re.search(r"adala\.launch\.slurm_job (\w+)", text)
        assert stage, f"{path} does not run adala.launch.slurm_job STAGE"
        return cls(stage[1], int(option.get("nodes", 1)), int(option.get("gpus-per-node", 1)))


# --- how a command runs ----------------------------------------------------------------------------------------------

Runner = Callable[[Case], None]


def as_written(*, expect: int = 0, stdout: str = "", stderr: str = "", extra: tuple[str, ...] = ()) -> Runner:
    """Run the command (placeholders replaced, ``extra`` arguments appended); check the exit code and output."""
    def run(case: Case) -> None:
        out = case.run(" ".join([case.text, *extra]), expect=expect)
        assert re.search(stdout, out.stdout), f"stdout lacks {stdout!r}:\n{out.stdout[-2000:]}"
        assert re.search(stderr, out.stderr), f"stderr lacks {stderr!r}:\n{out.stderr[-2000:]}"
    return run


def with_check(case: Case) -> None:
    """A stage that would train a ViT-L: ``--check`` validates everything the run would check first."""
    _checked(case, case.text + " --check")


def with_task_teacher(case: Case) -> None:
    """Stages 1-2 of a task model (``stage.task_model=true``): its ``model.weights`` export stands in as a softmax
    segmenter of the command's model and data set, then ``--check``."""
    weights = re.search(r"(?:^|\s)model\.weights=(runs/\S+/export/model\.safetensors)", case.text)[1]
    model, data = (re.search(rf"(?:^|\s){key}=(\w+)", case.text)[1] for key in ("model", "data"))
    target = case.cwd / weights
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(case.world.segmenter(model, data))
    with_check(case)


def _checked(case: Case, text: str) -> None:
    out = case.run(text)
    assert "config ok" in out.stdout, out.stdout


def fill(base: str, runner: Runner) -> Runner:
    """A command with a bare ``...``: it stands for the arguments of the README command matching ``base`` that
    this one does not give itself; then ``runner`` runs it. (In ``torchrun ... -m adala ...`` the first ``...``
    stands for launcher options and is dropped.)"""
    def run(case: Case) -> None:
        own = shlex.split(case.text)
        if own[0] == "torchrun":
            module = own.index("-m")
            own = [a for i, a in enumerate(own) if not (a == "..." and i < module)]
        full = shlex.split(case.sibling(base))
        given = {_key(a) for a in own}
        rest = [a for a in full[_program_end(full):] if _key(a) not in given]
        case.text = " ".join(shlex.quote(b) for a in own for b in (rest if a == "..." else [a]))
        runner(case)
    return run


def fill_with(args: tuple[str, ...], runner: Runner) -> Runner:
    """A command ending in a bare ``...`` that no other README command spells out: it stands for ``args``."""
    def run(case: Case) -> None:
        assert case.text.endswith(" ..."), case.text
        case.text = case.text[:-3] + " ".join(args)
        runner(case)
    return run


def _key(argument: str) -> str:
    return argument.split("=", 1)[0] if "=" in argument and not argument.startswith("-") else argument


def _program_end(args: list[str]) -> int:
    """Where a command's own arguments start: after ``-m MODULE``, or after the script (``.py``/``.sh``) it runs."""
    for i, a in enumerate(args):
        if a == "-m":
            return i + 2
        if a.endswith((".py", ".sh")):
            return i + 1
    return 1


def torchrun_check(case: Case) -> None:
    """``torchrun ... -m adala ARGS``: every rank first validates the config for the launch's world size, which
    ``--check`` does for ``WORLD_SIZE`` processes; 8 ranks of a ViT-L do not run here."""
    args = shlex.split(case.text)
    module = args.index("-m")
    options = " ".join(args[1:module])
    nodes = int(re.search(r"--nnodes[= ](\d+)", options)[1]) if "--nnodes" in options else 1
    per_node = int(re.search(r"--nproc[-_]per[-_]node[= ](\d+)", options)[1])
    case.env["WORLD_SIZE"] = str(nodes * per_node)
    _checked(case, " ".join(["python -m adala --check", *map(shlex.quote, args[module + 2:])]))


def sbatch_check(case: Case) -> None:
    """``sbatch [options] SCRIPT ARGS`` for a ViT-L: what the job does first, validating its stage's config for
    the job's ranks (nodes x GPUs per node, from the options or the script's #SBATCH lines), with --check."""
    args = shlex.split(case.text)
    at = _program_end(args)
    script = case.script(args[at - 1])
    options = dict(a[2:].split("=", 1) for a in args[1:at - 1] if a.startswith("--") and "=" in a)
    case.env["WORLD_SIZE"] = str(int(options.get("nodes", script.nodes)) * int(options.get("gpus-per-node", script.gpus_per_node)))
    overrides = args[at:]
    chosen = [] if any(o.startswith("stage=") for o in overrides) else [f"stage={script.stage}"]
    _checked(case, " ".join(["python -m adala --check", *chosen, "resume=auto", *map(shlex.quote, overrides)]))


def after(setup: str, runner: Runner) -> Runner:
    """Run the README command matching ``setup`` first, in the same directory (e.g. the one that saves a script)."""
    def run(case: Case) -> None:
        case.run(case.sibling(setup))
        runner(case)
    return run


def without_slurm(runner: Runner) -> Runner:
    """Run with SLURM's commands hidden, as on a machine without SLURM: the README's launches ask for more nodes
    and GPUs than the local cluster has, which the launchers check whenever SLURM is there."""
    def run(case: Case) -> None:
        case.env["PATH"] = f"{VENV_BIN}{os.pathsep}{path_without(SLURM_PROGRAMS, case.cwd / '.bin')}"
        runner(case)
    return run


def path_without(programs: set[str], folder: Path) -> str:
    """A folder of links to every program on PATH except ``programs``."""
    folder.mkdir(exist_ok=True)
    for directory in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(directory):
            continue
        for entry in os.scandir(directory):
            link = folder / entry.name
            if entry.name not in programs and not link.exists() and not link.is_symlink():
                link.symlink_to(entry.path)
    return str(folder)


def on_cluster(setup: Optional[str] = None) -> Runner:
    """Submit to the local SLURM cluster as written (after the README command matching ``setup``), then cancel
    what was submitted: the jobs themselves are tested in tests/test_submit.py."""
    def run(case: Case) -> None:
        from tests.slurm_cluster import require_cluster

        require_cluster()
        record = case.cwd / "runs" / "pipeline" / "pipeline.json"
        try:
            if setup:
                case.run(case.sibling(setup))
            case.run()
        finally:
            if record.is_file():
                _cancel([job["id"] for job in json.loads(record.read_text())["jobs"]])
        assert record.is_file(), "the submission left no pipeline.json"
    return run


def _cancel(ids: list[str]) -> None:
    """Cancel jobs and wait until they have left the queue, so the node is free for the next test."""
    from tests.slurm_cluster import wait_for

    def gone() -> bool:
        listed = subprocess.run(["squeue", "-h", "-j", ",".join(ids)], capture_output=True, text=True)
        return not listed.stdout.strip()

    subprocess.run(["scancel", *ids], check=False)
    wait_for(gone, 300, f"jobs {', '.join(ids)} to leave the queue")


def with_help(case: Case) -> None:
    """A synopsis (``SRC OUT``, ``[--flag]``, ``...``) or a long benchmark: ``--help`` runs, and lists every
    option the README shows."""
    words = case.text.split()
    end = 3 if words[1:2] == ["-m"] else 1
    while end < len(words) and not re.search(r"^-|^[A-Z]+$|[<\[=/]|\.\.\.", words[end]):
        end += 1
    program = " ".join(words[:end])
    out = case.run(program + " --help")
    for option in re.findall(r"(?<![\w-])(--[\w-]+)", case.command.text):
        assert option in out.stdout, f"{option} (README) is not an option of {program}:\n{out.stdout}"


def files_exist(case: Case) -> None:
    """A name pattern (``launchers/*.py``, ``bench.*``): it matches files of the checkout."""
    pattern = case.text.split()[-1]
    pattern = pattern.replace(".", "/") + ".py" if pattern.endswith(".*") else pattern
    assert list(REPO.glob(pattern)), f"{pattern} matches no file"


def ci_runs(file: str) -> Runner:
    """Run by CI itself (``.ci/run`` and what it calls): the command is in ``file``."""
    def run(case: Case) -> None:
        assert case.text in (REPO / file).read_text(), f"{file} does not run {case.text!r}"
    return run


def covered_by_test(test: str) -> Runner:
    """An operator's command whose effect the README describes; ``test`` runs it and checks that effect."""
    def run(case: Case) -> None:
        path, name = test.split("::")
        source = (REPO / path).read_text()
        assert f"def {name}(" in source, f"{test} is gone"
        words = [word for word in case.text.split() if word != "..."]  # ...: the test's own overrides
        assert all(f'"{word}"' in source for word in words), f"{test} no longer runs {case.text!r}"
    return run


def in_checkout_copy(case: Case) -> None:
    """A command that writes into the checkout (a benchmark's committed results): run it in a copy."""
    case.cwd = case.world.checkout_copy("writable")
    case.run(timeout=1800)


def installed(*, demo: bool = False, then: tuple[str, ...] = ()) -> Runner:
    """An install command: run in a fresh copy of the checkout, with the virtual environment the README's first
    command creates there first on PATH (that command runs first if it has not yet). ``demo``: the trailing
    ``python -m adala`` runs the demo at tiny sizes. ``then``: commands run afterwards from outside the copy."""
    def run(case: Case) -> None:
        copy = case.world.checkout_copy("install")
        outside = case.cwd
        case.cwd = copy
        case.env["PATH"] = os.pathsep.join([str(copy / ".venv" / "bin"),
                                            *(p for p in os.environ["PATH"].split(os.pathsep) if p != VENV_BIN)])
        setup = case.sibling(r"python3 -m venv \.venv && ")
        if case.command.text != setup and not (copy / ".venv" / "bin" / "python").exists():
            case.run(setup + " " + " ".join(DEMO_TINY), timeout=1800)
        case.run(case.text + (" " + " ".join(DEMO_TINY) if demo else ""), timeout=1800)
        case.cwd = outside
        for command in then:
            case.run(command)
    return run


def tiny_demo_in_checkout_copy(case: Case) -> None:
    """Run in a copy of the checkout (the command writes into it), after the demo at tiny sizes there, with the
    demo's cache in the copy too, so every command run this way finds the same runs and the same shards."""
    case.cwd = case.world.checkout_copy("writable")
    case.env["ADALA_CACHE"] = str(case.cwd / ".cache")
    if not (case.cwd / "runs" / "demo" / "report.json").is_file():
        case.run(" ".join(["python -m adala", *DEMO_TINY]), timeout=1800)


def on_demo_runs_in_checkout_copy(case: Case) -> None:
    """A command that draws the README's pictures from the demo's runs into the checkout; it writes every picture
    the README shows."""
    tiny_demo_in_checkout_copy(case)
    shutil.rmtree(case.cwd / "docs" / "report", ignore_errors=True)  # the committed pictures: drawn anew
    case.run()
    shown = re.findall(r"\]\((docs/report/[\w.-]+\.png)\)", (REPO / "README.md").read_text())
    assert shown and all((case.cwd / picture).is_file() for picture in shown), shown


def after_tiny_demo(case: Case) -> None:
    """A command reading the demo's runs and writing into the checkout."""
    tiny_demo_in_checkout_copy(case)
    case.run()


def in_local_comparison(case: Case) -> None:
    """Move ``case`` into the directory the README's attention-comparison commands share, after the README's local
    submission of the comparison has run there once, at tiny sizes (its run directories are what the others read)."""
    case.cwd = case.world.root / "compare_local"
    case.env["ADALA_CACHE"] = str(case.cwd / ".cache")
    if not case.cwd.is_dir():
        checkout_view(case.cwd)
    submission = case.sibling(r"python launchers/submit\.py --local .*--attentions ")
    if not (case.cwd / _root_of(submission) / "compare.json").is_file():
        case.run(" ".join([submission, *DEMO_TINY]), timeout=1200)


def _root_of(command: str) -> Path:
    return Path(re.search(r"--root (\S+)", command)[1])


def local_comparison(case: Case) -> None:
    """The comparison's jobs ran, each in a run directory of its attention, and wrote the results with their
    attention column and the Table-1-shaped report."""
    in_local_comparison(case)
    root = case.cwd / _root_of(case.text)
    attentions = re.search(r"--attentions (\S+)", case.text)[1].split(",")
    record = json.loads((root / "comparison.json").read_text())
    names = [f"{job['model']}/{job['attention']}/{job['step']}" for job in record["jobs"]]
    assert len(set(names)) == len(names) and record["attentions"] == attentions, names
    assert all(Path(job["run_dir"]).is_relative_to(root / job["attention"]) for job in record["jobs"])
    results = json.loads((root / "results.json").read_text())["models"]
    assert [(r["attention"], r["status"]) for r in results] == [(a, "completed") for a in ["softmax", *attentions]]
    assert (root / "results.md").read_text().startswith("| VFM | attention |")
    rows = json.loads((root / "compare.json").read_text())["rows"]
    assert [(r["attention"], r["variant"]) for r in rows] == [("softmax", "teacher")] + [
        (a, v) for a in attentions for v in ("adala", "baseline")]
    assert all(0 <= r["top1"] <= 1 for r in rows)


def local_status(case: Case) -> None:
    """``submit.py status`` on the local comparison's root: every job completed and exported, as recorded by the
    launcher, which has exited; a new ``--local`` run into the root is not refused for it."""
    in_local_comparison(case)
    out = case.run().stdout
    assert "run here (--local)" in out and "launcher has exited" in out, out
    rows = [line.split() for line in out.splitlines()[2:] if line.strip()]
    record = json.loads((case.cwd / _root_of(case.text) / "pipeline.json").read_text())
    assert [row[0] for row in rows] == [job["name"] for job in record["jobs"]] and len(rows) > 1
    assert all(row[2] == "COMPLETED" and row[-1] == "yes" for row in rows), out


def report_from_runs(case: Case) -> None:
    """``adala compare --runs ROOT`` writes the report anew from the run directories alone."""
    in_local_comparison(case)
    root = case.cwd / case.text.split()[-1]
    written = json.loads((root / "compare.json").read_text())
    for name in ("compare.md", "compare.json", "per_block_error.png"):
        (root / name).unlink()
    out = case.run()
    again = json.loads((root / "compare.json").read_text())
    assert (root / "compare.md").read_text() in out.stdout and (root / "per_block_error.png").is_file()
    assert [(r["attention"], r["protocol"], r["top1"]) for r in again["rows"]] == [
        (r["attention"], r["protocol"], r["top1"]) for r in written["rows"]]
    assert again["block_errors"] == written["block_errors"]


def saves_the_script(case: Case) -> None:
    """``adala slurm-script stage2 > stage2.sh``: the installed package prints the checkout's script."""
    case.run()
    saved = (case.cwd / "stage2.sh").read_text()
    assert saved == (REPO / "slurm" / "stage2.sh").read_text(), "adala slurm-script stage2 differs from slurm/stage2.sh"


@dataclass(frozen=True)
class Rule:
    pattern: str  # a regular expression matched at the start of the command; the first matching rule applies
    runner: Runner
    marks: tuple[str, ...] = ()  # pytest marks: slow, slurm, ray


STAGE_S2 = r"python -m adala stage=align_features "
RULES = (
    # installing
    Rule(r"python3 -m venv \.venv && \.venv/bin/pip install", installed(demo=True), ("slow",)),
    # where adala is installed (the README's first command), pip takes the installed one and adds the extra
    Rule(r"pip install 'adala\[submitit\]'$", installed(then=("python -c 'import submitit'",)), ("slow",)),
    Rule(r"pip install 'adala\[ray\]'$", installed(then=("python -c 'import ray.train'",)), ("slow",)),
    Rule(r"pip install -e \.$", installed(then=("adala --help",)), ("slow",)),
    Rule(r"pip install \.$", installed(then=("adala --help",)), ("slow",)),  # a wheel: its configs come along
    Rule(r"bash scripts/test\.sh$", ci_runs(".ci/run")),
    Rule(r"bash scripts/local_slurm\.sh (up|up --nodes 2|down)$", ci_runs("scripts/test.sh")),
    # the demo and the CLI
    Rule(r"python -m adala$", as_written(extra=tuple(DEMO_TINY), stdout="scratch_linear"), ("slow",)),  # tiny sizes
    Rule(r"python -m adala --(cfg|help)$", as_written(stdout=r"\S")),
    Rule(r"python -m adala demo\.seg=both$", as_written(extra=(*DEMO_TINY, "demo.run_dir=runs/demo_mask2former"),
                                                         stdout=r"M2F mIoU"), ("slow",)),  # tiny sizes
    Rule(r"python -m adala demo\.", as_written(extra=("--cfg",), stdout=r"teacher_steps: 800")),
    Rule(r"python -m adala model=\w+$", as_written(expect=2, stderr=r"(?m)^adala: error: .*stage")),
    Rule(r"python -m adala report RUN_DIR ", with_help),
    Rule(r"python -m adala report runs/demo/", on_demo_runs_in_checkout_copy, ("slow",)),
    Rule(r"python -m adala sweep-kernels ", as_written(extra=("--check",), stdout="config ok")),
    Rule(r"python -m adala compare --runs ", report_from_runs, ("slow",)),  # after the local submission below
    Rule(r"python -m adala compare( |$)", as_written(extra=(*DEMO_TINY, "--attentions", "elu1"), stdout=r"\| attention \| protocol \|"),
         ("slow",)),  # tiny sizes, one plug
    # stages on ViT-L weights
    Rule(r"python -m adala stage=align_\w+ stage\.task_model=true ", with_task_teacher),
    Rule(r"python -m adala stage=", with_check),
    Rule(r"torchrun .* -m adala (stage=align_features )?.*\.\.\.$", fill(STAGE_S2, torchrun_check)),
    Rule(r"sbatch stage2\.sh \.\.\.$", fill(r"sbatch slurm/stage2\.sh model=", after(r"adala slurm-script stage2 > stage2\.sh", sbatch_check))),
    Rule(r"sbatch stage2\.sh ", after(r"adala slurm-script stage2 > stage2\.sh", sbatch_check)),
    Rule(r"sbatch --nodes=2 --gpus-per-node=1 ", covered_by_test(
        "tests/test_slurm_multinode.py::test_two_nodes_requeued_twice_end_with_the_weights_of_one_process")),
    Rule(r"sbatch .*slurm/stage\d\.sh \.\.\.$", fill(r"sbatch slurm/stage2\.sh model=", sbatch_check)),
    Rule(r"sbatch ", sbatch_check),
    Rule(r"adala slurm-script stage2 > stage2\.sh$", saves_the_script),
    Rule(r"scontrol requeue$", covered_by_test("tests/test_slurm.py::test_requeue_and_time_limit_warning_resume_to_the_same_weights")),
    # launchers
    Rule(r"python launchers/(submit|ray_sweep)\.py --help$", as_written(stdout="usage")),
    Rule(r"python launchers/submit\.py \.\.\. --dry-run$",
         fill(r"python launchers/submit\.py --models", without_slurm(as_written(stdout="dry run")))),
    Rule(r"python launchers/submit\.py --demo", on_cluster(), ("slurm",)),
    Rule(r"python launchers/submit\.py status --root runs/compare_local", local_status, ("slow",)),
    Rule(r"python launchers/submit\.py status --root runs/pipeline", on_cluster(setup=r"python launchers/submit\.py --demo"), ("slurm",)),
    Rule(r"python launchers/ray_sweep\.py --address .* \.\.\.$",  # the ... : the other Stage-3 tasks' data
         fill_with(tuple(f"'{task}:data.{split}=\"...\"'" for task in ("ade20k", "cityscapes") for split in ("train", "val")),
                   without_slurm(as_written(extra=("--dry-run",), stdout="dry run")))),
    Rule(r"python launchers/submit\.py --local .*--attentions ", local_comparison, ("slow",)),  # tiny sizes
    Rule(r"python launchers/ray_sweep\.py --demo .*--attentions ",
         as_written(extra=(*DEMO_TINY, "demo.samples_per_shard=32", "--dry-run"),
                    stdout=r"demo_tiny/performer/baseline_cls")),
    Rule(r"python launchers/(submit|ray_sweep)\.py (?!--demo)",
         without_slurm(as_written(extra=("--dry-run",), stdout="dry run"))),
    Rule(r"python launchers/ray_sweep\.py --demo --dry-run$", as_written(stdout="dry run")),
    Rule(r"python launchers/ray_sweep\.py --demo$", as_written(extra=(*DEMO_TINY, "demo.samples_per_shard=32"), stdout="demo_tiny"),
         ("slow", "ray")),  # tiny sizes: small shards, so each of the 2 workers reads its own in Stage 3
    Rule(r"python launchers/\*\.py$", files_exist),
    # data
    Rule(r"python -m adala\.data write /datasets/", as_written(stdout=r"\d+ samples in \d+ shards")),
    Rule(r"python -m adala\.data write --help$", as_written(stdout="--format")),
    Rule(r"python -m adala\.data write( SRC OUT|$)", with_help),
    # benchmarks and other programs' tools
    Rule(r"python -m bench\.\*$", files_exist),
    Rule(r"python -m bench\.efficiency --models vit_tiny_patch16 ", in_checkout_copy, ("slow",)),
    Rule(r"python -m adala\.eval\.resolution runs/demo/", after_tiny_demo, ("slow",)),
    Rule(r"python -m adala\.eval\.resolution runs/<run>/", with_help),
    Rule(r"python -m (bench\.\w+|adala\.eval\.bench|deepspeed\.checkpoint\.ds_to_universal)", with_help),
    Rule(r"ray (start|stop)( |$)", with_help),
)


def rule_for(command: DocCommand) -> Optional[Rule]:
    return next((rule for rule in RULES if re.match(rule.pattern, command.text)), None)


def cases() -> list:
    params = []
    for command in all_commands():
        rule = rule_for(command)
        marks = [getattr(pytest.mark, m) for m in (rule.marks if rule else ())]
        params.append(pytest.param(command, id=command.id, marks=marks))
    return params


def checkout_view(directory: Path) -> Path:
    """``directory`` showing the checkout's top-level files (links) but a ``runs/`` of its own."""
    directory.mkdir(exist_ok=True)
    for entry in REPO.iterdir():
        if entry.name not in {"runs", "outputs", ".pytest_cache", ".git"}:
            (directory / entry.name).symlink_to(entry)
    return directory


@pytest.mark.parametrize("command", cases())
def test_readme_command(command: DocCommand, world: World, tmp_path: Path) -> None:
    rule = rule_for(command)
    if rule is None:
        pytest.fail(f"{command.doc}:{command.line}: no rule says how to run `{command.text}`; add one to RULES in "
                    f"{Path(__file__).name} (or fix the README)", pytrace=False)
    cwd = checkout_view(tmp_path / "work")
    shutil.copy(world.sources / "imagenet" / "LOC_val_solution.csv", cwd)  # Kaggle's file, beside the user
    (cwd / "ds_overrides.json").write_text(json.dumps({"gradient_clipping": 1.0}))
    rule.runner(Case(command, world, cwd))


def test_every_rule_is_used() -> None:
    """A rule that matches no README command is left over from an older README."""
    commands = all_commands()
    unused = [rule.pattern for rule in RULES if not any(re.match(rule.pattern, c.text) for c in commands)]
    assert not unused, f"rules for commands the READMEs no longer show: {unused}"


def test_extraction_joins_continuations_and_drops_comments() -> None:
    from tests.doc_commands import _join, strip_comment

    assert strip_comment("run a '#not' \"#x\" # comment") == "run a '#not' \"#x\""
    assert strip_comment("$HEAD:29500#x") == "$HEAD:29500#x"
    assert _join([(1, "a \\"), (2, "   b  # note"), (3, ""), (4, "# only a comment"), (5, "c")]) == [(1, "a b"), (5, "c")]


# --- real runs of the real architectures, in their original layouts -------------------------------------------------

@pytest.mark.slurm
@pytest.mark.slow
def test_readme_stage2_sbatch_trains_dinov2_from_the_hub_file(world: World, tmp_path: Path) -> None:
    """slurm/README.md's ``sbatch slurm/stage2.sh`` for real on the local cluster: ViT-S/14 from a DINOv2 torch-hub
    file, the configs' defaults (ImageNet-22K data config, 518 px, batch 16, 8 data workers) and only
    ``train.max_steps`` added; the job's resources are sbatch options sized to the local node."""
    from adala.models import read_export_metadata
    from tests.slurm_cluster import require_cluster, wait_done

    require_cluster()
    readme = Case(next(c for c in all_commands() if re.match(r"sbatch slurm/stage2\.sh model=", c.text)), world,
                  checkout_view(tmp_path / "work"))
    hub_file = world.releases.file("dinov2_s", "dinov2_hub", ".pth")
    text = readme.text.replace("model=dinov2_l", "model=dinov2_s").replace("model.weights=...", f"model.weights={hub_file}")
    text = text.replace("sbatch ", f"sbatch --parsable --gpus-per-node=1 --cpus-per-gpu=2 --mem=12G "
                                   f"--output={tmp_path}/slurm-%j.out ", 1) + " train.max_steps=2"
    job = readme.run(text).stdout.strip().split(";")[0]
    info = wait_done(job, timeout=900)
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    run_dir = readme.cwd / "runs" / "dinov2_l" / "s2"  # the README's run_dir, as written
    config = (run_dir / "config.yaml").read_text()
    for default in ("name: in22k", "batch_size: 16", "img_size: 518", "workers: 8", "alpha: 5.0"):
        assert default in config, config
    assert [json.loads(line)["step"] for line in (run_dir / "log.jsonl").read_text().splitlines()][-1] == 2
    export = run_dir / "export" / "model.safetensors"
    meta = read_export_metadata(export)
    assert meta["model"] == "dinov2_s" and meta["tokens"] == 1 + 37 * 37 and meta["attention"]["kind"] == "linear"
    assert "1370 tokens" in log


# One small architecture of each other family, from its release's original layout: (release, layout, file suffix,
# timm id). Stage 2 through `python -m adala` with model=timm, two steps at small batches.
FAMILIES = [
    ("clip_b32", "openai_clip_jit", ".pt", "vit_base_patch32_clip_quickgelu_224.openai"),
    ("siglip_b", "big_vision", ".npz", "vit_base_patch16_siglip_224.webli"),
    ("vit_ti_in1k", "augreg", ".npz", "vit_tiny_patch16_224.augreg_in21k_ft_in1k"),
]


@pytest.mark.slow
@pytest.mark.parametrize("release, layout, suffix, timm_id", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_stage2_trains_each_family_from_its_original_file(world: World, tmp_path: Path, release: str, layout: str,
                                                          suffix: str, timm_id: str) -> None:
    from adala.models import read_export_metadata

    weights = world.releases.file(release, layout, suffix)
    run_dir = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "adala", "stage=align_features", "model=timm", f"model.timm_id={timm_id}",
         f"model.weights={weights}", f'data.train="{world.shards["in22k", "train"]}"', "data.workers=0",
         "stage.batch_size=2", "train.max_steps=2", "train.log_every=1", f"run_dir={run_dir}"],
        cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "2"}, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(loss == loss and loss < float("inf") for loss in losses)
    meta = read_export_metadata(run_dir / "export" / "model.safetensors")
    assert meta["model_spec"]["timm_id"] == timm_id and meta["attention"]["kind"] == "linear"
