"""docs/flags.md and the tools' parsers agree: every option of each tool's `build_parser()` is written in that
tool's section, every `--flag` written in a section is an option of that tool, every console script has a
section, and the GPTSAN column's original/new marks match the original command lines of the spec."""

import argparse
import importlib
import importlib.util
import re
import tomllib
from functools import cache
from pathlib import Path

import pytest

from tests.conftest import shared_path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "flags.md"

# Section key (the first word of its `## ` heading) -> the module, or the script, that defines build_parser().
TOOLS = {
    "gptsan-encode": "gptsan.data.encode",
    "gptsan-convert": "gptsan.convert.cli",
    "gptsan-train": "gptsan.train.cli",
    "gptsan-generate": "gptsan.generate.cli",
    "gptsan-languagemodel": "gptsan.generate.languagemodel",
    "gptsan-logits": "gptsan.logits_cli",
    "gptsan-tokenize": "gptsan.tokenize_cli",
    "gptsan-export": "gptsan.convert.export",
    "gptsan-plan": "gptsan.plan",
    "gptsan-demo": "gptsan.demo.run",
    "tools/train_tokenizer.py": "tools/train_tokenizer.py",
    "tools/inspect_tfrecord.py": "tools/inspect_tfrecord.py",
}
# The original's command lines (spec section 6), by the script each bullet starts with.
ORIGINAL_SCRIPTS = {
    "gptsan-encode": "tools/make_tfrecord_simple.py",
    "gptsan-convert": "run_modelconvert.py",
    "gptsan-train": "run_training.py",
    "gptsan-generate": "run_generate.py",
    "gptsan-languagemodel": "run_languagemodel.py",
}
FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")
HELP = {"-h", "--help"}


def build_parser(tool: str) -> argparse.ArgumentParser:
    target = TOOLS[tool]
    if target.endswith(".py"):
        spec = importlib.util.spec_from_file_location(Path(target).stem, ROOT / target)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    return module.build_parser()


@cache
def sections() -> dict[str, str]:
    """`## ` section of docs/flags.md by the first word of its heading -> its body (heading excluded)."""
    found: dict[str, list[str]] = {}
    current = None
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            current = line[3:].split()[0]
            found[current] = []
        elif current is not None:
            found[current].append(line)
    return {key: "\n".join(lines) for key, lines in found.items()}


def section(tool: str) -> str:
    assert tool in sections(), f"{tool}: docs/flags.md has no section '## {tool} ...'"
    return sections()[tool]


def options(parser: argparse.ArgumentParser) -> list[str]:
    return [opt for action in parser._actions for opt in action.option_strings if opt not in HELP]


def written(text: str, option: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text) is not None


def table_rows(text: str) -> dict[str, list[str]]:
    """The cells of each table row whose first cell names a flag, by that flag."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| `--"):
            cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
            rows[FLAG.search(cells[0]).group()] = cells
    return rows


@pytest.mark.parametrize("tool", list(TOOLS))
def test_every_option_is_documented(tool):
    parser, text = build_parser(tool), section(tool)
    missing = [opt for opt in options(parser) if not written(text, opt)]
    assert not missing, f"{tool}: {', '.join(missing)} in build_parser() but not in its docs/flags.md section"
    positionals = [a.dest for a in parser._actions if not a.option_strings and f"`{a.dest}`" not in text]
    assert not positionals, f"{tool}: positional {', '.join(positionals)} not in its docs/flags.md section"
    undescribed = [opt for opt in options(parser) if opt.startswith("--") and opt not in table_rows(text)]
    assert not undescribed, f"{tool}: {', '.join(undescribed)} has no table row in docs/flags.md"


@pytest.mark.parametrize("tool", list(TOOLS))
def test_every_documented_flag_exists(tool):
    known = set(options(build_parser(tool))) | HELP
    unknown = sorted({flag for flag in FLAG.findall(section(tool)) if flag not in known})
    assert not unknown, f"{tool}: docs/flags.md names {', '.join(unknown)}, which build_parser() does not define"


@pytest.mark.parametrize("tool", list(TOOLS))
def test_help_description_is_whole_sentences(tool):
    """--help's description is not cut off mid-sentence (as the first line of a two-line sentence was)."""
    description = (build_parser(tool).description or "").strip()
    assert description.endswith((".", "。", ")")), f"{tool}: --help description ends mid-sentence: {description!r}"


