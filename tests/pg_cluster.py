"""A throwaway PostgreSQL cluster on a loopback port, for the store tests and the benches: Debian's
server binaries, run as the postgres user when we are root (initdb refuses root)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from pathlib import Path

from tests.live_server import free_port


class ClusterUnavailable(RuntimeError):
    """No cluster can be started here; the message says why and what to install."""


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def start_cluster(workdir: Path, *, fsync: bool = True) -> tuple[str, list[str]]:
    """Start a cluster with its data, socket and log in `workdir`; returns its base URL
    (postgresql+psycopg://postgres@127.0.0.1:PORT, no database) and the command that stops it.
    ``fsync=False`` trades durability for speed (tests)."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        raise ClusterUnavailable("PostgreSQL server binaries not found (Debian: apt-get install "
                                 "postgresql)")
    prefix: list[str] = []
    if os.geteuid() == 0:
        runuser = shutil.which("runuser")
        try:
            import pwd

            pw = pwd.getpwnam("postgres")
        except KeyError:
            raise ClusterUnavailable("running as root and no 'postgres' user to own a "
                                     "cluster") from None
        if not runuser:
            raise ClusterUnavailable("running as root without runuser to drop to the postgres "
                                     "user")
        os.chown(workdir, pw.pw_uid, pw.pw_gid)
        prefix = [runuser, "-u", "postgres", "--"]
    data, port = workdir / "data", free_port()
    subprocess.run([*prefix, initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E",
                    "UTF8", "--no-sync"], check=True, capture_output=True)
    opts = f"-p {port} -k {workdir} -c listen_addresses=127.0.0.1" + ("" if fsync else " -F")
    subprocess.run([*prefix, pg_ctl, "-D", str(data), "-o", opts, "-l", str(workdir / "log"),
                    "-w", "start"], check=True, capture_output=True)
    return (f"postgresql+psycopg://postgres@127.0.0.1:{port}",
            [*prefix, pg_ctl, "-D", str(data), "-m", "immediate", "stop"])
