"""The shell commands the READMEs show, as a user would copy them.

Sources, per Markdown file: every line of a ```bash (or sh/shell/console) block, the lines of indented code
blocks that start with a program, and inline code spans of two or more words that start with one. Backslash
continuations are joined and comments dropped, so each command is one line of shell.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "slurm/README.md", "launchers/README.md")
SHELL_FENCES = {"bash", "sh", "shell", "console"}
# First words that make a line or a code span a command.
PROGRAMS = {"python", "python3", "pip", "pip3", "sbatch", "srun", "scontrol", "scancel", "squeue", "torchrun", "bash",
            "adala", "adala-submit", "adala-ray-sweep", "ray"}


@dataclass(frozen=True)
class DocCommand:
    doc: str  # path relative to the repository
    line: int  # where the command starts
    text: str  # one line of shell: continuations joined, comments dropped
    where: str  # "block" (fenced), "indented" or "inline"

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}:{self.text[:60]}"


def strip_comment(line: str) -> str:
    """``line`` without its shell comment: from an unquoted ``#`` at the start of a word."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def is_command(text: str) -> bool:
    first = text.split(maxsplit=1)[0] if text.strip() else ""
    return first in PROGRAMS or first.startswith((".venv/bin/", "./"))


def _join(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """(line number, text) pairs with backslash continuations joined and comments dropped; blank ones left out."""
    joined, start, parts = [], None, []
    for number, raw in lines:
        text = strip_comment(raw)
        if start is None:
            start = number
        if text.endswith("\\"):
            parts.append(text[:-1].strip())
            continue
        parts.append(text.strip())
        command = " ".join(p for p in parts if p)
        if command:
            joined.append((start, command))
        start, parts = None, []
    return joined


def extract(doc: str) -> list[DocCommand]:
    lines = (REPO / doc).read_text().splitlines()
    found: list[DocCommand] = []
    fence, block, indented, paragraph = None, [], [], []

    def flush() -> None:
        found.extend(DocCommand(doc, n, t, "indented") for n, t in _join(indented) if is_command(t))
        indented.clear()
        if paragraph:  # inline code spans may run over a line break
            start, text = paragraph[0][0], "\n".join(line for _, line in paragraph)
            for match in re.finditer(r"`([^`]+)`", text):
                span = " ".join(match[1].split())
                if len(span.split()) >= 2 and is_command(span):
                    found.append(DocCommand(doc, start + text[:match.start()].count("\n"), span, "inline"))
            paragraph.clear()

    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if fence is not None:
            if stripped.startswith("```"):
                if fence in SHELL_FENCES:
                    found.extend(DocCommand(doc, n, t, "block") for n, t in _join(block))
                fence, block = None, []
            else:
                block.append((number, line))
        elif stripped.startswith("```"):
            flush()
            fence = stripped[3:].strip().lower()
        elif line.startswith("    ") and stripped and (indented or not paragraph):
            indented.append((number, line))
        elif not stripped:
            flush()
        else:
            if indented:
                flush()
            paragraph.append((number, line))
    flush()
    return found


def all_commands() -> list[DocCommand]:
    """Every command of every README once (the first place it is shown)."""
    seen: set[str] = set()
    commands = []
    for doc in DOCS:
        for command in extract(doc):
            if command.text not in seen:
                seen.add(command.text)
                commands.append(command)
    return commands
