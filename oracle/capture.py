"""Captures: the tap tensors of one run, per request, in canonical layout, and their storage.

In memory a `Capture` maps request id -> `RequestCapture`: tap name -> tensor [T, ...] whose
rows are the request's positions in ascending order. Pool taps (`layers.{l}.k_cache` /
`.v_cache`) cover the positions that must be resident, not every position, so they carry
their own positions.

`CaptureBuilder` takes the pieces a serving path produces - a chunk of a prefill, one decode
step, in any order - and reassembles them, refusing duplicate or missing positions.

On disk a capture is a directory (shared/DESIGN.md "Storage"):

    manifest.json              schema version, metadata, and per request its file, byte size,
                               sha256, and every tensor's key, shape and dtype
    request-00000.safetensors  one file per request; tensors keyed "tap/<name>", positions
                               "positions" and "positions/<name>" for pool taps

Request ids live only in the manifest (files are numbered), so any string is a valid id.
Writes go to a staging directory beside the target (every file fsynced, modes 0666/0777 less the
umask: reference/fileio.py's conventions) that is renamed into place, so a crash never leaves a
partial capture under the target name. Loading verifies everything and raises
CaptureError naming the file and the problem. No pickle anywhere.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load as tensors_from_bytes
from safetensors.torch import save as tensors_to_bytes

from reference.fileio import fresh_dir, fsync_dir, parse_json, why_not_creatable, write_durably

from .taps import TapNameError, parse_tap

SCHEMA_VERSION = 1
FORMAT = "gemma4-testbed-capture"
MANIFEST = "manifest.json"
PATHS = ("reference", "optimized", "truth")

_POSITIONS_KEY = "positions"
_FILE_NAME = re.compile(r"request-[0-9]{5,}\.safetensors")
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)}


class CaptureError(ValueError):
    """A capture is inconsistent, or a capture directory is missing, corrupt or mismatched."""


def dtype_name(dtype: torch.dtype) -> str:
    """"bfloat16" for torch.bfloat16: the spelling manifests and metadata use."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except (KeyError, TypeError):
        raise CaptureError(f"unknown dtype {name!r}; known: {', '.join(_DTYPES)}") from None


# --------------------------------------------------------------------------------------
# In memory
# --------------------------------------------------------------------------------------


@dataclass
class RequestCapture:
    """One request's taps. `positions` [T] ascending are the rows of every activation tap;
    `tap_positions` holds the rows of the taps that differ (pool taps)."""

    positions: torch.Tensor
    taps: dict[str, torch.Tensor] = field(default_factory=dict)
    tap_positions: dict[str, torch.Tensor] = field(default_factory=dict)

    def positions_of(self, tap: str) -> torch.Tensor:
        return self.tap_positions.get(tap, self.positions)


def rows_at(have: torch.Tensor, want: torch.Tensor) -> tuple[torch.Tensor, list]:
    """Row indices of the positions `want` in the ascending `have`, and the wanted positions
    that are absent (at most 10 listed)."""
    if have.numel() == 0:
        return torch.zeros_like(want), want.tolist()[:10]
    idx = torch.searchsorted(have, want).clamp(max=have.numel() - 1)
    found = have[idx] == want
    absent = want[~found].tolist()
    return idx, absent[:10] + (["..."] if len(absent) > 10 else [])


@dataclass
class Capture:
    requests: dict[str, RequestCapture]
    metadata: dict[str, Any] = field(default_factory=dict)

    def tap(self, request_id: str, name: str) -> torch.Tensor:
        return self.requests[request_id].taps[name]


