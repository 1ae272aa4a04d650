"""The container images, checked without a Docker engine (none runs where the tests run).

docker/Dockerfile.cpu and docker/Dockerfile.cuda are read with dockerfile-parse and each promise they make is checked
against the code it depends on: the README's install line, the settings the service accepts, its ports and CLI, the
shipped model, pyproject.toml's dependencies. The few shell and Python snippets the images run at build or health-check
time are run here for real. A change on either side that is not mirrored on the other fails a test.
"""

from __future__ import annotations

import io
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
from packaging.specifiers import SpecifierSet

from models.files import CARD_FILE, ONNX_FILE
from service.cli import build_parser
from service.config import Settings, WorkerSettings, load_settings, unknown_variables

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = {"cpu": ROOT / "docker" / "Dockerfile.cpu", "cuda": ROOT / "docker" / "Dockerfile.cuda"}
# The final stage's base. CUDA: 12.x with cuDNN, matching the onnxruntime-gpu line the image pins (checked below).
FINAL_BASES = {
    "cpu": re.compile(r"python:3\.11-slim-bookworm"),
    "cuda": re.compile(r"nvidia/cuda:12\.\d+\.\d+-cudnn-runtime-ubuntu24\.04"),
}
RUNTIME_UID = "10001"
COMPILERS = {"build-essential", "gcc", "g++", "make", "clang", "cpp", "cc", "gfortran", "python3-dev"}
SHELL_SEPARATORS = {"&&", "||", ";", "|"}
# The first onnxruntime-gpu release on PyPI built for CUDA 13 (1.19 to 1.26 are CUDA 12 + cuDNN 9).
FIRST_ORT_FOR_CUDA_13 = "1.27.0"


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


def test_the_shipped_model_is_exported_at_build_time_and_baked_where_c2p_model_points(
    stages: list[Stage], final: Stage
) -> None:
    """The worker serves the export as it is (no export, so no torch, at start-up); the folder is the one the build
    wrote with `c2p export` from the model the package ships."""
    exports = {
        stage.name: words for stage in stages[:-1] for words in stage.commands() if words[:2] == ["c2p", "export"]
    }
    assert len(exports) == 1, exports
    ((export_stage, words),) = exports.items()
    flags = dict(zip(words[2::2], words[3::2], strict=True))
    assert (ROOT / "models" / "weights" / f"{flags['--model']}.safetensors").is_file()
    model_dir = final.envs()["C2P_MODEL"]
    assert flags["--out"] == model_dir
    (copied,) = [(sources, dest) for stage, sources, dest in copies_from(final) if stage == export_stage]
    sources, dest = copied
    assert dest.rstrip("/") == model_dir
    assert {Path(s).name for s in sources} == {ONNX_FILE, CARD_FILE}
    assert all(Path(s).parent == Path(model_dir) for s in sources)


def test_the_builder_runs_the_readmes_install_without_editable(stages: list[Stage]) -> None:
    """The image installs what the README tells people to install (as a wheel, not editable), in the stage that
    exports the model, the only step that needs torch."""
    readme = (ROOT / "README.md").read_text()
    line = next(line for line in readme.splitlines() if line.startswith("python3 -m pip install"))
    expected = [w for w in shlex.split(line.split("&&")[0]) if w not in {"-e", "--editable"}]
    assert ".[cpu]" in expected, expected
    exporter = next(s for s in stages if any(w[:2] == ["c2p", "export"] for w in s.commands()))
    installs = [[w for w in words if w != "--no-cache-dir"] for words in exporter.commands()]
    assert expected in installs, f"{exporter.name} stage must run {shlex.join(expected)} (README.md, minus -e)"
    assert stages[-1] is not exporter


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


def _runtime_venv(stages: list[Stage], final: Stage) -> Stage:
    (name,) = [s for s, _, dest in copies_from(final) if dest.rstrip("/") == "/opt/venv"]
    return next(s for s in stages if s.name == name)


