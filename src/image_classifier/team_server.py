"""The team's MLflow server: what `make team-server` runs, and what the tests run.

A database for runs and the registry (PostgreSQL for a team, SQLite on one machine), artifacts proxied through
the server to object storage (`s3://...`, S3-compatible too) or a folder, so teammates need no storage
credentials. It listens on 127.0.0.1. Opened to the network (any other --host) it requires --login: MLflow's
basic-auth app, with an admin password the operator sets (MLflow ships none) and no permission for anyone on
anything until the admin grants it, per experiment and per registered model.

Secrets never appear on the command line, where `ps` and `make` would show them: the admin password comes from
MLFLOW_AUTH_ADMIN_PASSWORD, the database password from PGPASSWORD or ~/.pgpass, the S3 keys from the AWS_*
variables or ~/.aws.

    python -m image_classifier.team_server --backend-store-uri URI --artifacts-destination DEST [--login] ...
"""

import argparse
import os
import secrets
import sys
import urllib.parse
from collections.abc import Mapping
from pathlib import Path

from image_classifier.errors import UserError, run_cli

ADMIN_PASSWORD = "MLFLOW_AUTH_ADMIN_PASSWORD"
SECRET_KEY = "MLFLOW_FLASK_SERVER_SECRET_KEY"
MIN_PASSWORD_LENGTH = 12
LOOPBACK = ("127.0.0.1", "localhost", "::1")
# The backend stores MLflow's server takes; `mlflow server` itself names the rest.
DATABASES = ("sqlite", "postgresql", "mysql", "mssql")
# Nobody sees anything they were not granted: the admin grants READ, EDIT or MANAGE per experiment and per
# registered model. Whoever creates an experiment or a registered model gets MANAGE on it.
DEFAULT_PERMISSION = "NO_PERMISSIONS"
AUTH_CACHE_SECONDS = 60


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="team-server", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backend-store-uri", required=True, help="postgresql://user@host/db or sqlite:////abs"
    )
    parser.add_argument("--artifacts-destination", required=True, help="s3://bucket/prefix or a folder")
    parser.add_argument(
        "--host", default="127.0.0.1", help="127.0.0.1 (default); anything else needs --login"
    )
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--allowed-hosts", default="", help="names[:port] clients reach the server by")
    parser.add_argument("--login", action="store_true", help="basic-auth: users, passwords, permissions")
    parser.add_argument("--auth-db", default="", help="the users' database (default: SQLite in --folder)")
    parser.add_argument(
        "--folder", type=Path, default=Path.home() / "mlflow-team", help="the server's own files"
    )
    return parser.parse_args(argv)


def _scheme(uri: str) -> str:
    return urllib.parse.urlsplit(uri).scheme.split("+")[0]


def check_database(uri: str, what: str) -> None:
    """A database URI MLflow's server can use, without a password in it (it would show in `ps`)."""
    if _scheme(uri) not in DATABASES:
        raise UserError(
            f"{what} {uri!r}: write postgresql://user@host:port/db (or sqlite:////absolute/path.db)"
        )
    if _scheme(uri) == "sqlite" and not uri.startswith("sqlite:////"):
        raise UserError(f"{what} {uri!r}: a SQLite path must be absolute (sqlite:////srv/mlflow/mlflow.db)")
    if urllib.parse.urlsplit(uri).password is not None:
        raise UserError(
            f"{what} holds a password, which process lists would show: remove it from the URI and set "
            "PGPASSWORD (or ~/.pgpass) instead"
        )


def check(args: argparse.Namespace, env: Mapping[str, str]) -> None:
    """Refuse a server open to the network without a login, and a login without a real admin password."""
    check_database(args.backend_store_uri, "--backend-store-uri")
    if args.auth_db:
        check_database(args.auth_db, "--auth-db")
    if args.host not in LOOPBACK and not args.login:
        raise UserError(
            f"--host {args.host} opens the server to the network: add --login (make team-server TEAM_LOGIN=1) "
            "so that nobody gets in uninvited"
        )
    if not args.login:
        return
    password = env.get(ADMIN_PASSWORD, "")
    if len(password) < MIN_PASSWORD_LENGTH:
        state = "is not set" if not password else f"has {len(password)} characters"
        raise UserError(
            f"--login: {ADMIN_PASSWORD} {state}; set the admin's password there, at least "
            f"{MIN_PASSWORD_LENGTH} characters (used once, to create the admin user)"
        )


def auth_config(folder: Path, auth_db: str) -> Path:
    """The basic-auth app's settings file. It holds no secret: the admin password stays in the environment."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "basic_auth.ini"
    database = auth_db or f"sqlite:///{(folder / 'auth.db').resolve()}"
    path.write_text(
        "[mlflow]\n"
        f"default_permission = {DEFAULT_PERMISSION}\n"
        f"database_uri = {database.replace('%', '%%')}\n"
        "admin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # Checking a password costs a PBKDF2 hash: without the cache every request of a run pays it (a small
        # training's requests took three times as long). One worker: a password change takes effect at once.
        f"auth_cache_ttl_seconds = {AUTH_CACHE_SECONDS}\n"
    )
    return path


def flask_secret_key(folder: Path) -> str:
    """The key the login form's CSRF protection signs with: generated once, kept readable by the server alone."""
    path = folder / "flask-secret-key"
    if not path.is_file():
        path.touch(mode=0o600)
        path.write_text(secrets.token_hex(32))
    return path.read_text().strip()


def server_command(args: argparse.Namespace) -> list[str]:
    command = ["mlflow", "server", "--host", args.host, "--port", str(args.port), "--workers", "1"]
    command += [
        "--backend-store-uri",
        args.backend_store_uri,
        "--artifacts-destination",
        args.artifacts_destination,
    ]
    if args.allowed_hosts:
        command += ["--allowed-hosts", args.allowed_hosts]
    if args.login:
        command += ["--app-name", "basic-auth"]
    return command


def server_env(args: argparse.Namespace, env: Mapping[str, str]) -> dict[str, str]:
    # One worker and no job runners: about 0.5 GB instead of 2 GB; the pipeline needs neither.
    wanted = {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    if args.login:
        wanted["MLFLOW_AUTH_CONFIG_PATH"] = str(auth_config(args.folder, args.auth_db))
        wanted.setdefault(SECRET_KEY, flask_secret_key(args.folder))
    return wanted


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    check(args, os.environ)
    if "://" not in args.artifacts_destination:  # a folder: the server writes into it, so it must exist
        Path(args.artifacts_destination).mkdir(parents=True, exist_ok=True)
    command = server_command(args)
    env = server_env(args, os.environ)
    login = f", login required (users in {args.auth_db or args.folder / 'auth.db'})" if args.login else ""
    print(f"team server on http://{args.host}:{args.port}{login}: {' '.join(command)}", flush=True)
    os.execvpe(command[0], command, env)


if __name__ == "__main__":
    run_cli(main)
