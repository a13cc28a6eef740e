"""The commands README.md and docs/*.md show in their shell code blocks, parsed as the shell would.

A command is `./launch.sh ...` or `python -m rpc_train.<module> ...`, with any leading
environment assignments (`NPROC=4 ./launch.sh ...`). Backslash continuations and quoted strings
that span lines are joined,
`# comments` dropped, and a line with `&&` or `;` yields each command in it. Values are left
unexpanded (`$HOME/data`): expanding is the shell's work, which the tests do with their own
environment.
"""

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

from helpers.launching import REPO

SHELL_FENCES = {"bash", "sh", "shell", "console"}
# Modules whose arguments are Hydra overrides; every other rpc_train module parses flags (argparse).
HYDRA_MODULES = {"rpc_train.train", "rpc_train.preflight", "rpc_train.sweep", "rpc_train.generate"}
# launch.sh's introspection flags, two of them with a value (`--cfg job`), and the sweep flag.
LAUNCH_FLAGS_WITH_VALUE = {"--cfg", "-c", "--info", "-i", "--package", "-p"}
LAUNCH_FLAGS = {"--help", "-h", "--hydra-help", "--resolve", "-m", "--multirun"}
ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")


@dataclass(frozen=True)
class DocCommand:
    where: str                 # "README.md:20", the line the command starts on
    env: Tuple[Tuple[str, str], ...]
    module: Optional[str]      # None for ./launch.sh
    args: Tuple[str, ...]      # as written, `...` (the docs' "and so on") dropped

    @property
    def launcher(self) -> bool:
        return self.module is None

    @property
    def hydra(self) -> bool:
        return self.launcher or self.module in HYDRA_MODULES

    @property
    def environment(self) -> Dict[str, str]:
        return dict(self.env)

    def overrides(self) -> List[str]:
        """The Hydra overrides, without launch.sh's introspection and sweep flags."""
        out, args = [], list(self.args)
        while args:
            arg = args.pop(0)
            if arg in LAUNCH_FLAGS_WITH_VALUE and args:
                args.pop(0)
            elif arg not in LAUNCH_FLAGS and not arg.startswith(("--cfg=", "--info=")):
                out.append(arg)
        if self.module == "rpc_train.generate":  # its own short forms (prompt=...) become overrides
            from rpc_train.generate import literal_prompt

            out = [literal_prompt(arg) for arg in out]
        return out

    @property
    def sweep(self) -> bool:
        return "-m" in self.args or "--multirun" in self.args

    def __str__(self) -> str:
        program = ["./launch.sh"] if self.launcher else ["python", "-m", self.module]
        return shlex.join([f"{k}={v}" for k, v in self.env] + program + list(self.args))


def doc_pages() -> List[Path]:
    """README.md and every page under docs/, so a page added later is covered without a change here."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def shell_lines(text: str) -> Iterator[Tuple[int, str]]:
    """(first line number, logical line) of every line inside a shell code fence."""
    fence, pending, start = None, "", 0
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            fence = stripped[3:].strip() if fence is None else None
            continue
        if fence not in SHELL_FENCES:
            continue
        start = start if pending else number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        if not _complete(pending + line):  # a quoted string goes on to the next line
            pending += line + "\n"
            continue
        yield start, pending + line
        pending = ""


def _complete(line: str) -> bool:
    try:
        shlex.split(line, comments=True)
    except ValueError:  # "No closing quotation"
        return False
    return True


def split_commands(line: str) -> Iterator[List[str]]:
    """Each simple command of a shell line, as shlex splits it: `a && b; c` gives a, b and c."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True  # `data.root=$HOME/data` stays one word
    words: List[str] = []
    for token in lexer:
        if token and set(token) <= set(";&|"):
            yield words
            words = []
        else:
            words.append(token)
    yield words


def parse(words: List[str], where: str) -> Optional[DocCommand]:
    env = []
    while words and ASSIGNMENT.match(words[0]):
        name, _, value = words.pop(0).partition("=")
        env.append((name, value))
    words = [w for w in words if w != "..."]
    if words[:1] == ["./launch.sh"]:
        return DocCommand(where, tuple(env), None, tuple(words[1:]))
    if words[:2] in (["python", "-m"], ["python3", "-m"]) and len(words) > 2 and words[2].startswith("rpc_train."):
        return DocCommand(where, tuple(env), words[2], tuple(words[3:]))
    return None


def page_commands(path: Path) -> List[DocCommand]:
    found = []
    for number, line in shell_lines(path.read_text()):
        for words in split_commands(line):
            command = parse(words, f"{path.relative_to(REPO)}:{number}")
            if command:
                found.append(command)
    return found


def doc_commands() -> List[DocCommand]:
    return [command for page in doc_pages() for command in page_commands(page)]
