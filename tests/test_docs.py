"""The README and docs/ stay true to the repository: every relative link resolves (the file, and for an
``#anchor`` a heading of that file), and every ``sdzoo ...``, ``python -m sdzoo ...`` or ``scripts/X.py ...``
command shown in a bash block parses its flags with the command line's own parser (no command runs)."""
import importlib
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "model_cards" / "README.md"]

FENCE = re.compile(r"^(```|~~~)(.*)$")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"`+[^`]*`+")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
SCRIPT = re.compile(r"(?:^|/)scripts/([A-Za-z0-9_]+\.py)$")
SEPARATORS = {"&&", "||", ";", "|"}
# `sdzoo compare` hands the flags it does not know to every training run it starts.
FORWARDS_UNKNOWN_FLAGS_TO = {"compare": "train"}


def split_blocks(text):
    """(prose lines, bash blocks): each prose line as (line number, text), each bash block as (first line
    number, its lines). Code of any other language is neither."""
    prose, blocks, fence, language, block = [], [], None, "", []
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line.strip())
        if fence is None and match:
            fence, language, block = match.group(1), match.group(2).strip().lower(), []
            start = number + 1
        elif fence is not None and line.strip().startswith(fence):
            if language in ("bash", "sh", "shell", "console"):
                blocks.append((start, block))
            fence = None
        elif fence is not None:
            block.append(line)
        else:
            prose.append((number, line))
    return prose, blocks


