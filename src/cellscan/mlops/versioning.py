"""Data versions with DVC: snapshot ``data/`` into ``data.dvc``, push to the remote, restore.

The data version of a model is the md5 of the ``data`` directory as ``data.dvc`` records it.
DVC runs as a subprocess (the ``dvc`` next to this Python), always inside the project folder.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from cellscan.core.config import Params
from cellscan.errors import VersioningError

logger = logging.getLogger(__name__)



def _exe(name: str) -> str:
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        msg = f"{name} not found; expected it next to {sys.executable} or on PATH"
        raise VersioningError(msg)
    return found


def _run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"DVC_NO_ANALYTICS": "1"}
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if check and res.returncode != 0:
        raise _failed(res, cwd)
    return res


def _failed(res: subprocess.CompletedProcess[str], cwd: Path) -> VersioningError:
    """The error for a command that failed: the command, the folder and DVC's ERROR lines (no warnings)."""
    said = (res.stderr or res.stdout).strip()
    errors = [line for line in said.splitlines() if line.startswith("ERROR")]
    reason = "; ".join(errors) or said or f"exit code {res.returncode}"
    cmd = [str(a) for a in res.args]
    shown = " ".join([Path(cmd[0]).name, *cmd[1:]])[:200]
    return VersioningError(f"`{shown}` failed in {cwd}: {reason[-800:]}")


def dvc(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run([_exe("dvc"), *args], cwd, check)


def init_repo(project: Path, remote: Path | None = None) -> None:
    """Make ``project`` a git + DVC repository with a local default remote (idempotent)."""
    project = project.resolve()
    if not (project / ".git").exists():
        _run(["git", "init", "-q"], project)
    if not (project / ".dvc").is_dir():
        dvc("init", "-q", cwd=project)
    dvc("config", "core.analytics", "false", cwd=project)
    dvc("config", "core.check_update", "false", cwd=project, check=False)
    if remote is not None and not dvc("remote", "list", cwd=project).stdout.strip():
        remote.mkdir(parents=True, exist_ok=True)
        dvc("remote", "add", "-d", "local", str(remote.resolve()), cwd=project)


def init_project(root: Path, params: Params, seed: int = 11) -> Path:
    """A self-contained project: ``params.yaml``, the synthetic CT set under ``data.root`` and a git + DVC
    repository whose local remote sits beside it (tests, benchmarks and demos start from this)."""
    from cellscan.core.synth import generate

    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params.to_dict()))
    s = params.synth
    generate(root / params.data.root, size=s.size, n_train=s.n_train, n_test_good=s.n_test_good,
             n_per_defect=s.n_per_defect, seed=seed)
    init_repo(root, root.parent / f"{root.name}-remote")
    return root


def data_hash(project: Path, target: str = "data") -> str | None:
    """The md5 that ``<target>.dvc`` records, or None when there is no such file."""
    f = project / f"{target}.dvc"
    if not f.is_file():
        return None
    outs = (yaml.safe_load(f.read_text()) or {}).get("outs") or [{}]
    md5 = outs[0].get("md5")
    return str(md5) if md5 else None


def snapshot(project: Path, target: str = "data", push: bool = True) -> str:
    """Record the current content of ``target`` as a data version; returns its hash.

    Every version stays in the DVC cache (and on the remote when pushing works), so adding images
    never loses an earlier version.
    """
    dvc("add", "-q", target, cwd=project)
    if push:
        res = dvc("push", "-q", f"{target}.dvc", cwd=project, check=False)
        if res.returncode != 0:
            logger.warning("dvc push failed (data stays in the local cache): %s", res.stderr.strip()[-300:])
    h = data_hash(project, target)
    if h is None:
        msg = f"dvc add did not write {target}.dvc in {project}"
        raise VersioningError(msg)
    logger.info("data version %s", h)
    return h


def restore(project: Path, dvc_file_text: str, target: str = "data") -> str:
    """Bring ``target`` back to the version a saved ``.dvc`` file names (cache first, then the remote)."""
    (project / f"{target}.dvc").write_text(dvc_file_text)
    res = dvc("checkout", "-q", "--force", f"{target}.dvc", cwd=project, check=False)
    if res.returncode != 0:
        dvc("pull", "-q", "--force", f"{target}.dvc", cwd=project)
    h = data_hash(project, target)
    return h or ""


# What DVC says when the version is in neither the cache nor the remote (an empty remote on a new machine),
# as against a remote that does not answer, refuses the credentials or lacks its plugin.
_MISSING = ("missing-files", "missing cache files", "do not exist neither locally nor on remote")


