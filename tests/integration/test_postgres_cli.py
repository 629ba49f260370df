"""The real CLI over PostgreSQL (STOCKADE_DATABASE_URL): it works, its failures are short
errors with a hint and exit 4, and the embedded path never loads psycopg."""

from __future__ import annotations

import textwrap
from pathlib import Path

from tests.conftest import STOCKADE, run_cli
from tests.support.postgres import PostgresServer


def test_jobs_over_postgresql(tmp_path: Path, database_url: str) -> None:
    done = run_cli(tmp_path / "home", "jobs", STOCKADE_DATABASE_URL=database_url)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "home" / "stockade.db").exists()  # the URL's database, not a file
    again = run_cli(tmp_path / "home", "jobs", "--json",
                    STOCKADE_DATABASE_URL=database_url.replace("postgresql://",
                                                               "postgresql+psycopg://"))
    assert again.returncode == 0 and again.stdout.strip() == "[]", again.stderr


def test_an_unreachable_server_is_exit_4_with_a_hint(tmp_path: Path) -> None:
    done = run_cli(tmp_path / "home", "jobs", STOCKADE_DATABASE_URL="postgresql://127.0.0.1:1/x")
    assert done.returncode == 4, done.stderr
    assert "cannot reach the PostgreSQL server of postgresql://127.0.0.1:1/x" in done.stderr
    assert "hint: start the server" in done.stderr and "Traceback" not in done.stderr


def test_a_wrong_password_is_exit_4_and_never_shown(tmp_path: Path,
                                                    postgres_server: PostgresServer) -> None:
    done = run_cli(tmp_path / "home", "jobs",
                   STOCKADE_DATABASE_URL=postgres_server.url(password="not-the-password"))
    assert done.returncode == 4, done.stderr
    assert "refused the credentials" in done.stderr and "hint:" in done.stderr
    assert "not-the-password" not in done.stderr and "Traceback" not in done.stderr


def test_another_scheme_is_a_usage_error(tmp_path: Path) -> None:
    done = run_cli(tmp_path / "home", "jobs", STOCKADE_DATABASE_URL="mysql://u:pw@db/x")
    assert done.returncode == 2, done.stderr
    assert "not 'mysql'" in done.stderr and "postgresql://" in done.stderr
    assert "pw@" not in done.stderr


def test_the_embedded_store_never_imports_psycopg(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert run_cli(home, "jobs").returncode == 0  # migrated: the next start is the lean one
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(textwrap.dedent("""
        import sys

        class Tell:
            def find_spec(self, name, path=None, target=None):
                if name.partition(".")[0] in ("psycopg", "psycopg_pool", "sqlalchemy"):
                    with open(sys.argv[0] + ".imported-db-drivers", "a") as f:
                        f.write(name + "\\n")

        sys.meta_path.insert(0, Tell())
    """))
    marker = Path(STOCKADE + ".imported-db-drivers")
    marker.unlink(missing_ok=True)
    done = run_cli(home, "jobs", PYTHONPATH=str(tmp_path / "inject"))
    assert done.returncode == 0, done.stderr
    assert not marker.exists(), marker.read_text()