def anchor(heading):
    """GitHub's anchor of a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading anchors by its text
    text = re.sub(r"[^\w\- ]", "", text.lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors_of(path):
    seen, anchors = {}, set()
    prose, _ = split_blocks(path.read_text(encoding="utf-8"))
    for _, line in prose:
        match = HEADING.match(line)
        if match:
            base = anchor(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            anchors.add(base if count == 0 else f"{base}-{count}")
    return anchors


def link_problems(path):
    """Every relative link of a Markdown file that does not resolve, as 'FILE:LINE: why'."""
    problems = []
    prose, _ = split_blocks(path.read_text(encoding="utf-8"))
    for number, line in prose:
        for target in LINK.findall(INLINE_CODE.sub("", line)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
                continue  # a URL, not a file of the repository
            file_part, _, fragment = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{number}"
            if not linked.exists():
                problems.append(f"{where}: link {target!r}: {file_part} does not exist")
            elif fragment and linked.suffix == ".md" and fragment not in anchors_of(linked):
                problems.append(f"{where}: link {target!r}: {linked.name} has no heading with anchor #{fragment}")
    return problems


def shown_commands(path):
    """Every sdzoo command of a file's bash blocks, as (where, argv of the sdzoo parser): `sdzoo ARGS`
    (also `.venv/bin/sdzoo`), `python -m sdzoo ARGS`, and `python scripts/X.py ARGS` or `torchrun ...
    scripts/X.py ARGS`, which is `[SCRIPTS["X.py"], *ARGS]`. A script the SCRIPTS map does not know comes
    back as ("?X.py", ARGS), so that the test names it. Other commands (pip, pytest, apt-get) are skipped."""
    commands = []
    _, blocks = split_blocks(path.read_text(encoding="utf-8"))
    for start, lines in blocks:
        joined, first = [], None
        for offset, line in enumerate(lines):
            first = start + offset if first is None else first
            if line.rstrip().endswith("\\"):
                joined.append(line.rstrip()[:-1])
                continue
            joined.append(line)
            commands += _commands_of(" ".join(joined), f"{path.name}:{first}")
            joined, first = [], None
        if joined:
            commands += _commands_of(" ".join(joined), f"{path.name}:{first}")
    return commands


def _commands_of(line, where):
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split, lexer.commenters = True, "#"
    segments, segment = [], []
    for token in lexer:
        if token in SEPARATORS:
            segments.append(segment)
            segment = []
        else:
            segment.append(token)
    segments.append(segment)
    found = []
    for tokens in segments:
        while tokens and ENV_ASSIGNMENT.match(tokens[0]):
            tokens = tokens[1:]
        if not tokens:
            continue
        program = Path(tokens[0]).name
        if program == "sdzoo":
            found.append((where, tokens[1:]))
        elif program.startswith("python") and tokens[1:3] == ["-m", "sdzoo"]:
            found.append((where, tokens[3:]))
        elif program.startswith("python") or program == "torchrun":
            for index, token in enumerate(tokens[1:], 1):
                script = SCRIPT.search(token)
                if script:
                    found.append((where, [f"?{script.group(1)}", *tokens[index + 1:]]))
                    break
    return found


def parse_problem(cli, where, argv):
    """Why the sdzoo parser refuses a shown command, or None when it parses."""
    if argv and argv[0].startswith("?"):
        name = argv[0][1:]
        if name not in cli.SCRIPTS:
            return f"{where}: scripts/{name} is not a wrapper of an sdzoo command (SCRIPTS: {sorted(cli.SCRIPTS)})"
        argv = [cli.SCRIPTS[name], *argv[1:]]
    parser = cli.build_parser()
    try:
        if argv and argv[0] in FORWARDS_UNKNOWN_FLAGS_TO:
            _, forwarded = parser.parse_known_args(argv)
            parser.parse_args([FORWARDS_UNKNOWN_FLAGS_TO[argv[0]], *forwarded])
        else:
            parser.parse_args(argv)
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            return f"{where}: `sdzoo {shlex.join(argv)}` does not parse (exit {exit_.code})"
    return None


@pytest.fixture(scope="module")
def cli():
    return importlib.import_module("sdzoo.cli")


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(path):
    assert link_problems(path) == []


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_commands_parse(path, cli, capsys):
    problems = [parse_problem(cli, where, argv) for where, argv in shown_commands(path)]
    problems = [p for p in problems if p]
    assert problems == [], "\n".join(problems) + "\n" + capsys.readouterr().err


def test_readme_shows_the_quick_start_and_the_main_job():
    commands = [argv for _, argv in shown_commands(ROOT / "README.md")]
    assert ["demo"] in commands
    assert ["train", "--model", "sd_resnet110_cifar", "--dataset", "cifar10", "--data-dir", "~/data",
            "--output", "runs/r110"] in commands
    assert ["?train.py", "--model", "sd_resnet110_cifar", "--dataset", "cifar10", "--data-dir", "~/data",
            "--output", "runs/r110"] in commands  # torchrun ... scripts/train.py
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 200


def test_command_extraction_reads_shell_syntax(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```bash\n"
                    "python3 -m venv .venv && .venv/bin/pip install -e . && OMP_NUM_THREADS=1 .venv/bin/sdzoo demo\n"
                    "python -m sdzoo export --model m \\\n    --output o.onnx   # a comment\n"
                    "torchrun --nproc_per_node 2 scripts/train.py --epochs 1; python -m pytest -q\n"
                    "```\n```python\nsdzoo train --not-shell\n```\n")
    assert [argv for _, argv in shown_commands(page)] == [
        ["demo"], ["export", "--model", "m", "--output", "o.onnx"], ["?train.py", "--epochs", "1"]]
    assert [where for where, _ in shown_commands(page)] == ["page.md:2", "page.md:3", "page.md:5"]


def test_a_broken_link_or_anchor_is_reported(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## The paper's main job: ResNet-110\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#the-papers-main-job-resnet-110) [gone](missing.md)\n"
                    "[bad anchor](other.md#nowhere) `[in code](missing.md)` [web](https://example.org/x.md)\n"
                    "```bash\ncat [in a block](missing.md)\n```\n")
    problems = link_problems(page)
    assert len(problems) == 2
    assert "page.md:1: link 'missing.md': missing.md does not exist" in problems[0]
    assert "page.md:2: link 'other.md#nowhere': other.md has no heading with anchor #nowhere" in problems[1]


def test_a_bad_flag_or_unknown_script_is_reported(tmp_path, cli):
    page = tmp_path / "page.md"
    page.write_text("```bash\nsdzoo train --epochs 1\nsdzoo train --no-such-flag 1\n"
                    "python scripts/no_such_script.py --x\n```\n")
    problems = [parse_problem(cli, where, argv) for where, argv in shown_commands(page)]
    assert problems[0] is None
    assert problems[1].startswith("page.md:3: `sdzoo train --no-such-flag 1` does not parse (exit 2)")
    assert problems[2].startswith("page.md:4: scripts/no_such_script.py is not a wrapper of an sdzoo command")