def pull(project: Path, target: str = "data") -> bool:
    """Fetch ``target`` from the cache or remote; False when neither holds that version.

    Raises:
        VersioningError: the pull failed for another reason (DVC's own words: a missing plugin, refused
            credentials, a remote path that is a file; an HTTP remote that does not answer, which DVC
            itself reports as missing files), so that a caller does not put a new data version in its
            place.
    """
    res = dvc("pull", f"{target}.dvc", cwd=project, check=False)
    if res.returncode == 0:
        return True
    said = f"{res.stdout}\n{res.stderr}"
    if any(m in said.lower() for m in _MISSING):
        _check_http_remote(project)
        return False
    raise _failed(res, project)


def _check_http_remote(project: Path, timeout: float = 10.0) -> None:
    """Raise when the default remote is an HTTP(S) server that does not answer: DVC calls its files missing
    then, as if the remote were empty. An answer of any status (404 for an empty remote) is an answer."""
    import http.client
    import urllib.error
    import urllib.request
    from urllib.parse import urlsplit, urlunsplit

    name = dvc("remote", "default", cwd=project, check=False).stdout.strip()
    if not name:
        return
    # `dvc config` prints the value alone (`dvc remote list` wraps long lines when piped)
    url = dvc("config", f"remote.{name}.url", cwd=project, check=False).stdout.strip()
    if not url.startswith(("http://", "https://")):
        return
    parts = urlsplit(url)  # credentials (user:password@) are DVC's to send: never asked with, never shown
    bare = urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]))
    try:
        with urllib.request.urlopen(urllib.request.Request(bare, method="HEAD"), timeout=timeout):  # noqa: S310
            pass
    except urllib.error.HTTPError:
        return  # the server answered (401 for missing credentials, 404 for an empty remote, 405 to a HEAD)
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else f"{type(exc).__name__}: {exc}"
        msg = (f"the DVC remote {name!r} ({bare}) does not answer ({reason}); DVC reports its files as "
               "missing, but nothing was replaced: fix the remote (dvc remote list) and pull again")
        raise VersioningError(msg) from None


def main(argv: list[str] | None = None) -> int:
    """``python -m cellscan.mlops.versioning pull [TARGET]``, for the set-up scripts: prints ``pulled`` or
    ``missing`` (exit 0 / 3); another failure is one line on stderr (exit 1)."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] != "pull":
        print("usage: python -m cellscan.mlops.versioning pull [TARGET]", file=sys.stderr)
        return 2
    try:
        found = pull(Path.cwd(), *args[1:2])
    except VersioningError as exc:
        print(f"data: {exc}", file=sys.stderr)
        return 1
    print("pulled" if found else "missing")
    return 0 if found else 3


def git_commit(project: Path) -> str:
    """The project's commit, or "unknown" (no repository, or no git installed, as in the container image)."""
    try:
        res = _run(["git", "rev-parse", "HEAD"], project, check=False)
    except OSError:
        return "unknown"
    return res.stdout.strip() if res.returncode == 0 else "unknown"


def restore_into(project: Path, dvc_file_text: str, workdir: Path, target: str = "data") -> str:
    """Materialise the data version a saved ``.dvc`` file names in ``workdir``, leaving ``project`` as it is.

    ``workdir`` becomes a throw-away DVC repository that shares the project's cache and remote, so
    the files come from the local cache when they are there and from the remote otherwise.
    Returns the restored hash.
    """
    project, workdir = project.resolve(), workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    dvc("init", "-q", "--no-scm", cwd=workdir)
    dvc("config", "core.analytics", "false", cwd=workdir)
    cache = dvc("cache", "dir", cwd=project, check=False).stdout.strip() or str(project / ".dvc" / "cache")
    dvc("config", "cache.dir", cache, cwd=workdir)
    for line in dvc("remote", "list", cwd=project, check=False).stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            name, url = parts[0], parts[1]
            if "://" not in url and not Path(url).is_absolute():
                url = str((project / ".dvc" / url).resolve())
            dvc("remote", "add", "-f", "-d", name, url, cwd=workdir)
    (workdir / f"{target}.dvc").write_text(dvc_file_text)
    res = dvc("checkout", "-q", f"{target}.dvc", cwd=workdir, check=False)
    if res.returncode != 0:
        dvc("pull", "-q", f"{target}.dvc", cwd=workdir)
    return data_hash(workdir, target) or ""


if __name__ == "__main__":
    raise SystemExit(main())
