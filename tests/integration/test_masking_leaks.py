"""Masking and leak scanning end to end: a real job prints and packs its secret in many ways.

The job runs in the real sandbox through the CLI; what it prints is checked in the stored log
and on stderr, what it packs (tar.gz, zip, gzip of gzip, ...) in the job's result and in the
artifact store.
"""

from __future__ import annotations

import base64
import html
import json
import os
import subprocess
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.conftest import STOCKADE, JobRun, cli_env, run_cli

# a value whose encodings all differ from it: "," for printf %q, "<>&'\"" for XML and SQL,
# "/" for urllib's default quoting
VALUE = "tok,en/<x>&'y\"-" + os.urandom(8).hex()

SPEC = """name: masking-leaks
secrets: [TOKEN]
artifacts: ["out/**"]
steps:
  - name: print
    run: |
{script}
"""


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    proc = subprocess.run([STOCKADE, "secret", "set", "TOKEN"], input=VALUE, text=True,
                          capture_output=True, env=cli_env(h))
    assert proc.returncode == 0, proc.stderr
    return h


def job(home: Path, tmp_path: Path, script: str) -> JobRun:
    spec = tmp_path / "job.yaml"
    spec.write_text(SPEC.format(script="\n".join("      " + line
                                                   for line in script.splitlines())))
    ws = tmp_path / "ws"
    ws.mkdir(exist_ok=True)
    proc = run_cli(home, "run", str(spec), "--workspace", str(ws), "--json")
    return JobRun(proc.returncode, json.loads(proc.stdout.splitlines()[-1]), proc.stdout,
                  proc.stderr, home)


PRINT = r"""printf 'q: %q\n' "$TOKEN"
python3 - <<'EOF'
import base64, html, os, urllib.parse
from xml.sax.saxutils import escape
t = os.environ["TOKEN"]
print("xml:", escape(t, {'"': "&quot;", "'": "&apos;"}))
print("html:", html.escape(t))
print("sql:", "'" + t.replace("'", "''") + "'")
print("url:", urllib.parse.quote(t))
for k in range(3):
    for enc in (base64.b64encode, base64.urlsafe_b64encode):
        print("b64:", enc(os.urandom(k) + t.encode() + os.urandom(5)).decode())
EOF
"""


def cores(value: bytes) -> list[bytes]:
    """The base64 characters made only of the value's bits, at each offset and alphabet."""
    out = []
    for k in range(3):
        for enc in (base64.b64encode, base64.urlsafe_b64encode):
            text = enc(b"\0" * k + value)
            out.append(text[-(-8 * k // 6):8 * (k + len(value)) // 6])
    return out


def test_every_printed_spelling_is_masked(home: Path, tmp_path: Path) -> None:
    run = job(home, tmp_path, PRINT)
    assert run.rc == 0, run.stderr
    shell_q = subprocess.run(["bash", "-c", 'printf %q "$1"', "-", VALUE], capture_output=True,
                             text=True, env={"LC_ALL": "C.UTF-8"}).stdout
    spellings = [VALUE, shell_q, html.escape(VALUE), quote(VALUE), VALUE.replace("'", "''"),
                 VALUE.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")]
    output = run.output("print")
    for text in (run.log, run.stderr):
        for spelling in spellings:
            assert spelling not in text
        for core in cores(VALUE.encode()):
            assert not any(core[i:i + 8].decode() in text for i in range(len(core) - 8))
    lines = output.splitlines()
    assert len(lines) == 11 and all("***" in line for line in lines), output


def test_secrets_packed_in_archives_are_found(home: Path, tmp_path: Path) -> None:
    run = job(home, tmp_path, r"""mkdir -p out pack; echo fine > out/ok.txt
printf 'header\n%s\nfooter\n' "$TOKEN" > pack/config.txt
tar czf out/pack.tar.gz pack
gzip -c pack/config.txt | gzip -c > out/twice.gz
python3 - <<'EOF'
import io, tarfile, zipfile
inner = io.BytesIO()
with tarfile.open(fileobj=inner, mode="w") as t:
    t.add("pack/config.txt")
with zipfile.ZipFile("out/nested.zip", "w", zipfile.ZIP_DEFLATED) as z:
    z.writestr("inner.tar", inner.getvalue())
    z.write("pack/config.txt", "config.txt")
EOF
""")
    assert run.rc == 1
    assert run.result["failure_reason"] == "secret_leak"
    assert [a["path"] for a in run.result["artifacts"]] == ["out/ok.txt"]
    leaks = {leak["where"]: leak["secrets"] for leak in run.result["secret_leaks"]}
    assert leaks == {f"artifact out/{name}": ["TOKEN"]
                     for name in ("pack.tar.gz", "twice.gz", "nested.zip")}
    stored = run.home / "artifacts" / run.result["job_id"] / "out"
    assert sorted(p.name for p in stored.iterdir()) == ["ok.txt"]


def test_an_archive_that_cannot_be_scanned_is_withheld(home: Path, tmp_path: Path) -> None:
    run = job(home, tmp_path, r"""mkdir -p out
python3 - <<'EOF'
import os, struct, zipfile
with zipfile.ZipFile("out/locked.zip", "w") as z:
    z.writestr("a.txt", os.environ["TOKEN"][::-1])
data = bytearray(open("out/locked.zip", "rb").read())
for sig, at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
    i = data.find(sig)
    struct.pack_into("<H", data, i + at, struct.unpack_from("<H", data, i + at)[0] | 1)
open("out/locked.zip", "wb").write(data)
EOF
""")
    assert "out/locked.zip" not in [a["path"] for a in run.result["artifacts"]]
    assert any(r.startswith("out/locked.zip: ") and "encrypted" in r
               for r in run.result["artifacts_refused"]), run.result
    assert not (run.home / "artifacts" / run.result["job_id"] / "out" / "locked.zip").exists()
