"""The fault suite, security (issue 6): nothing is unpickled from a file the user did not write, YAML is read
safely, archives are never extracted without a path filter, no credential is committed, and the servers the
project's commands start listen on 127.0.0.1 unless the user asks otherwise.

Each scanner is also run on a planted bad example, so a scanner that stopped finding anything would fail.
"""

import ast
import re
import subprocess
from pathlib import Path

import pytest
from conftest import REPO
from fault_helpers import register_case_count

CODE_DIRS = ("src", "stages", "scripts", "benchmarks")


@pytest.fixture(scope="module", autouse=True)
def _count_cases(request: pytest.FixtureRequest) -> None:
    register_case_count(request.config)


def python_files() -> list[Path]:
    return sorted(path for folder in CODE_DIRS for path in (REPO / folder).rglob("*.py"))


def repository_files() -> list[str]:
    """Every file git tracks, plus new files not ignored (they are one `git add` away from a commit)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    return [name for name in listed if (REPO / name).is_file()]


def dotted(node: ast.AST) -> str:
    """`torch.load` for the call target torch.load, '' for anything that is not a plain dotted name."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((kw.value for kw in call.keywords if kw.arg == name), None)


UNSAFE_LOADERS = {
    "pickle.load",
    "pickle.loads",
    "cPickle.load",
    "dill.load",
    "joblib.load",
    "yaml.load",
    "yaml.load_all",
    "yaml.full_load",
    "yaml.full_load_all",
    "yaml.unsafe_load",
    "yaml.unsafe_load_all",
    "shutil.unpack_archive",
}


def unsafe_loads(source: str, filename: str = "<code>") -> tuple[list[str], int]:
    """Calls that could run code from a file, and how many safe loads (torch.load with weights_only=True,
    yaml.safe_load) were seen."""
    problems, safe = [], 0
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call):
            continue
        name, where = dotted(node.func), f"{filename}:{node.lineno}"
        if name == "torch.load":
            flag = keyword(node, "weights_only")
            if isinstance(flag, ast.Constant) and flag.value is True:
                safe += 1
            else:
                problems.append(f"{where}: torch.load without weights_only=True")
        elif name == "yaml.safe_load":
            safe += 1
        elif name in UNSAFE_LOADERS:
            problems.append(f"{where}: {name}")
        elif (
            isinstance(node.func, ast.Attribute)
            and node.func.attr in ("extractall", "extract")
            and keyword(node, "filter") is None
        ):
            problems.append(f"{where}: {node.func.attr} without filter= (paths outside the target)")
        elif name.endswith("numpy.load") or name == "np.load":
            flag = keyword(node, "allow_pickle")
            if isinstance(flag, ast.Constant) and flag.value is True:
                problems.append(f"{where}: {name} with allow_pickle=True")
    return problems, safe


def test_every_load_is_safe() -> None:
    problems, safe = [], 0
    for path in python_files():
        found, count = unsafe_loads(path.read_text(), str(path.relative_to(REPO)))
        problems += found
        safe += count
    assert not problems
    assert safe >= 4, "the scan found the project's own torch.load and yaml.safe_load calls"


def test_the_load_scanner_finds_unsafe_loads() -> None:
    planted = """
import pickle, tarfile, torch, yaml
torch.load(path)
torch.load(path, weights_only=False)
yaml.load(text, Loader=yaml.Loader)
pickle.loads(data)
tarfile.open(path).extractall(target)
"""
    problems, safe = unsafe_loads(planted)
    assert len(problems) == 5 and safe == 0, problems
    assert unsafe_loads("torch.load(p, weights_only=True)\ntar.extractall(d, filter='data')") == ([], 1)


# Built from pieces so this file does not match itself.
CREDENTIALS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret access key": re.compile(
        r"(?i)secret_access_key\s*[=:]?\s*[\"']?[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+])"
    ),
    "private key": re.compile("-----BEGIN ([A-Z]+ )*" + "PRIVATE KEY-----"),
    "password in a URL": re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s:@'\"$]+:[^/\s@'\"${]+@"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36}\b"),
}


def credentials_in(text: str) -> list[str]:
    return [name for name, pattern in CREDENTIALS.items() if pattern.search(text)]


def test_no_credentials_in_tracked_files() -> None:
    files = repository_files()
    assert "dvc.yaml" in files and "params.yaml" in files
    found = {}
    for name in files:
        try:
            text = (REPO / name).read_text()
        except UnicodeDecodeError:
            continue  # binary
        if hits := credentials_in(text):
            found[name] = hits
    assert not found


def test_the_credential_scanner_finds_planted_credentials() -> None:
    planted = [
        "key = " + "AKIA" + "IOSFODNN7EXAMPLE",
        "aws_secret_access_key = " + "wJalrXUtnFEMI/K7MDENG/bPxRfiCY" + "EXAMPLEKEY",
        "-----BEGIN OPENSSH " + "PRIVATE KEY-----",
        "-----BEGIN " + "PRIVATE KEY-----",
        "url = https://alice:" + "hunter2@minio.example.com/bucket",
        "token: ghp_" + "a" * 36,
    ]
    assert [len(credentials_in(line)) for line in planted] == [1] * len(planted)
    harmless = "https://github.com/zalandoresearch/fashion-mnist, s3://bucket/path, ${USER}:${PASS}@host"
    assert credentials_in(harmless) == []


def test_credentials_files_are_ignored_by_git() -> None:
    for name in (".dvc/config.local", ".env"):
        ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", name], cwd=REPO)
        assert ignored.returncode == 0, f"{name} is not in .gitignore"
    assert ".dvc/config.local" not in repository_files()
    # Remote credentials belong in .dvc/config.local (dvc remote modify --local): never in the shared config.
    config = (REPO / ".dvc/config").read_text()
    assert not re.search(
        r"(?im)^\s*(access_key_id|secret_access_key|session_token|password|token)\s*=", config
    )


SERVER = re.compile(r"\b(mlflow (server|ui|models serve)|uvicorn|gunicorn|http\.server|flask run)\b")


def test_servers_started_by_make_listen_on_localhost() -> None:
    makefile = (REPO / "Makefile").read_text()
    # `make -n` prints commands without running them, except lines with $(MAKE) or a leading '+'.
    assert "$(MAKE)" not in makefile and not re.search(r"(?m)^\t\+", makefile)
    targets = re.findall(r"(?m)^([a-z][a-z0-9-]*):", makefile)
    servers = []
    for target in targets:
        dry = subprocess.run(
            ["make", "-n", target], cwd=REPO, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}
        )
        for command in dry.stdout.replace("\\\n", " ").splitlines():
            if SERVER.search(command):
                servers.append(command)
                assert re.search(r"--host[ =]127\.0\.0\.1\b", command), f"make {target}: {command}"
    assert len(servers) >= 2, "found the MLflow UI and model server commands"
