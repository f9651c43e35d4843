"""The code blocks of the README and of docs/*.md, for the tests that run them.

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
FRAGMENT = {"python": "# fragment", "cpp": "// fragment"}
_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>```+)(?P<info>[^`\n]*)$")
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
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def blocks(root: Path = ROOT) -> list[Block]:
    """Every Python and C++ block of the README and of docs/*.md, in order."""
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
            while end < len(lines) and lines[end].strip() != fence:
                end += 1
            info = opening["info"].strip().split()
            language = LANGUAGES.get(info[0].lower()) if info else None
            if language is not None:
                body = [line[indent:] for line in lines[i + 1 : end]]
                includes = [_INCLUDE.match(line.strip()) for line in body if line.strip()]
                if includes and all(includes):
                    paths = tuple(m["path"] for m in includes if m)
                    text = "".join((root / path).read_text() for path in paths)
                else:
                    paths, text = (), "\n".join(body) + "\n"
                found.append(Block(str(page.relative_to(root)), i + 1, language, text, paths))
            i = end + 1
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