def capture_metadata(config=None, *, path: str, dtype: torch.dtype | str, device: str | torch.device = "cpu",
                     scenario: Mapping[str, Any] | None = None, repo_dir: str | Path | None = None,
                     ops: str | None = None) -> dict[str, Any]:
    """The metadata shared/DESIGN.md asks of every capture. `config` is a Gemma4Config (or None);
    `path` is "reference", "optimized" or "truth"; `ops`, the optimized path's op set
    (optimized.model.OP_SETS), is recorded where given."""
    if path not in PATHS:
        raise CaptureError(f"path must be one of {PATHS}, got {path!r}")
    metadata = {
        "schema_version": SCHEMA_VERSION,
        "model_config": config.to_hf_dict() if config is not None else None,
        "scenario": dict(scenario or {}),
        "path": path,
        "dtype": dtype if isinstance(dtype, str) else dtype_name(dtype),
        "device": str(device),
        "versions": package_versions(),
        "git": git_revision(repo_dir or Path(__file__).resolve().parent.parent),
    }
    if ops is not None:
        metadata["ops"] = ops
    return metadata


def package_versions() -> dict[str, str | None]:
    """Versions read from installed metadata: importing transformers just for its version
    would cost seconds."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("torch", "triton", "transformers", "safetensors", "gemma4-testbed"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def git_revision(repo_dir: str | Path) -> dict[str, Any] | None:
    """{"revision", "dirty"} of the checkout holding repo_dir, or None without git or a repo.
    Read-only: --no-optional-locks keeps `git status` from refreshing the index."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "--no-optional-locks", "-C", str(repo_dir), *args], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()

    try:
        revision = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"revision": revision, "dirty": dirty}


# --------------------------------------------------------------------------------------
# Reassembly
# --------------------------------------------------------------------------------------


class CaptureBuilder:
    """Collects tap pieces as a serving path emits them and assembles the canonical layout.

        b = CaptureBuilder(metadata)
        b.add("r0", "layers.3.q", positions=torch.arange(16, 32), tensor=q_chunk)  # [16, Hq, D]
        ...
        capture = b.build()

    Pieces are copied to the CPU when added (serving buffers are reused in place)."""

    def __init__(self, metadata: Mapping[str, Any] | None = None):
        self.metadata = dict(metadata or {})
        self._pieces: dict[str, dict[str, list[tuple[torch.Tensor, torch.Tensor]]]] = {}

    def add(self, request_id: str, tap: str, positions, tensor: torch.Tensor) -> None:
        if not isinstance(request_id, str) or not request_id:
            raise CaptureError(f"request id must be a non-empty string, got {request_id!r}")
        try:
            parse_tap(tap)
        except TapNameError as e:
            raise CaptureError(f"request {request_id!r}: {e}") from None
        where = f"request {request_id!r}, tap {tap!r}"
        pos = _as_positions(positions, where)
        if not isinstance(tensor, torch.Tensor) or tensor.dim() < 1:
            raise CaptureError(f"{where}: expected a tensor [n, ...], got {type(tensor).__name__}")
        if tensor.shape[0] != pos.numel():
            raise CaptureError(f"{where}: tensor has {tensor.shape[0]} rows but {pos.numel()} positions")
        pieces = self._pieces.setdefault(request_id, {}).setdefault(tap, [])
        if pieces:
            first = pieces[0][1]
            if tensor.dtype != first.dtype or tensor.shape[1:] != first.shape[1:]:
                raise CaptureError(
                    f"{where}: piece of {dtype_name(tensor.dtype)} {list(tensor.shape)} does not match the earlier "
                    f"pieces ({dtype_name(first.dtype)} [n, {', '.join(map(str, first.shape[1:]))}])")
        pieces.append((pos, tensor.detach().to("cpu", copy=True)))

    def add_taps(self, request_id: str, positions, taps: Mapping[str, torch.Tensor]) -> None:
        """Add every tensor of a taps dict that covers the same positions (one forward step)."""
        for name, tensor in taps.items():
            self.add(request_id, name, positions, tensor)

    def build(self, expected_positions: Mapping[str, Any] | None = None) -> Capture:
        """Assemble every request. Without `expected_positions`, each tap's positions must form
        one gap-free range and every activation tap of a request must cover the same range; with
        it (request id -> positions), the activation taps must cover exactly those positions."""
        expected = {r: _as_positions(p, f"expected positions of {r!r}").sort().values
                    for r, p in (expected_positions or {}).items()}
        requests = {}
        for request_id, taps in self._pieces.items():
            assembled = {tap: _assemble(request_id, tap, pieces) for tap, pieces in taps.items()}
            requests[request_id] = _request_capture(request_id, assembled, expected.get(request_id))
        for request_id in expected.keys() - requests.keys():
            raise CaptureError(f"request {request_id!r}: expected but no piece was added")
        return Capture(requests, dict(self.metadata))