def _runtime_requirements(venv: Stage) -> tuple[list[str], list[str], list[str]]:
    """Run the venv stage's requirement filter against pyproject.toml: (requirements, extras, left out)."""
    (filters,) = [w for w in venv.commands() if w[:2] == ["python3", "-c"] and "tomllib" in w[2]]
    code, extras, dropped = filters[2:5]
    out = subprocess.run(
        [sys.executable, "-c", code, extras, dropped], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    return out.split(), extras.split(), dropped.split()


def test_the_runtime_venv_has_no_torch(stages: list[Stage], final: Stage, pyproject: dict[str, Any]) -> None:
    """A worker serving an export folder never imports torch (hundreds of MB, GBs for CUDA): the runtime venv takes
    every dependency but the one that pulls torch (timm), and the wheel itself without its declared dependencies."""
    venv = _runtime_venv(stages, final)
    requirements, extras, dropped = _runtime_requirements(venv)
    names = {requirement_name(r) for r in requirements}
    assert not names & {"torch", "torchvision", "timm"}
    assert "tracing" in extras and "cpu" not in extras
    wanted = pyproject["dependencies"] + [r for e in extras for r in pyproject["optional-dependencies"][e]]
    assert {requirement_name(r) for r in wanted} - names == set(dropped), "only what is named is left out"
    for words in pip_installs(venv.commands()):
        if "." in words:
            assert "--no-deps" in words, words
    assert any("find_spec" in value and "torch" in value for value in venv.values("RUN")), "a build-time guard"


def test_onnxruntime_flavour_matches_the_image(
    flavour: str, stages: list[Stage], final: Stage, pyproject: dict[str, Any]
) -> None:
    """onnxruntime and onnxruntime-gpu install the same module into the same folder: the CUDA venv must get the GPU
    build only (never both, never an uninstall afterwards, which deletes shared files), at a release built for the
    base image's CUDA major; the CPU venv the plain one."""
    venv = _runtime_venv(stages, final)
    names = {requirement_name(r) for r in _runtime_requirements(venv)[0]}
    for words in pip_installs(venv.commands()):
        assert not [w for w in words if requirement_name(w) == "onnxruntime"], words
    assert not [w for w in venv.commands() if "uninstall" in w]
    if flavour == "cpu":
        assert "onnxruntime" in names and "onnxruntime-gpu" not in names
        return
    assert "onnxruntime-gpu" in names and "onnxruntime" not in names
    assert any(requirement_name(r) == "nvidia-ml-py" for r in pyproject["optional-dependencies"]["gpu"])
    assert "nvidia-ml-py" in names
    pin = SpecifierSet(venv.args()["ONNXRUNTIME_GPU"].removeprefix("onnxruntime-gpu"))
    cuda_major = int(re.search(r"nvidia/cuda:(\d+)\.", root_image(stages, final)).group(1))
    assert (FIRST_ORT_FOR_CUDA_13 in pin) == (cuda_major >= 13), (str(pin), cuda_major)
    assert any("-c" in words and "/tmp/constraints.txt" in words for words in pip_installs(venv.commands()))
    assert any('echo "${ONNXRUNTIME_GPU}" > /tmp/constraints.txt' in value for value in venv.values("RUN"))


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
    ):  # fmt: skip
        assert _docker_ignored(patterns, private), private
    assert _docker_ignored(patterns, ".git")
    for name in SOURCES:
        assert not _docker_ignored(patterns, name), name
        path = ROOT / name
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            if not re.search(r"__pycache__|\.py[cod]$|^service/grpc/gen/", relative):
                assert not _docker_ignored(patterns, relative), relative


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint is not on PATH (a static binary; not installed)")
def test_hadolint(flavour: str) -> None:
    """Dockerfile lint beyond these checks. Versions come from pyproject.toml's ranges (pip) and the base image's
    release (apt), so the pinning rules are off."""
    hadolint = shutil.which("hadolint")
    assert hadolint
    result = subprocess.run(
        [hadolint, "--ignore", "DL3008", "--ignore", "DL3013", "--failure-threshold", "warning", DOCKERFILES[flavour]],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
