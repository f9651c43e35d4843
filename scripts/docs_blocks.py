"""The code blocks of the README and of docs/**/*.md, for the tests that run them.

A block is either a complete program or a fragment, whose first line is a
comment starting with "fragment" (``# fragment: ...`` in Python,
``// fragment: ...`` in C++). A block whose lines are ``--8<-- "path"``
(pymdownx.snippets, as the site includes its examples) stands for the files
it includes. See docs/development.md, "The documentation and its examples".

    python scripts/docs_blocks.py cpp OUT_DIR   # each complete C++ block as OUT_DIR/<name>.cc
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LANGUAGES = {"python": "python", "py": "python", "cpp": "cpp", "c++": "cpp"}
# Other names a highlighter takes for Python or C++: a block under one of
# them would escape the tests, so blocks() refuses them (see unrecognized()).
ALIASES = {
    "python3", "py3", "pycon", "pyi", "python-console", "ipython", "ipython3", "sage",
    "cc", "cxx", "hpp", "hxx", "hh", "h++",
}  # fmt: skip
FRAGMENT = {"python": "# fragment", "cpp": "// fragment"}
# A fence of ``` or ~~~ (CommonMark); a backtick fence's info has no backtick.
_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}(?=[^`]*$)|~{3,})(?P<info>.*)$")
_INCLUDE = re.compile(r'^--8<-- "(?P<path>[^"]+)"$')


@dataclass(frozen=True)
class Block:
    page: str  # relative to the repository
    line: int  # of the opening fence, 1-based
    language: str  # "python" or "cpp"
    text: str  # the program: the block's lines, or the files it includes
    included: tuple[str, ...]  # the files it includes, relative to the repository

    @property
    def name(self) -> str:
        """The included file, or page:line for a block written in the page."""
        return self.included[0] if len(self.included) == 1 else f"{self.page}:{self.line}"

    @property
    def fragment(self) -> bool:
        first = next((line for line in self.text.splitlines() if line.strip()), "")
        return first.lstrip().lower().startswith(FRAGMENT[self.language])


def pages(root: Path = ROOT) -> list[Path]:
    """The README and every Markdown page under docs/ (subdirectories too)."""
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def _language_name(info: str) -> str:
    """The language an info string names: ``python``, ``{.python}``,
    ``{ .py title="x" }`` or ``python title="x"`` -> the first word, lower case."""
    info = info.strip()
    if info.startswith("{"):
        classes = [word[1:] for word in info.strip("{} ").split() if word.startswith(".")]
        return classes[0].lower() if classes else ""
    words = info.split()
    return words[0].lower() if words else ""


def _closes(line: str, fence: str) -> bool:
    """A closing fence: the opening's character, at least as many, no info."""
    stripped = line.strip()
    return len(stripped) >= len(fence) and set(stripped) == {fence[0]}


def unrecognized(root: Path = ROOT) -> list[str]:
    """``page:line: name`` for each fence naming Python or C++ in a way the
    tests do not take (``python3``, ``pycon``, ``cc``...): write ``python``
    or ``cpp``."""
    return [f"{page}:{line}: {name}" for page, line, name, _ in _scan(root) if name in ALIASES]


def _scan(root: Path) -> list[tuple[str, int, str, list[str]]]:
    """(page, line of the opening fence, language name, body) of every
    top-level fenced block (a block inside another, as in a ````markdown
    block, is the outer block's text)."""
    found = []
    for page in pages(root):
        lines = page.read_text().splitlines()
        i = 0
        while i < len(lines):
            opening = _FENCE.match(lines[i])
            if not opening:
                i += 1
                continue
            indent, fence = len(opening["indent"]), opening["fence"]
            end = i + 1
            while end < len(lines) and not _closes(lines[end], fence):
                end += 1
            body = [line[indent:] for line in lines[i + 1 : end]]
            name = _language_name(opening["info"])
            found.append((str(page.relative_to(root)), i + 1, name, body))
            i = end + 1
    return found


def blocks(root: Path = ROOT) -> list[Block]:
    """Every Python and C++ block of the README and of docs/**/*.md, in order."""
    found = []
    for page, line, name, body in _scan(root):
        language = LANGUAGES.get(name)
        if language is None:
            continue
        includes = [_INCLUDE.match(text.strip()) for text in body if text.strip()]
        if includes and all(includes):
            paths = tuple(m["path"] for m in includes if m)
            text = "".join((root / path).read_text() for path in paths)
        else:
            paths, text = (), "\n".join(body) + "\n"
        found.append(Block(page, line, language, text, paths))
    return found


def complete(language: str, root: Path = ROOT) -> list[Block]:
    """The complete programs in ``language``, each once (a file the site
    includes on several pages, or that the README copies, runs once)."""
    seen: set[str] = set()
    result = []
    for block in blocks(root):
        if block.language == language and not block.fragment and block.text not in seen:
            seen.add(block.text)
            result.append(block)
    return result


def _write_cpp(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.cc"):
        old.unlink()
    for block in complete("cpp"):
        stem = Path(block.name).stem if block.included else block.name
        name = re.sub(r"[^A-Za-z0-9]+", "_", stem)
        source = out / f"{name.strip('_')}.cc"
        source.write_text(f"// {block.name}\n{block.text}")
        print(f"{source.name}: {block.name}")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "cpp":
        sys.exit(__doc__)
    _write_cpp(Path(sys.argv[2]))
