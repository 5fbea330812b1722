"""A real PostgreSQL for tests, from Debian's `postgresql` package: initdb in a temporary folder, one server on a
free loopback port, stopped and deleted afterwards. PostgreSQL refuses to run as root, so as root it runs as
`nobody` (runuser), in a folder that user owns."""

import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg
import psycopg.sql

UNPRIVILEGED = "nobody"


def postgres_bin() -> Path | None:
    """The folder of Debian's PostgreSQL binaries (newest version), else wherever initdb is on PATH."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class Postgres:
    """One PostgreSQL server: `superuser_password` for role postgres; `create_database` adds a role and a db."""

    def __init__(self, port: int) -> None:
        self.port, self.bin = port, postgres_bin()
        assert self.bin is not None, "no PostgreSQL binaries (make setup-test installs postgresql)"
        # Not under pytest's tmp folder: it sits in root's private folder, which `nobody` cannot enter.
        self.folder = Path(tempfile.mkdtemp(prefix="pg-test-"))
        self.superuser_password = secrets.token_urlsafe(16)
        self.started = False

    def _as_owner(self, *args: str) -> list[str]:
        return ["runuser", "-u", UNPRIVILEGED, "--", *args] if os.geteuid() == 0 else list(args)

    def _run(self, *args: str) -> None:
        result = subprocess.run(self._as_owner(*args), capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}{result.stderr}"
            )

    def start(self) -> "Postgres":
        password_file = self.folder / "password"
        password_file.write_text(self.superuser_password + "\n")
        if os.geteuid() == 0:
            owner = pwd.getpwnam(UNPRIVILEGED)
            for path in (self.folder, password_file):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        self.folder.chmod(0o700)
        data = self.folder / "data"
        self._run(
            str(self.bin / "initdb"), "-D", str(data), "-U", "postgres", "--auth=scram-sha-256",
            f"--pwfile={password_file}", "-E", "UTF8", "--no-sync", "--no-instructions",
        )  # fmt: skip
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.folder} -c fsync=off"
        self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(self.folder / "log"),
            "-w",
            "-o",
            options,
            "start",
        )
        self.started = True
        return self

    def connect(self, database: str = "postgres", autocommit: bool = False) -> psycopg.Connection:
        return psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user="postgres",
            password=self.superuser_password,
            dbname=database,
            autocommit=autocommit,
        )

    def create_database(self, role: str, password: str, *databases: str) -> None:
        """A login role and databases it owns (CREATE DATABASE cannot run inside a transaction)."""
        sql = psycopg.sql
        with self.connect(autocommit=True) as connection:
            # Utility statements take no bind parameters: psycopg quotes the password as a literal.
            connection.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(role), sql.Literal(password)
                )
            )
            for database in databases:
                connection.execute(
                    sql.SQL("CREATE DATABASE {} OWNER {}").format(
                        sql.Identifier(database), sql.Identifier(role)
                    )
                )

    def query(self, database: str, sql: str) -> list[tuple]:
        with self.connect(database) as connection:
            return connection.execute(sql).fetchall()

    def stop(self) -> None:
        if self.started:
            data = str(self.folder / "data")
            subprocess.run(
                self._as_owner(str(self.bin / "pg_ctl"), "-D", data, "-m", "immediate", "-w", "stop"),
                capture_output=True,
                timeout=60,
            )
            self.started = False
        shutil.rmtree(self.folder, ignore_errors=True)

    def log_tail(self) -> str:
        try:
            return (self.folder / "log").read_text(errors="replace")[-3000:]
        except OSError:
            return ""
