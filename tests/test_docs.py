"""The docs check (issue 27): README.md and docs/*.md say what the code does, and cannot drift from it unnoticed.

(a) docs/params.md and docs/errors.md equal what scripts/make_docs_reference.py writes now (`make docs`);
(b) every command in a ```bash, ```sh or ```console block, or in inline code, that can be checked offline is:
    `make` targets and variables exist in the Makefile; `python <path>` scripts exist; `python -m <module>`, the
    scripts and the console scripts of pyproject.toml accept the options used (read from their --help); every
    `dvc exp run -S` sets a key params.yaml has, to a value the schema allows; `pip install name==version` pins
    what pyproject.toml pins. Every `section.key` of params.yaml named in code anywhere in the docs exists;
(c) every number the docs mark as the committed pipeline's, `0.9323<!-- reports/evaluate/metrics.json: accuracy -->`
    (the marker right after the number), is that file's value, rounded as shown;
(d) every relative link between the pages resolves, its #anchor included.

The last test plants a mistake of each kind and checks that the check finds it.
"""

import functools
import importlib.util
import itertools
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from image_classifier import params as params_module

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest brings tomli
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", ROOT / "data/images/README.md", *(ROOT / "docs").glob("*.md")])
PAGE_IDS = [str(page.relative_to(ROOT)) for page in PAGES]
SHELL_BLOCKS = {"bash", "sh", "shell", "console"}
SEPARATORS = {"&&", "||", ";", "|", "&"}
PLACEHOLDERS = ("...", "…", "$", "<", ">")  # a value the reader fills in: not checked against the schema


# --- Reading markdown --------------------------------------------------------------------------------------

FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`([^`\n]+)`")


def code_blocks(text: str) -> list[tuple[str, str, int]]:
    """(language, body, line of the opening fence) of every fenced block."""
    return [(m[1], m[2], text.count("\n", 0, m.start()) + 1) for m in FENCE.finditer(text)]


def without_blocks(text: str) -> str:
    """The text with its fenced blocks blanked (line count kept): where headings are."""
    return FENCE.sub(lambda m: "\n" * m[0].count("\n"), text)


def prose(text: str) -> str:
    """The text without fenced blocks and inline code: where links are."""
    return INLINE_CODE.sub("", without_blocks(text))


def code_text(text: str) -> str:
    """Everything in code: fenced blocks and inline spans."""
    return "\n".join([body for _, body, _ in code_blocks(text)] + INLINE_CODE.findall(without_blocks(text)))


def shell_commands(text: str) -> list[tuple[int, list[str]]]:
    """Each simple command of the shell blocks, as tokens, with its line: continuation lines joined, comments
    dropped, `a && b | c` split in three; a ```console block's commands are its `$ ` lines."""
    found = []
    for language, body, start in code_blocks(text):
        if language not in SHELL_BLOCKS:
            continue
        logical: list[tuple[int, str]] = []
        pending, pending_line = "", 0
        for number, line in enumerate(body.split("\n"), start=start + 1):
            if language == "console" and not pending:
                if not line.startswith("$ "):
                    continue  # output
                line = line.removeprefix("$ ")
            pending_line = pending_line if pending else number
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            logical.append((pending_line, pending + line))
            pending = ""
        for line_number, line in logical:
            try:
                tokens = shlex.split(line, comments=True)
            except ValueError as error:
                found.append((line_number, ["<unparseable>", str(error), line]))
                continue
            command: list[str] = []
            for token in [*tokens, ";"]:
                if token in SEPARATORS:
                    if command:
                        found.append((line_number, command))
                    command = []
                else:
                    command.append(token)
    return found


# --- What the project has ----------------------------------------------------------------------------------


@functools.cache
def makefile() -> tuple[set[str], set[str]]:
    """The Makefile's targets and variables."""
    text = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([A-Za-z0-9_.-]+):(?!=)", text, re.MULTILINE))
    variables = set(re.findall(r"^([A-Z_][A-Z0-9_]*)\s*[?:+]?=", text, re.MULTILINE))
    variables |= set(re.findall(r"\$\(([A-Z_][A-Z0-9_]*)\)", text))
    return targets, variables


