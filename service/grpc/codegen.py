"""Python code for the contracts in proto/, generated with grpcio-tools, never edited or committed.

The .proto files are the source of truth; a stale generated module would serve a contract that no
longer exists, so the generated tree records a hash of what it was made from (the protos, the
grpcio/grpcio-tools/protobuf versions and this module's post-processing) and ``ensure_generated``
regenerates whenever that hash differs: a fresh clone, an edited proto, an upgraded compiler. A hash
and not mtimes, because checkouts, copies and builds do not keep mtimes meaningful.

protoc writes ``from c2p.v1 import segmentation_pb2``: imports relative to the proto root, which would
need the generated folder on sys.path. The imports are rewritten to the package instead
(``service.grpc.gen.c2p.v1``), as tools such as protoletariat do, so the generated code is an ordinary
subpackage.

Generation writes to a temporary sibling folder and renames it into place, under an exclusive lock, so
two processes starting at once neither collide nor see a half-written tree.

Run ``python -m service.grpc.codegen`` to generate explicitly (what a build step calls), ``--out`` to
generate into another folder (a wheel's build directory), ``--check`` to only verify.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parents[2] / "proto"
GEN_DIR = Path(__file__).resolve().parent / "gen"
PACKAGE = "service.grpc.gen"
HASH_FILE = "PROTO_HASH"
# A folder is this project's proto root only if it holds this file: beside an installed wheel,
# ``site-packages/proto`` is another distribution's package (proto-plus), not ours.
ANCHOR = Path("c2p/v1/segmentation.proto")
# Bump whenever the post-processing below changes, so existing generated trees are remade.
CODEGEN_VERSION = "1"
# Proto packages whose messages other installed libraries also define: tritonclient registers the
# Open Inference Protocol's ``inference.*`` in protobuf's default descriptor pool, and a pool refuses a
# second definition of a symbol, so whichever module was imported second would fail. These files get
# a private pool; wire compatibility does not depend on the pool. They must not import other protos.
PRIVATE_POOL_PACKAGES = frozenset({"inference"})
_TOOL_DISTRIBUTIONS = ("grpcio", "grpcio-tools", "protobuf")


class CodegenError(RuntimeError):
    """The generated code is missing or stale and cannot be (re)made here."""


def proto_files(proto_root: Path) -> list[Path]:
    return sorted(proto_root.rglob("*.proto"))


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def proto_hash(proto_root: Path) -> str:
    """What the generated code depends on: the protos' paths and bytes, the tools' versions, this module."""
    digest = hashlib.sha256()
    digest.update(f"codegen {CODEGEN_VERSION}\n".encode())
    for name in _TOOL_DISTRIBUTIONS:
        digest.update(f"{name} {_version(name)}\n".encode())
    for path in proto_files(proto_root):
        rel = path.relative_to(proto_root).as_posix().encode()
        data = path.read_bytes()
        # Length-prefixed, so no two different sets of files can hash alike by shifting bytes around.
        digest.update(b"%d:%s%d:" % (len(rel), rel, len(data)))
        digest.update(data)
    return digest.hexdigest()


def expected_modules(proto_root: Path) -> list[Path]:
    """The generated files, relative to the generated folder, that importing the package needs."""
    out = []
    for path in proto_files(proto_root):
        stem = path.relative_to(proto_root).with_suffix("")
        out += [stem.parent / f"{stem.name}_pb2.py", stem.parent / f"{stem.name}_pb2_grpc.py"]
    return out


def is_current(proto_root: Path = PROTO_ROOT, gen_dir: Path = GEN_DIR) -> bool:
    try:
        stored = (gen_dir / HASH_FILE).read_text(encoding="ascii").strip()
    except OSError:
        return False
    if stored != proto_hash(proto_root):
        return False
    return all((gen_dir / module).is_file() for module in expected_modules(proto_root))


def ensure_generated(proto_root: Path = PROTO_ROOT, gen_dir: Path = GEN_DIR, package: str = PACKAGE) -> None:
    """Make ``gen_dir`` match ``proto_root``, generating only when it does not.

    Cheap when current (one hash of a few kB, no lock, no write), so it runs on every import. Without
    ``proto_root`` (an installed wheel ships the generated code, not the protos) the generated tree is
    trusted as built.
    """
    if not (proto_root / ANCHOR).is_file():
        if (gen_dir / HASH_FILE).is_file():
            return
        raise CodegenError(
            f"the generated gRPC code is missing from {gen_dir} and there is no proto folder ({proto_root}) to "
            "generate it from; reinstall the package"
        )
    if is_current(proto_root, gen_dir):
        return
    with _locked(gen_dir):
        if is_current(proto_root, gen_dir):  # another process generated it while we waited
            return
        generate(proto_root, gen_dir, package)


def generate(proto_root: Path, gen_dir: Path, package: str = PACKAGE) -> None:
    """Generate unconditionally into a temporary sibling of ``gen_dir``, then swap it into place.

    The caller holds the lock (``ensure_generated`` does); the swap is two renames, so a crash leaves
    either the old tree, the new one or none (regenerated next time), never a mixture.
    """
    protos = proto_files(proto_root)
    if not protos:
        raise CodegenError(f"no .proto files under {proto_root}")
    parent = gen_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(gen_dir)
    digest = proto_hash(proto_root)
    staging = Path(tempfile.mkdtemp(prefix=f".{gen_dir.name}-new-", dir=parent))
    staging.chmod(0o755)  # mkdtemp's 0o700 would hide the package from every other user
    retired: Path | None = None
    try:
        _run_protoc(proto_root, protos, staging)
        _postprocess(proto_root, protos, staging, package)
        (staging / HASH_FILE).write_text(digest + "\n", encoding="ascii")  # last: marks the tree complete
        if gen_dir.exists():
            retired = parent / f".{gen_dir.name}-old-{uuid.uuid4().hex}"
            os.rename(gen_dir, retired)
        os.rename(staging, gen_dir)
    finally:
        for path in (staging, retired):
            if path is not None and path.exists():
                shutil.rmtree(path, ignore_errors=True)


def _remove_leftovers(gen_dir: Path) -> None:
    """Staging or retired folders of a generation that was killed halfway."""
    for path in gen_dir.parent.glob(f".{gen_dir.name}-*"):
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _locked(gen_dir: Path) -> Iterator[None]:
    """An exclusive lock for generating ``gen_dir``: flock on its parent folder itself (made if missing), where
    ``generate`` stages and renames, so no lock file is left anywhere, in the source tree or the temp dir.

    The lock belongs to the folder's inode, not to a spelling of its path, so callers naming it through different
    paths (relative, symlinked) still exclude each other. flock needs only read access, and each call opens its own
    descriptor, so threads of one process exclude each other too. Not reentrant: do not nest it for one folder.
    """
    parent = gen_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _run_protoc(proto_root: Path, protos: Sequence[Path], out: Path) -> None:
    # A child process, so protoc's diagnostics (printed by C++ to stderr) can be put in the exception.
    well_known = resources.files("grpc_tools") / "_proto"
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"--proto_path={proto_root}",
        f"--proto_path={well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *(str(path) for path in protos),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise CodegenError(f"protoc failed on {proto_root}:\n{result.stderr.strip() or result.stdout.strip()}")


def _postprocess(proto_root: Path, protos: Sequence[Path], out: Path, package: str) -> None:
    parts = [path.relative_to(proto_root).parts for path in protos]
    folders = sorted({p[0] for p in parts if len(p) > 1})
    top_level = {Path(p[0]).stem + "_pb2" for p in parts if len(p) == 1}
    names = "|".join(re.escape(folder) for folder in folders) or "(?!)"  # (?!) matches nothing
    # from c2p.v1 import segmentation_pb2 as ...  ->  from service.grpc.gen.c2p.v1 import segmentation_pb2 as ...
    from_import = re.compile(rf"^(\s*)from ((?:{names})(?:\.\w+)*) import ", re.MULTILINE)
    # import foo_pb2 as foo__pb2 (a proto at the root)  ->  from service.grpc.gen import foo_pb2 as foo__pb2
    plain_import = re.compile(r"^(\s*)import (\w+_pb2)( as \w+)?$", re.MULTILINE)
    # The module name the message classes report (__module__, pickling) must be the real one.
    module_name = re.compile(r"(BuildTopDescriptorsAndMessages\(DESCRIPTOR, ')([\w.]+)(')")

    for path in sorted(out.rglob("*.py*")):
        if path.suffix not in (".py", ".pyi"):
            continue
        text = path.read_text(encoding="utf-8")
        text = from_import.sub(rf"\1from {package}.\2 import ", text)
        text = plain_import.sub(
            lambda m: f"{m[1]}from {package} import {m[2]}{m[3] or ''}" if m[2] in top_level else m[0], text
        )
        text = module_name.sub(rf"\g<1>{package}.\g<2>\g<3>", text)
        rel = path.relative_to(out)
        if rel.parts[0] in PRIVATE_POOL_PACKAGES and path.name.endswith("_pb2.py"):
            text = _private_pool(text, rel)
        path.write_text(text, encoding="utf-8")

    for folder in [out, *(p for p in out.rglob("*") if p.is_dir())]:
        init = folder / "__init__.py"
        if not init.exists():
            init.write_text(
                '"""Generated from proto/ by service/grpc/codegen.py; do not edit, do not commit."""\n',
                encoding="utf-8",
            )


def _private_pool(text: str, rel: Path) -> str:
    default = "_descriptor_pool.Default().AddSerializedFile("
    if text.count(default) != 1:
        raise CodegenError(f"{rel}: protoc's output changed shape; cannot move it to a private descriptor pool")
    if re.search(r"^from \S+ import \w+_pb2 as ", text, re.MULTILINE):
        raise CodegenError(f"{rel}: a proto in a private descriptor pool cannot import other protos")
    return text.replace(default, "_descriptor_pool.DescriptorPool().AddSerializedFile(")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.grpc.codegen", description=__doc__.split("\n")[0])
    parser.add_argument("--proto-root", type=Path, default=PROTO_ROOT)
    parser.add_argument("--out", type=Path, default=GEN_DIR, help="the generated package's folder")
    parser.add_argument("--package", default=PACKAGE, help="the import name of --out")
    parser.add_argument("--force", action="store_true", help="generate even when current")
    parser.add_argument("--check", action="store_true", help="only report; exit 1 when stale")
    args = parser.parse_args(argv)
    if args.check:
        current = is_current(args.proto_root, args.out)
        print("current" if current else "stale")
        return 0 if current else 1
    try:
        if args.force:
            with _locked(args.out):
                generate(args.proto_root, args.out, args.package)
        else:
            ensure_generated(args.proto_root, args.out, args.package)
    except CodegenError as err:
        print(err, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
