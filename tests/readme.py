"""README.md's code blocks, for the tests that run them (tests/test_readme.py).

Every fenced block is preceded by a marker line: `<!-- readme: test NAME -->` (a test reads the block
with `block("NAME")` or `commands("NAME")` and runs it) or `<!-- readme: not run: REASON -->` (it needs
a cluster, credentialed data, an extra install, ...). A command written inline in the prose must
appear in a block, so that it is run or marked there too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```(?P<lang>[\w-]*)[ \t]*\n(?P<body>.*?)^```[ \t]*$", re.M | re.S)
MARKER = re.compile(r"^<!--\s*readme:\s*(?:test\s+(?P<test>[\w-]+)|not run:\s*(?P<reason>\S.*?))\s*-->$")
# an inline code span is a command when it starts with one of these and has three words or more
COMMAND_WORDS = (
    "mlflow",
    "python",
    "python3",
    "pip",
    "sbatch",
    "curl",
    "optuna-dashboard",
    "bash",
    "export",
    "promptehr",
    "tuning/slurm/submit.sh",
)


@dataclass
class Block:
    lang: str
    text: str
    line: int  # 1-based line of the opening fence
    marker: str | None  # the line before the fence
    test: str | None  # the test that runs it
    reason: str | None  # why it is not run


def blocks(text: str | None = None) -> list[Block]:
    text = README.read_text() if text is None else text
    found = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        marker = MARKER.match(before)
        found.append(
            Block(
                match["lang"],
                match["body"],
                line,
                before if before.startswith("<!--") else None,
                marker["test"] if marker else None,
                marker["reason"] if marker else None,
            )
        )
    return found


def block(name: str) -> Block:
    [found] = [b for b in blocks() if b.test == name]
    return found


def commands(name: str) -> list[str]:
    """The commands of a shell block: lines joined at a trailing backslash, comments and blank lines
    dropped."""
    out, pending = [], ""
    for raw in block(name).text.splitlines():
        line = pending + raw
        if line.endswith("\\"):
            pending = line[:-1]
            continue
        pending = ""
        line = re.sub(r"\s+#(\s.*)?$", "", line).strip()  # a trailing comment (no command here has " #" in quotes)
        if line and not line.startswith("#"):
            out.append(line)
    return out


def inline_commands(text: str | None = None) -> list[str]:
    """Inline code spans of the prose (outside fenced blocks) that are commands."""
    text = README.read_text() if text is None else text
    prose = FENCE.sub("", text)
    spans = re.findall(r"(?<!`)`([^`\n]+)`(?!`)", prose)
    return [s for s in spans if s.split()[0] in COMMAND_WORDS and len(s.split()) >= 3]