@functools.cache
def params_yaml() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def param_keys() -> set[str]:
    return {f"{section}.{key}" for section, values in params_yaml().items() for key in values}


@functools.cache
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def pinned() -> dict[str, str]:
    """Every `name==version` pyproject.toml pins, dependencies and extras alike, by lower-case name."""
    project = pyproject()["project"]
    requirements = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        requirements += extra
    found = {}
    for requirement in requirements:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==(\S+)", requirement)
        if match:
            found[match[1].lower().replace("_", "-")] = match[3]
    return found


@functools.cache
def help_options(*command: str) -> frozenset[str]:
    """The options a command's --help lists (run in a subprocess: nothing else of it runs)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [*command, "--help"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert result.returncode == 0, f"{' '.join(command)} --help failed: {result.stderr[-2000:]}"
    return frozenset(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", result.stdout))


def console_script(name: str) -> tuple[str, ...]:
    """A [project.scripts] command as this checkout's Python runs it (installed or not)."""
    module, function = pyproject()["project"]["scripts"][name].split(":")
    code = f"import sys; sys.argv[0] = {name!r}; from {module} import {function}; {function}()"
    return (sys.executable, "-c", code)


# --- (b) Commands ------------------------------------------------------------------------------------------


def command_problems(tokens: list[str]) -> list[str]:
    """What is wrong with one documented command, as far as can be told without running it."""
    while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", tokens[0]):  # VAR=value command ...
        tokens = tokens[1:]
    if not tokens:
        return []
    name, args = tokens[0], tokens[1:]
    if name == "<unparseable>":
        return [f"cannot parse {args[1]!r}: {args[0]}"]
    if name == "make":
        return make_problems(args)
    if name in ("python", "python3"):
        return python_problems(args)
    if name in pyproject()["project"]["scripts"]:
        return option_problems(tokens, console_script(name))
    if name == "dvc" and args[:2] == ["exp", "run"]:
        return set_param_problems(args[2:])
    if name == "pip" and args[:1] == ["install"]:
        return pin_problems(args[1:])
    return []


def make_problems(args: list[str]) -> list[str]:
    targets, variables = makefile()
    problems = []
    for arg in args:
        if arg.startswith("-") or "<" in arg:  # an option, or a placeholder: make <target>
            continue
        variable = arg.partition("=")[0] if "=" in arg else None
        if variable is not None and variable not in variables:
            problems.append(f"make: the Makefile has no variable {variable}")
        elif variable is None and arg not in targets:
            problems.append(f"make: the Makefile has no target {arg!r}")
    return problems


def python_problems(args: list[str]) -> list[str]:
    if not args or args[0] == "-c" or "<" in args[0]:  # python -c '...', python stages/<stage>.py
        return []
    if args[0] == "-m":
        module = args[1]
        if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
            return [f"python -m {module}: no such module"]
        return option_problems(args[1:], (sys.executable, "-m", module))
    script = ROOT / args[0]
    if not script.is_file():
        return [f"python {args[0]}: no such file in the repository"]
    if "argparse" not in script.read_text():
        return []  # a stage: it takes no options, and --help would run it
    return option_problems(args, (sys.executable, str(script)))


def option_problems(tokens: list[str], command: tuple[str, ...]) -> list[str]:
    used = [token.partition("=")[0] for token in tokens[1:] if re.fullmatch(r"--[A-Za-z][\w-]*(=.*)?", token)]
    if not used:
        return []
    known = help_options(*command)
    return [
        f"{tokens[0]}: no option {option} (--help lists {sorted(known)})"
        for option in used
        if option not in known
    ]


