"""Helpers of the fault suite (issue 6): run a command, read stderr as a terminal shows it, fingerprint outputs,
and print how many fault cases ran at the end of the pytest session."""

import contextlib
import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

# Where the stages write. A failed command must leave every file under these byte-identical, with no file added.
OUTPUT_ROOTS = ("data/raw", "data/processed", "models", "reports")
VENV_BIN = str(Path(sys.executable).parent)


def command_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment `make` gives commands: the venv first on PATH."""
    return {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", **(extra or {})}


def run_command(
    args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run a command, capturing stdout and stderr as bytes (so progress bars' carriage returns survive)."""
    return subprocess.run(args, cwd=cwd, capture_output=True, env=command_env(env), timeout=timeout)


def start_command(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a command in its own process group, as a shell starts a foreground job: signals go to all of it."""
    return subprocess.Popen(
        args,
        cwd=cwd,
        env=command_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=_default_ctrl_c,
    )


def _default_ctrl_c() -> None:
    # A shell gives a foreground job the default Ctrl-C. Without this, tests started in the background
    # (`pytest &`, `nohup`: SIGINT ignored, and inherited) would send a Ctrl-C that nothing can hear.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def signal_group(process: subprocess.Popen, signum: int) -> None:
    """Send `signum` to the command's whole process group (Ctrl-C, or a kill of the job)."""
    os.killpg(process.pid, signum)


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL whatever is left of a command started by `start_command`, children included."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def wait_for(condition: Callable[[], bool], process: subprocess.Popen, timeout: float, what: str) -> None:
    """Poll `condition` until it holds; fail with the command's output if it exits or time runs out first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            output = process.stdout.read().decode(errors="replace") if process.stdout else ""
            pytest.fail(f"command exited {process.returncode} before {what}:\n{output[-3000:]}")
        if time.monotonic() > deadline:
            kill_group(process)
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.02)


def visible_lines(stream: bytes) -> list[str]:
    """The non-blank lines a terminal ends up showing: a progress bar redraws its line with carriage returns
    and blanks it when done (tqdm's leave=False), so only what follows the last carriage return stays."""
    lines = (line.rsplit(b"\r", 1)[-1].decode(errors="replace").strip() for line in stream.split(b"\n"))
    return [line for line in lines if line]


def outputs_snapshot(repo: Path, skip: Iterable[str] = ()) -> dict[str, str]:
    """sha256 of every file under the output folders, by path; `skip` names inputs a case damages on purpose."""
    skipped = {str(Path(name)) for name in skip}
    snapshot = {}
    for root in OUTPUT_ROOTS:
        for path in sorted((repo / root).rglob("*")):
            name = str(path.relative_to(repo))
            if path.is_file() and name not in skipped:
                snapshot[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return snapshot


def assert_refused(
    repo: Path,
    args: list[str],
    patterns: Iterable[str],
    env: dict[str, str] | None = None,
    inputs: Iterable[str] = (),
) -> str:
    """The CLI contract for bad input: exit status 2, exactly one line on stderr, `error: ` and every pattern in
    it, and every earlier output byte-identical with nothing added. Returns the line."""
    inputs = list(inputs)
    before = outputs_snapshot(repo, inputs)
    assert before, "the case must start from existing outputs"
    result = run_command(args, repo, env)
    lines = visible_lines(result.stderr)
    shown = f"{' '.join(args)} exited {result.returncode}; stderr lines: {lines}"
    assert result.returncode == 2, shown
    assert len(lines) == 1 and lines[0].startswith("error: "), shown
    assert "Traceback" not in result.stdout.decode(errors="replace"), shown
    for pattern in patterns:
        assert re.search(pattern, lines[0]), f"{pattern!r} not found in {lines[0]!r}"
    assert outputs_snapshot(repo, inputs) == before, "earlier outputs changed"
    return lines[0]


def closed_port() -> int:
    """A local TCP port with nothing listening: connections to it are refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def state_dict_hash(path: Path) -> str:
    """sha256 over the names and bytes of a saved model's weights (models/model.pt holds config + state_dict)."""
    import torch

    state = torch.load(path, weights_only=True, map_location="cpu")["state_dict"]
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].contiguous().numpy().tobytes())
    return digest.hexdigest()


def history_without_timings(path: Path) -> list[list[str]]:
    """reports/train/history.csv without the columns that measure time (they differ between any two runs)."""
    rows = [line.split(",") for line in path.read_text().splitlines()]
    keep = [i for i, name in enumerate(rows[0]) if name not in ("epoch_seconds", "samples_per_second")]
    return [[row[i] for i in keep] for row in rows]


# The count of fault cases, printed at the end of the session: module file -> kind of fault.
FAULT_MODULES = {
    "test_faults.py": "bad input",
    "test_interruptions.py": "interruptions and reproducibility",
    "test_security.py": "security",
}


class _FaultCaseCount:
    def pytest_terminal_summary(self, terminalreporter) -> None:
        outcome: dict[str, str] = {}
        for key in ("passed", "skipped", "failed", "error"):  # later keys win: a failed teardown is an error
            for report in terminalreporter.stats.get(key, []):
                nodeid = getattr(report, "nodeid", "")
                if nodeid.split("::")[0].rsplit("/", 1)[-1] in FAULT_MODULES and (
                    key != "passed" or report.when == "call"
                ):
                    outcome[nodeid] = key
        if not outcome:
            return
        by_kind: dict[str, int] = {}
        for nodeid in outcome:
            kind = FAULT_MODULES[nodeid.split("::")[0].rsplit("/", 1)[-1]]
            by_kind[kind] = by_kind.get(kind, 0) + 1
        tally = {key: list(outcome.values()).count(key) for key in ("passed", "failed", "error", "skipped")}
        terminalreporter.write_sep(
            "=",
            f"fault suite: {len(outcome)} cases ("
            + ", ".join(f"{kind} {count}" for kind, count in by_kind.items())
            + "): "
            + ", ".join(f"{count} {key}" for key, count in tally.items() if count),
        )


def register_case_count(config: pytest.Config) -> None:
    """Print the fault-case count in the terminal summary (called by each fault module's autouse fixture)."""
    if not config.pluginmanager.has_plugin("fault-case-count"):
        config.pluginmanager.register(_FaultCaseCount(), "fault-case-count")


HOLD_HOOK = Path(__file__).resolve().parent / "hold"


def hold_env(marker: Path, checkpoint: str = "*", epoch: int = 1) -> dict[str, str]:
    """The environment that holds a training after its first checkpoint named like `checkpoint` (a glob) of epoch
    `epoch` or later, until a signal ends it or the test deletes `marker`, which appears when it holds
    (tests/hold/sitecustomize.py). Wait for the marker, then signal: no race with the training, however fast or
    slow the machine."""
    path = os.environ.get("PYTHONPATH")
    return {
        "PYTHONPATH": f"{HOLD_HOOK}{os.pathsep}{path}" if path else str(HOLD_HOOK),
        "HOLD_MARKER": str(marker),
        "HOLD_CHECKPOINT": checkpoint,
        "HOLD_EPOCH": str(epoch),
    }


def held_epoch(marker: Path) -> int:
    """The epoch of the checkpoint a training holds at."""
    return int(marker.read_text())