def test_every_console_script_has_a_section():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    missing = sorted(set(scripts) - set(TOOLS))
    assert not missing, f"console scripts without a docs/flags.md section (add them to TOOLS): {missing}"
    for script, entry in scripts.items():
        assert entry == f"{TOOLS[script]}:main", f"{script}: runs {entry}, but TOOLS says {TOOLS[script]}"


@cache
def original_flags() -> dict[str, set[str]]:
    """The flags of each original command line, from the spec's section 6 bullets."""
    text = shared_path("spec", "GPTSAN.md").read_text(encoding="utf-8")
    part = text.split("## 6.", 1)[1].split("\n## ", 1)[0]
    bullets = [bullet.strip() for bullet in part.split("\n- ")]
    flags = {}
    for tool, script in ORIGINAL_SCRIPTS.items():
        (bullet,) = [b for b in bullets if b.lstrip("- ").startswith(f"`{script}")]
        flags[tool] = set(FLAG.findall(bullet))
    return flags


@pytest.mark.parametrize("tool", list(ORIGINAL_SCRIPTS))
def test_gptsan_column_matches_the_spec(tool):
    spec_flags = original_flags()[tool]
    gone = sorted(spec_flags - set(options(build_parser(tool))))
    assert not gone, f"{tool}: original flags {', '.join(gone)} are missing from build_parser()"
    for flag, cells in table_rows(section(tool)).items():
        mark = cells[-1]
        assert mark in ("original", "changed", "new"), f"{tool}: {flag} has GPTSAN column {mark!r}"
        assert (mark != "new") == (flag in spec_flags), (
            f"{tool}: {flag} is marked {mark!r} in docs/flags.md, but the spec's original command line "
            f"{'has' if flag in spec_flags else 'lacks'} it")


# The pages whose examples run the tools (docs/flags.md is checked section by section above).
EXAMPLE_PAGES = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "flags.md")]
CODE = re.compile(r"```[^\n]*\n(.*?)```|`([^`\n]+)`", re.S)


def command_lines(text: str) -> list[str]:
    """Each command written in a code block or an inline code span, continuation lines joined."""
    lines = []
    for block, span in CODE.findall(text):
        code = re.sub(r"\\\n\s*", " ", block or span)
        lines += [part.strip() for line in code.splitlines() for part in re.split(r"&&|;| \| ", line)]
    return lines


def invoked_tool(command: str) -> tuple[str, list[str]] | None:
    """The tool a command runs (a console script or one of the scripts) and the words after its name."""
    by_script = {script: tool for tool, script in ORIGINAL_SCRIPTS.items()}
    words = command.split()
    for i, word in enumerate(words):
        tool = word if word in TOOLS else by_script.get(word)
        if tool is not None:
            return tool, words[i + 1:]
    return None


@pytest.mark.parametrize("page", EXAMPLE_PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_example_commands_use_real_flags(page):
    """Every `--flag` of a tool's command line in the README and docs/ is an option of that tool."""
    checked, unknown = 0, []
    for command in command_lines(page.read_text(encoding="utf-8")):
        found = invoked_tool(command)
        if found is None:
            continue
        tool, words = found
        checked += 1
        known = set(options(build_parser(tool))) | HELP
        unknown += [f"{tool} {flag}" for flag in FLAG.findall(" ".join(words)) if flag not in known]
    assert not unknown, f"{page.name}: example commands use flags their tools do not define: {unknown}"
    if page.name == "README.md":
        assert checked >= 10, f"README.md: only {checked} tool command lines found; is the parser still right?"


@pytest.mark.parametrize("tool", [tool for tool in TOOLS if "--seed" in options(build_parser(tool))])
def test_every_seed_flag_takes_0_to_2_to_the_32_minus_1_and_refuses_the_rest_in_one_line(tool, capsys):
    """A negative seed ended in numpy's traceback (convert, encode) and 2**32 in an OverflowError (generate),
    each after the model or the corpus had been read."""
    parser = build_parser(tool)
    [seed] = [action for action in parser._actions if "--seed" in action.option_strings]
    assert seed.type("0") == 0 and seed.type(str(2**32 - 1)) == 2**32 - 1
    for bad in ("-1", str(2**32), "1.5", "x"):
        with pytest.raises(SystemExit) as exited:
            parser.parse_known_args(["--seed", bad])
        assert exited.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1].endswith(
            f"error: argument --seed: expected an integer from 0 to 4294967295, got {bad!r}")