def set_param_problems(args: list[str]) -> list[str]:
    """`-S key=value` (or --set-param): the key exists; a literal value passes the params schema."""
    problems, raw = [], yaml.safe_load((ROOT / "params.yaml").read_text())
    for flag, setting in itertools.pairwise(args):
        if flag not in ("-S", "--set-param"):
            continue
        key, _, value = setting.partition("=")
        if key not in param_keys():
            problems.append(f"dvc exp run -S {key}=...: params.yaml has no key {key}")
            continue
        if any(mark in value for mark in PLACEHOLDERS):
            continue
        section, name = key.split(".")
        for choice in value.split(",") if "[" not in value else [value]:  # a queued grid: a,b,c
            raw[section][name] = yaml.safe_load(choice)
            try:
                params_module.from_dict(raw, source=f"-S {key}={choice}")
            except params_module.ParamsError as error:
                problems.append(str(error))
    return problems


def pin_problems(args: list[str]) -> list[str]:
    problems, pins = [], pinned()
    for arg in args:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==(\S+)", arg)
        name = match[1].lower().replace("_", "-") if match else ""
        if name in pins and pins[name] != match[3]:
            problems.append(f"pip install {arg}: pyproject.toml pins {name}=={pins[name]}")
    return problems


INLINE_COMMAND = re.compile(r"^(make|predict|tune|python|dvc exp run|pip install)( |$)")


def inline_commands(text: str) -> list[tuple[int, list[str]]]:
    """Commands written in inline code in the text, `make tune TRIALS=20` or `dvc exp run -S train.lr=0.01`."""
    found = []
    stripped = without_blocks(text)
    for match in INLINE_CODE.finditer(stripped):
        if INLINE_COMMAND.match(match[1]):
            line = stripped.count("\n", 0, match.start()) + 1
            try:
                tokens = shlex.split(match[1])
            except ValueError as error:
                tokens = ["<unparseable>", str(error), match[1]]
            found.append((line, tokens))
    return found


def page_command_problems(text: str) -> list[str]:
    """The problems of the shell blocks' commands and of the commands written in inline code."""
    return [
        f"line {line}: {' '.join(tokens)}: {problem}"
        for line, tokens in shell_commands(text) + inline_commands(text)
        for problem in command_problems(tokens)
    ]


PARAM_KEY = re.compile(
    r"(?<![\w/.'-])(data|fetch|preprocess|train|evaluate|export|tracking)\.([a-z_]+)\b(?![./(\w])"
)
NOT_KEYS = {"py"}  # train.py, data.py: modules, not keys


def param_key_problems(text: str) -> list[str]:
    keys = param_keys()
    return sorted(
        {
            f"`{m[1]}.{m[2]}` is not a key of params.yaml"
            for m in PARAM_KEY.finditer(code_text(text))
            if m[2] not in NOT_KEYS and f"{m[1]}.{m[2]}" not in keys
        }
    )


# --- (c) The committed pipeline's numbers ------------------------------------------------------------------

MARKER = re.compile(r"(-?\d[\d.]*(?:e-?\d+)?)(?:\*\*)?<!-- (reports/[\w/.-]+\.json): ([\w.]+) -->")


def matches(shown: str, actual: float) -> bool:
    """`shown` is `actual` rounded as written: 0.9323, 66.1, 3.4e-6."""
    if "e" in shown:
        mantissa = shown.split("e")[0]
        digits = len(mantissa.partition(".")[2])
        return math.isclose(float(f"{actual:.{digits}e}"), float(shown), rel_tol=1e-9)
    digits = len(shown.partition(".")[2])
    return math.isclose(round(actual, digits), float(shown), rel_tol=1e-9, abs_tol=1e-12)


def report_versions(root: Path, file: str) -> list[dict]:
    """The report `file` as committed (HEAD) and as it is in the working tree, where each exists. The pages
    describe the committed run; a user's own `make repro` rewrites the working copy (its training time, and on
    another CPU type its accuracies), while a change that reruns the pipeline updates both before it commits."""
    texts = []
    committed = subprocess.run(
        ["git", "show", f"HEAD:{file}"], cwd=root, capture_output=True, text=True, check=False
    )
    if committed.returncode == 0:
        texts.append(committed.stdout)
    if (root / file).is_file():
        texts.append((root / file).read_text())
    return [yaml.safe_load(text) for text in texts]