def _as_positions(positions, where: str) -> torch.Tensor:
    pos = torch.as_tensor(positions).detach().to("cpu")
    if pos.dim() != 1 or pos.dtype.is_floating_point or pos.dtype == torch.bool or pos.is_complex():
        raise CaptureError(f"{where}: positions must be a 1-D integer tensor, got {pos.dtype} {list(pos.shape)}")
    pos = pos.to(torch.int64)
    if pos.numel() and int(pos.min()) < 0:
        raise CaptureError(f"{where}: negative position {int(pos.min())}")
    return pos


def _assemble(request_id: str, tap: str, pieces) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate pieces, sort rows by position, refuse duplicates. -> (positions, tensor)."""
    where = f"request {request_id!r}, tap {tap!r}"
    pos = torch.cat([p for p, _ in pieces])
    rows = torch.cat([t for _, t in pieces])
    pos, order = pos.sort(stable=True)
    repeated = pos[1:][pos[1:] == pos[:-1]].unique()
    if repeated.numel():
        raise CaptureError(f"{where}: positions captured more than once: {_short(repeated)}")
    return pos, rows[order]


def _request_capture(request_id: str, assembled: dict, expected: torch.Tensor | None) -> RequestCapture:
    activations = {t: v for t, v in assembled.items() if not parse_tap(t).is_cache}
    pools = {t: v for t, v in assembled.items() if parse_tap(t).is_cache}
    if expected is None:
        for tap, (pos, _) in assembled.items():
            _check_gap_free(request_id, tap, pos)
        # Every activation tap must agree; a tap with a missing chunk disagrees with the others.
        agreed = max((pos for pos, _ in activations.values()), key=len, default=torch.empty(0, dtype=torch.int64))
    else:
        agreed = expected
    for tap, (pos, _) in activations.items():
        missing = agreed[~torch.isin(agreed, pos)]
        extra = pos[~torch.isin(pos, agreed)]
        if missing.numel():
            raise CaptureError(f"request {request_id!r}, tap {tap!r}: missing positions {_short(missing)}")
        if extra.numel():
            raise CaptureError(f"request {request_id!r}, tap {tap!r}: unexpected positions {_short(extra)}")
    return RequestCapture(
        positions=agreed.clone(),
        taps={tap: rows for tap, (_, rows) in assembled.items()},
        tap_positions={tap: pos for tap, (pos, _) in pools.items()},
    )


def _check_gap_free(request_id: str, tap: str, pos: torch.Tensor) -> None:
    if pos.numel() == 0:
        return
    full = torch.arange(int(pos[0]), int(pos[-1]) + 1)
    missing = full[~torch.isin(full, pos)]
    if missing.numel():
        raise CaptureError(f"request {request_id!r}, tap {tap!r}: missing positions {_short(missing)} "
                           f"(captured {int(pos[0])}..{int(pos[-1])} with gaps)")


def _short(t: torch.Tensor, limit: int = 10) -> str:
    values = t.tolist()
    more = f" and {len(values) - limit} more" if len(values) > limit else ""
    return f"{values[:limit]}{more}"


# --------------------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------------------


def save_capture(capture: Capture, directory: str | Path, overwrite: bool = False) -> Path:
    """Write `capture` to `directory` atomically; refuses an existing target unless overwrite."""
    target = Path(directory)
    check_capture_target(target, overwrite)
    try:
        metadata_json = json.dumps(capture.metadata, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise CaptureError(f"capture metadata is not plain JSON: {e}") from None
    for request_id, req in capture.requests.items():
        _check_request(request_id, req)  # never write what load_capture would refuse
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = fresh_dir(target.parent, f".{target.name}.writing-")
    try:
        entries = [_write_request(staging, i, rid, req) for i, (rid, req) in enumerate(capture.requests.items())]
        manifest = {"format": FORMAT, "schema_version": SCHEMA_VERSION,
                    "metadata": json.loads(metadata_json), "requests": entries}
        write_durably(staging / MANIFEST, json.dumps(manifest, indent=1).encode())
        fsync_dir(staging)
        _move_into_place(staging, target, overwrite)
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def check_capture_target(directory: str | Path, overwrite: bool = False, how: str = "pass overwrite=True") -> None:
    """Raise CaptureError unless save_capture(directory, overwrite) may write there: callers check
    before the work that produces a capture (the CLI, with how="pass --overwrite")."""
    target = Path(directory)
    if target.exists() and not overwrite:
        raise CaptureError(f"{target}: already exists ({how} to replace it)")
    if target.exists() and not _is_capture_dir(target):
        # overwrite pointed at the wrong path must not delete someone's directory.
        raise CaptureError(f"{target}: exists and is not a capture directory; refusing to replace it")
    why = why_not_creatable(target.parent)  # where the capture is made, then renamed into place
    if why is not None:
        raise CaptureError(f"{target}: {why}")


def _check_request(request_id: str, req: RequestCapture) -> None:
    if not isinstance(request_id, str) or not request_id:
        raise CaptureError(f"request id must be a non-empty string, got {request_id!r}")
    for tap, tensor in req.taps.items():
        where = f"request {request_id!r}, tap {tap!r}"
        try:
            parse_tap(tap)
        except TapNameError as e:
            raise CaptureError(f"request {request_id!r}: {e}") from None
        if tensor.dtype not in _DTYPES.values():
            raise CaptureError(f"{where}: dtype {dtype_name(tensor.dtype)} cannot be stored")
        pos = req.positions_of(tap)
        if pos.dim() != 1 or bool((pos[1:] <= pos[:-1]).any()) or (pos.numel() and int(pos[0]) < 0):
            raise CaptureError(f"{where}: positions must be 1-D, strictly increasing and non-negative")
        if tensor.dim() < 1 or tensor.shape[0] != pos.numel():
            raise CaptureError(f"{where}: {list(tensor.shape)} does not have one row per position ({pos.numel()})")


def _is_capture_dir(path: Path) -> bool:
    try:
        return parse_json((path / MANIFEST).read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _write_request(staging: Path, index: int, request_id: str, req: RequestCapture) -> dict[str, Any]:
    file = f"request-{index:05d}.safetensors"
    storages: set[int] = set()

    def own(t: torch.Tensor) -> torch.Tensor:
        # safetensors refuses tensors that share memory (e.g. one buffer reported under two taps).
        t = t.detach().to("cpu").contiguous()
        if t.numel() == 0:
            return t
        if t.untyped_storage().data_ptr() in storages:
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        return t

    tensors = {_POSITIONS_KEY: own(req.positions.to(torch.int64))}
    taps = []
    for name, tensor in req.taps.items():
        entry = {"name": name, "key": f"tap/{name}", "shape": list(tensor.shape),
                 "dtype": dtype_name(tensor.dtype), "positions_key": _POSITIONS_KEY}
        tensors[entry["key"]] = own(tensor)
        if name in req.tap_positions:
            entry["positions_key"] = f"{_POSITIONS_KEY}/{name}"
            tensors[entry["positions_key"]] = own(req.tap_positions[name].to(torch.int64))
        taps.append(entry)
    # Serialized in memory and hashed there: the checksum is of exactly the bytes written.
    data = tensors_to_bytes(tensors)
    write_durably(staging / file, data)
    return {"id": request_id, "file": file, "bytes": len(data), "sha256": _sha256(data),
            "positions": list(req.positions.shape), "taps": taps}


def _move_into_place(staging: Path, target: Path, overwrite: bool) -> None:
    """Rename the finished staging directory to target. Replacing an existing capture swaps
    the two atomically where the OS can (Linux renameat2 RENAME_EXCHANGE); elsewhere the old
    one is renamed aside first, so a reader sees the old capture, no capture, or the new one,
    never a mixture."""
    if not target.exists():
        os.rename(staging, target)  # fails on a non-empty target created since we checked
        return
    if not overwrite:
        raise CaptureError(f"{target}: already exists (pass overwrite=True to replace it)")
    if _exchange(staging, target):
        shutil.rmtree(staging, ignore_errors=True)  # now holds the old capture
        return
    aside = fresh_dir(target.parent, f".{target.name}.old-")
    os.rename(target, aside / "old")
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(aside / "old", target)  # put the old capture back (if this fails, it stays aside)
        os.rmdir(aside)
        raise
    shutil.rmtree(aside, ignore_errors=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where unsupported."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    try:
        renameat2 = ctypes.CDLL(libc_name, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def load_capture(directory: str | Path) -> Capture:
    """Read and verify a capture directory. Any inconsistency raises CaptureError."""
    root = Path(directory)
    if not root.is_dir():
        raise CaptureError(f"{root}: no capture directory here")
    manifest = _read_manifest(root / MANIFEST)
    requests: dict[str, RequestCapture] = {}
    files_seen: set[str] = set()
    for i, entry in enumerate(manifest["requests"]):
        where = f"{root / MANIFEST}: requests[{i}]"
        _expect(isinstance(entry, dict), where, "is not an object")
        request_id = entry.get("id")
        _expect(isinstance(request_id, str) and request_id != "", where, f"bad request id {request_id!r}")
        _expect(request_id not in requests, where, f"request id {request_id!r} appears twice")
        file = entry.get("file")
        _expect(isinstance(file, str) and _FILE_NAME.fullmatch(file) is not None, where, f"bad file name {file!r}")
        _expect(file not in files_seen, where, f"file {file!r} listed twice")
        files_seen.add(file)
        requests[request_id] = _load_request(root / file, entry)
    return Capture(requests, manifest["metadata"])


def _expect(ok: bool, where: str, problem: str) -> None:
    if not ok:
        raise CaptureError(f"{where}: {problem}")


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CaptureError(f"{path}: missing (not a capture, or an unfinished write)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CaptureError(f"{path}: unreadable ({e})") from None
    try:
        manifest = parse_json(text)
    except ValueError as e:
        raise CaptureError(f"{path}: {e}") from None
    _expect(isinstance(manifest, dict), str(path), "expected a JSON object")
    _expect(manifest.get("format") == FORMAT, str(path), f"format is {manifest.get('format')!r}, expected {FORMAT!r}")
    version = manifest.get("schema_version")
    _expect(version == SCHEMA_VERSION, str(path),
            f"schema version {version!r} is not the supported {SCHEMA_VERSION}")
    _expect(isinstance(manifest.get("metadata"), dict), str(path), "metadata is missing or not an object")
    dtype = manifest["metadata"].get("dtype")
    _expect(dtype is None or isinstance(dtype, str), str(path), f"metadata.dtype: expected a string, got {dtype!r}")
    ops = manifest["metadata"].get("ops")
    _expect(ops is None or isinstance(ops, str), str(path), f"metadata.ops: expected a string, got {ops!r}")
    _expect(isinstance(manifest.get("requests"), list), str(path), "requests is missing or not a list")
    return manifest


def _load_request(path: Path, entry: dict[str, Any]) -> RequestCapture:
    name = path.name
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CaptureError(f"{path}: missing (listed in the manifest for request {entry['id']!r})") from None
    except OSError as e:
        raise CaptureError(f"{path}: unreadable ({e})") from None
    if len(data) != entry.get("bytes"):
        raise CaptureError(f"{path}: {len(data)} bytes, the manifest records {entry.get('bytes')!r} "
                           f"(truncated or replaced)")
    if _sha256(data) != entry.get("sha256"):
        raise CaptureError(f"{path}: sha256 does not match the manifest (the file is corrupt)")
    # Parsed from the bytes just hashed, so what is verified is what is loaded.
    try:
        tensors = tensors_from_bytes(data)
    except Exception as e:  # safetensors raises its own error types for malformed headers
        raise CaptureError(f"{path}: not a readable safetensors file ({e})") from None

    taps_meta = entry.get("taps")
    _expect(isinstance(taps_meta, list), name, "manifest entry has no tap list")
    positions = _load_positions(tensors, _POSITIONS_KEY, name)
    _expect(list(positions.shape) == entry.get("positions"), name,
            f"positions have shape {list(positions.shape)}, manifest records {entry.get('positions')!r}")
    req = RequestCapture(positions)
    listed = {_POSITIONS_KEY}
    for meta in taps_meta:
        _expect(isinstance(meta, dict), name, f"bad tap entry {meta!r}")
        tap, key, pos_key = meta.get("name"), meta.get("key"), meta.get("positions_key")
        try:
            parse_tap(tap)
        except TapNameError as e:
            raise CaptureError(f"{path}: {e}") from None
        _expect(tap not in req.taps, name, f"tap {tap!r} listed twice")
        _expect(isinstance(key, str) and key in tensors, name, f"tensor {key!r} of tap {tap!r} is missing")
        tensor = tensors[key]
        _expect(list(tensor.shape) == meta.get("shape"), name,
                f"tap {tap!r} has shape {list(tensor.shape)}, manifest records {meta.get('shape')!r}")
        _expect(dtype_name(tensor.dtype) == meta.get("dtype"), name,
                f"tap {tap!r} has dtype {dtype_name(tensor.dtype)}, manifest records {meta.get('dtype')!r}")
        rows = _load_positions(tensors, pos_key, name) if pos_key != _POSITIONS_KEY else positions
        _expect(tensor.dim() >= 1 and tensor.shape[0] == rows.numel(), name,
                f"tap {tap!r} has {tensor.shape[0] if tensor.dim() else 0} rows for {rows.numel()} positions")
        req.taps[tap] = tensor
        if pos_key != _POSITIONS_KEY:
            req.tap_positions[tap] = rows
        listed.update((key, pos_key))
    unlisted = sorted(set(tensors) - listed)
    _expect(not unlisted, name, f"tensors not in the manifest: {unlisted[:5]}")
    return req


def _load_positions(tensors: dict[str, torch.Tensor], key: Any, name: str) -> torch.Tensor:
    _expect(isinstance(key, str) and key in tensors, name, f"positions tensor {key!r} is missing")
    pos = tensors[key]
    _expect(pos.dtype == torch.int64 and pos.dim() == 1, name,
            f"{key!r} must be int64 [n], got {dtype_name(pos.dtype)} {list(pos.shape)}")
    _expect(bool((pos[1:] > pos[:-1]).all()) and (pos.numel() == 0 or int(pos[0]) >= 0), name,
            f"{key!r} is not strictly increasing and non-negative")
    return pos


__all__ = [
    "SCHEMA_VERSION", "Capture", "RequestCapture", "CaptureBuilder", "CaptureError", "capture_metadata",
    "save_capture", "check_capture_target", "load_capture", "package_versions", "git_revision", "dtype_name",
    "dtype_from_name",
]