def metric_problems(text: str, root: Path = ROOT) -> list[str]:
    problems = []
    for shown, file, key in MARKER.findall(text):
        versions = report_versions(root, file)
        if not versions:
            problems.append(f"{shown}: {file} does not exist")
            continue
        values = [version[key] for version in versions if key in version]
        if not values:
            problems.append(f"{shown}: {file} has no {key}")
        elif not any(matches(shown, float(value)) for value in values):
            problems.append(f"{shown} is not {file}'s {key}, {' or '.join(map(str, values))}")
    return problems


# --- (d) Links ---------------------------------------------------------------------------------------------

LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def anchors(text: str) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens, -1 for repeats."""
    found: set[str] = set()
    for heading in HEADING.findall(without_blocks(text)):
        plain = re.sub(r"[`*_]|<[^>]+>", "", heading.replace("_", "\0")).replace("\0", "_")
        slug = re.sub(r"[^\w\- ]", "", plain.lower()).replace(" ", "-")
        candidate, repeat = slug, 0
        while candidate in found:
            repeat += 1
            candidate = f"{slug}-{repeat}"
        found.add(candidate)
    return found


def link_problems(page: Path, text: str) -> list[str]:
    problems = []
    for target in LINK.findall(prose(text)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve()
        if path and not file.exists():
            problems.append(f"{target}: {path} does not exist")
            continue
        if not anchor or (path and file.suffix != ".md"):
            continue
        if anchor not in anchors(file.read_text() if path else text):
            problems.append(f"{target}: {file.name if path else page.name} has no heading #{anchor}")
    return problems


# --- The checks --------------------------------------------------------------------------------------------


@functools.cache
def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "make_docs_reference", ROOT / "scripts/make_docs_reference.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["docs/params.md", "docs/errors.md"])
def test_generated_pages_are_what_the_script_writes_now(name: str) -> None:
    written = (ROOT / name).read_text()
    assert written == generator().PAGES[name](), f"{name} is out of date: run make docs"


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_the_commands_in_code_blocks_exist(page: Path) -> None:
    assert page_command_problems(page.read_text()) == []


@pytest.mark.parametrize("page", [p for p in PAGES if p.name != "errors.md"], ids=lambda p: p.name)
def test_the_params_keys_named_in_code_exist(page: Path) -> None:
    """(errors.md is left out: its cases set unknown keys on purpose.)"""
    assert param_key_problems(page.read_text()) == []


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_the_committed_pipelines_numbers_match_its_reports(page: Path) -> None:
    assert metric_problems(page.read_text()) == []


def test_the_readme_headline_and_the_benchmarks_page_are_checked() -> None:
    """The README's headline test accuracy and the benchmarks page's committed run carry markers."""
    readme = {(file, key) for _, file, key in MARKER.findall((ROOT / "README.md").read_text())}
    assert ("reports/evaluate/metrics.json", "accuracy") in readme
    marked = {(file, key) for _, file, key in MARKER.findall((ROOT / "docs/benchmarks.md").read_text())}
    for file, key in [
        ("reports/evaluate/metrics.json", "accuracy"),
        ("reports/evaluate/metrics.json", "ece"),
        ("reports/train/metrics.json", "calibration.temperature"),
        ("reports/train/metrics.json", "train_seconds"),
        ("reports/export/metrics.json", "onnx_max_abs_logit_diff"),
    ]:
        assert (file, key) in marked, (file, key)


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_the_links_between_pages_resolve(page: Path) -> None:
    assert link_problems(page, page.read_text()) == []


def test_the_checks_find_planted_mistakes(tmp_path: Path) -> None:
    """Each check fails on a page with a mistake of its kind (so a passing check means something)."""
    bad_commands = "\n".join(
        [
            "```bash",
            "make no-such-target",
            "make tune NO_SUCH_VARIABLE=1",
            "python stages/no_such_stage.py",
            "python -m image_classifier.no_such_module",
            "predict --index 0 --no-such-option",
            "dvc exp run -S train.no_such_key=1",
            "dvc exp run -S train.lr=0",
            "pip install 'dvc[s3]==0.0.1'",
            "```",
        ]
    )
    problems = page_command_problems(bad_commands)
    for expected in [
        "no target 'no-such-target'",
        "no variable NO_SUCH_VARIABLE",
        "no_such_stage.py: no such file",
        "no_such_module: no such module",
        "no option --no-such-option",
        "no key train.no_such_key",
        "train.lr = 0 is out of range",
        "pins dvc==",
    ]:
        assert any(expected in problem for problem in problems), (expected, problems)
    assert page_command_problems("```text\nmake no-such-target\n```\n") == []  # not a shell block
    assert page_command_problems("Run `make no-such-target` or `make tune`.") == [
        "line 1: make no-such-target: make: the Makefile has no target 'no-such-target'"
    ]
    assert param_key_problems("Set `train.no_such_key: 1`, read `train.py`.") == [
        "`train.no_such_key` is not a key of params.yaml"
    ]

    (tmp_path / "reports").mkdir()
    (tmp_path / "reports/metrics.json").write_text('{"accuracy": 0.93231}')
    assert metric_problems("**0.9323**<!-- reports/metrics.json: accuracy -->", tmp_path) == []
    assert metric_problems("0.9324<!-- reports/metrics.json: accuracy -->", tmp_path)
    assert metric_problems("0.9323<!-- reports/metrics.json: ece -->", tmp_path)
    assert metric_problems("0.9323<!-- reports/other.json: accuracy -->", tmp_path)

    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other page\n\n## A section\n")
    assert link_problems(page, "[ok](other.md#a-section) [ok](#here)\n\n# Here\n") == []
    assert link_problems(page, "[gone](missing.md)") == ["missing.md: missing.md does not exist"]
    assert link_problems(page, "[no anchor](other.md#nowhere)") == [
        "other.md#nowhere: other.md has no heading #nowhere"
    ]


def test_the_generated_pages_check_sees_a_schema_change(monkeypatch: pytest.MonkeyPatch) -> None:
    """A key added to the schema without `make docs` makes docs/params.md stale."""
    from pydantic import Field, create_model

    extra = create_model(
        "ExtraParams", __base__=params_module._Section, new_key=(int, Field(1, description="new"))
    )
    changed = create_model(
        "Params", __base__=params_module.Params, extra=(extra, Field(default_factory=extra))
    )
    monkeypatch.setattr(params_module, "Params", changed)
    page = generator().params_page()
    assert "`extra.new_key`" in page
    assert page != (ROOT / "docs/params.md").read_text()


def test_the_committed_numbers_still_check_after_a_users_own_rerun(tmp_path: Path) -> None:
    """A user's `make repro` rewrites reports/ with their own training time: the pages describe the committed run,
    so its committed reports still check them; a number in neither version is still refused."""
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "reports").mkdir()
    report = tmp_path / "reports/metrics.json"
    report.write_text('{"train_seconds": 58.94}')
    subprocess.run([*git, "add", "reports"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "committed run"], check=True)
    report.write_text('{"train_seconds": 53.21}')  # the user's rerun
    assert metric_problems("58.9<!-- reports/metrics.json: train_seconds -->", tmp_path) == []
    assert metric_problems("53.2<!-- reports/metrics.json: train_seconds -->", tmp_path) == []
    assert metric_problems("61.0<!-- reports/metrics.json: train_seconds -->", tmp_path) == [
        "61.0 is not reports/metrics.json's train_seconds, 58.94 or 53.21"
    ]
