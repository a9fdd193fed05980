"""docker/: the images and the compose stack, validated without a Docker daemon.

What runs here: the compose file against the compose-spec schema (check-jsonschema's vendored copy,
offline), every build context, Dockerfile and COPY source exists (and is not dockerignored), no
secret is written into the compose file, the images or .env.example, the images run as a non-root
user, their entry point imports and parses its command from exactly the files the Dockerfiles
copy, and the Prefect commands the compose services run exist with the options they use. What
cannot run here (building the images, starting the stack) is listed in docker/README.md.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.gpu"]
BIN = Path(sys.executable).parent
SECRET_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|CREDENTIAL|PRIVATE", re.I)
# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?message}, ${VAR?message}; $$ is a literal dollar
VAR = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _services() -> dict[str, dict]:
    return _compose()["services"]


def _defaults(text: str) -> str:
    """Compose interpolation with the defaults (required variables become a placeholder)."""
    return VAR.sub(lambda m: m.group(3) if m.group(2) in ("-", ":-") else f"<{m.group(1)}>", text)


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile: comments dropped, continuation lines joined."""
    out, buf = [], ""
    for line in dockerfile.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue
        buf += line.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def _exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(x, str) for x in value), f"not exec form: {args}"
    return value


def _build_of(service: dict) -> tuple[Path, Path]:
    build = service["build"]
    context = (DOCKER / build["context"]).resolve()
    return context, (context / build.get("dockerfile", "Dockerfile")).resolve()


def _copy_sources(dockerfile: Path) -> list[str]:
    sources = []
    for word, args in _instructions(dockerfile):
        if word not in ("COPY", "ADD"):
            continue
        parts = [p for p in shlex.split(args) if not p.startswith("--")]
        assert not any(p.startswith("--from") for p in shlex.split(args)), "no multi-stage COPY expected"
        assert len(parts) >= 2, f"{dockerfile.name}: {word} {args}"
        sources += parts[:-1]
    return sources


def _dockerignore(context: Path, dockerfile: Path) -> list[str]:
    """BuildKit's ignore file: <Dockerfile>.dockerignore beside the Dockerfile, else the context's."""
    for f in (dockerfile.with_name(dockerfile.name + ".dockerignore"), context / ".dockerignore"):
        if f.exists():
            return [x.strip() for x in f.read_text().splitlines() if x.strip() and not x.startswith("#")]
    return []


def _ignored(rel: str, patterns: list[str]) -> bool:
    ignored = False
    for p in patterns:
        neg, p = p.startswith("!"), p.lstrip("!").strip("/")
        if fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(rel, p.replace("**/", "")) or rel.startswith(p + "/"):
            ignored = not neg
    return ignored


# ---------------------------------------------------------------- compose


def test_compose_validates_against_the_compose_spec_schema(tmp_path):
    exe = shutil.which("check-jsonschema", path=str(BIN)) or shutil.which("check-jsonschema")
    assert exe, "check-jsonschema is a test dependency (pip install -c constraints.txt -e '.[test]')"
    ok = subprocess.run([exe, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # the validator is not vacuous: a misspelt key and a bad depends_on condition are rejected
    bad = _compose()
    bad["services"]["worker"]["depends_on"]["prefect-server"]["condition"] = "service_ready"
    bad["services"]["postgres"]["helthcheck"] = bad["services"]["postgres"].pop("healthcheck")
    (tmp_path / "compose.yaml").write_text(yaml.safe_dump(bad))
    rejected = subprocess.run([exe, "--builtin-schema", "vendor.compose-spec", str(tmp_path / "compose.yaml")],
                              capture_output=True, text=True, timeout=120)
    assert rejected.returncode != 0 and "helthcheck" in rejected.stdout + rejected.stderr
    # docker compose itself, where its plugin is installed (it needs no daemon for `config`)
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        env = tmp_path / ".env"
        env.write_text("".join(f"{k}=x{'y' * 12}\n" for k in _required_variables()))
        cfg = subprocess.run([docker, "compose", "--env-file", str(env), "-f", str(COMPOSE), "--profile", "gpu",
                              "config", "--quiet"], capture_output=True, text=True, timeout=120)
        assert cfg.returncode == 0, cfg.stderr


def test_the_stack_has_its_services_wired_by_health():
    services = _services()
    assert {"postgres", "prefect-server", "minio", "minio-setup", "worker", "worker-gpu"} <= set(services)
    server = services["prefect-server"]
    assert server["command"][:2] == ["server", "start"] and server["command"][server["command"].index("--host") + 1] == "0.0.0.0"
    url = server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert url.startswith("postgresql+asyncpg://") and "@postgres:5432/" in url
    for name, svc in services.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if cond["condition"] == "service_healthy":
                assert services[dep].get("healthcheck"), f"{name} waits for {dep} to be healthy: it has no healthcheck"
            if cond["condition"] == "service_completed_successfully":
                assert services[dep].get("restart") == "no", f"{dep} is a one-shot: it must not restart"
    for name in ("worker", "worker-gpu"):
        w = services[name]
        assert w["depends_on"]["prefect-server"]["condition"] == "service_healthy"
        assert w["depends_on"]["minio-setup"]["condition"] == "service_completed_successfully"
        assert w["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        assert w["environment"]["AWS_ENDPOINT_URL_S3"] == "http://minio:9000"
    # the one-shot creates the bucket the workers are told about
    setup = "\n".join(services["minio-setup"]["command"])
    assert 'mc mb --ignore-existing "local/$$PORCELAIN_BUCKET"' in setup
    gpu = services["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_every_worker_names_a_work_pool_and_every_prefect_option_exists():
    services = _services()
    pools = {}
    for name in ("worker", "worker-gpu"):
        svc = services[name]
        assert svc["entrypoint"] == ["prefect"]
        cmd = svc["command"]
        assert cmd[:2] == ["worker", "start"] and "--pool" in cmd, f"{name}: {cmd}"
        pools[name] = cmd[cmd.index("--pool") + 1]
        assert pools[name] and not pools[name].startswith("-")
        assert cmd[cmd.index("--type") + 1] == "process"
    assert len(set(pools.values())) == 2, "CPU and GPU workers poll different pools"
    commands = {("worker", "start"): services["worker"]["command"],
                ("server", "start"): services["prefect-server"]["command"]}
    script = ("import sys\nfrom prefect.cli import app\n"
              "for cmd in sys.argv[1:]:\n"
              "    sys.argv = ['prefect', *cmd.split(), '--help']\n"
              "    print('=== ' + cmd, flush=True)\n"
              "    try:\n        app()\n    except SystemExit as e:\n        assert not e.code, e.code\n")
    out = subprocess.run([sys.executable, "-c", script, *(" ".join(k) for k in commands)], capture_output=True,
                         text=True, timeout=180, env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    helps = dict(part.split("\n", 1) for part in out.stdout.split("=== ")[1:])
    for k, cmd in commands.items():
        for option in (x for x in cmd if x.startswith("--")):
            assert re.search(rf"{option}\b", helps[" ".join(k)]), f"`prefect {' '.join(k)}` has no option {option}"


def test_no_secret_is_written_into_the_compose_file_images_or_env_example():
    def walk_env(node, where):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "environment":
                    for key, value in (v.items() if isinstance(v, dict) else
                                       [tuple((x.split("=", 1) + [""])[:2]) for x in v]):
                        yield f"{where}.{key}", str(key), str(value)
                else:
                    yield from walk_env(v, f"{where}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                yield from walk_env(v, f"{where}[{i}]")

    checked = 0
    for where, key, value in walk_env(_compose(), "compose"):
        if SECRET_KEY.search(key):
            m = VAR.fullmatch(value)
            assert m and m.group(2) in ("?", ":?"), f"{where} must be a required ${{VAR:?...}} reference, is {value!r}"
            checked += 1
        for cred in re.finditer(r"://[^/\s:@]+:([^@\s]+)@", value):  # user:password@ in a URL
            assert VAR.fullmatch(cred.group(1)), f"{where} has a literal password in its URL"
            checked += 1
    assert checked >= 8
    for text in _strings(_compose()):  # key=value or key: value inside commands and other strings
        literal = re.search(r"(?i)(password|secret)\w*\s*[:=]\s*['\"]?(?!\$)[^\s'\"]", VAR.sub("", text))
        assert not literal, f"literal secret in compose: {text!r}"
    for dockerfile in DOCKERFILES:
        for word, args in _instructions(dockerfile):
            if word in ("ENV", "ARG", "LABEL"):
                assert not SECRET_KEY.search(args), f"{dockerfile.name}: {word} {args} bakes a secret into the image"
            if word in ("COPY", "ADD"):
                assert ".env" not in shlex.split(args), f"{dockerfile.name} copies .env"
    # .env.example leaves every secret empty, and documents every variable compose reads
    example = dict(line.split("=", 1) for line in (DOCKER / ".env.example").read_text().splitlines()
                   if line.strip() and not line.startswith("#"))
    for key, value in example.items():
        if SECRET_KEY.search(key):
            assert value == "", f".env.example gives {key} a value"
    used = {m.group(1) for m in _variables()}
    assert used <= set(example), f"undocumented in .env.example: {sorted(used - set(example))}"
    assert set(_required_variables()) <= {k for k, v in example.items() if v == ""}


def _strings(node) -> list[str]:
    if isinstance(node, dict):
        return [x for k, v in node.items() for x in (*_strings(k), *_strings(v))]
    if isinstance(node, list):
        return [x for v in node for x in _strings(v)]
    return [node] if isinstance(node, str) else []


def _variables() -> list[re.Match]:
    """Every ${...} compose interpolates (in values, not in comments)."""
    return [m for text in _strings(_compose()) for m in VAR.finditer(text)]


def _required_variables() -> list[str]:
    return sorted({m.group(1) for m in _variables() if m.group(2) in ("?", ":?")})


# ---------------------------------------------------------------- images


def test_every_build_context_dockerfile_and_copied_file_exists():
    builds = [s for s in _services().values() if "build" in s]
    assert len(builds) >= 3
    seen = set()
    for svc in builds:
        context, dockerfile = _build_of(svc)
        assert context == ROOT, f"build context {context} should be the repository root"
        assert dockerfile.is_file(), dockerfile
        seen.add(dockerfile)
        patterns = _dockerignore(context, dockerfile)
        for src in _copy_sources(dockerfile):
            assert (context / src).exists(), f"{dockerfile.name} copies {src}, which does not exist"
            assert not _ignored(src, patterns), f"{dockerfile.name} copies {src}, which .dockerignore excludes"
        # the project files pip installs from
        assert {"pyproject.toml", "constraints.txt", "README.md"} <= set(_copy_sources(dockerfile))
    assert seen == {d.resolve() for d in DOCKERFILES}
    # bind mounts that name a host path exist (named volumes are declared)
    declared = set(_compose().get("volumes") or {})
    for name, svc in _services().items():
        for v in svc.get("volumes", []):
            source = _defaults(v if isinstance(v, str) else v["source"]).split(":")[0]
            if source.startswith((".", "/")):
                assert (DOCKER / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in declared, f"{name} mounts undeclared volume {source}"


def test_images_run_as_a_non_root_user_with_pinned_dependencies():
    for dockerfile in DOCKERFILES:
        ins = _instructions(dockerfile)
        words = [w for w, _ in ins]
        users = [a for w, a in ins if w == "USER"]
        assert users and users[-1].split(":")[0] not in ("root", "0"), f"{dockerfile.name} runs as root"
        assert words.index("ENTRYPOINT") > len(words) - 1 - words[::-1].index("USER")
        runs = " ".join(a for w, a in ins if w == "RUN")
        assert "useradd --uid 10001" in runs and "-c constraints.txt ." in runs
        env = " ".join(a for w, a in ins if w == "ENV")
        assert "HF_HUB_OFFLINE=1" in env and "HF_HOME=/models/huggingface" in env
    base = [a for w, a in _instructions(DOCKER / "Dockerfile.gpu") if w == "ARG" and a.startswith("CUDA_IMAGE=")]
    assert base and base[0].startswith("CUDA_IMAGE=nvidia/cuda:") and "runtime" in base[0]
    assert "python3.11" in " ".join(a for w, a in _instructions(DOCKER / "Dockerfile.gpu") if w == "RUN")


CHECK_ENTRYPOINT = r"""
import argparse, contextlib, io, json, sys
commands = json.loads(sys.argv[1])
import deployments.serve, flows.cli, porcelain, tasks
files = {m.__name__: m.__file__ for m in (deployments.serve, flows.cli, porcelain, tasks)}
parsed = {}
original = argparse.ArgumentParser.parse_args
def capture(self, args=None, namespace=None):
    ns = original(self, args, namespace)
    raise SystemExit(json.dumps(vars(ns), default=str))
argparse.ArgumentParser.parse_args = capture
for cmd in commands:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            flows.cli.main(cmd)
        except SystemExit as e:
            parsed[" ".join(cmd)] = {"exit": e.code if not isinstance(e.code, str) else 0,
                                     "args": json.loads(e.code) if isinstance(e.code, str) else None,
                                     "stdout": out.getvalue()}
print("RESULT " + json.dumps({"files": files, "parsed": parsed}))
"""


def _first_party_imports(tree: Path) -> dict[str, set[str]]:
    """Top-level names of this repository (its packages and modules) that files under ``tree`` import."""
    import ast

    ours = {p.name if p.is_dir() else p.stem for p in ROOT.iterdir()
            if (p.is_dir() and (p / "__init__.py").exists()) or (p.is_file() and p.suffix == ".py")}
    found: dict[str, set[str]] = {}
    for f in tree.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            for n in names:
                if n.split(".")[0] in ours:
                    found.setdefault(n.split(".")[0], set()).add(str(f.relative_to(tree)))
    return found


def test_the_image_entry_point_imports_and_parses_its_command_from_the_copied_files(tmp_path):
    """The ENTRYPOINT is the `porcelain` console script. In a tree holding only what the Dockerfiles
    COPY, every module of this repository that the code imports is there, the CLI imports from it and
    each image's CMD parses as a command of the CLI."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    cmds = []
    for dockerfile in DOCKERFILES:
        ins = dict((w, a) for w, a in _instructions(dockerfile) if w in ("ENTRYPOINT", "CMD", "WORKDIR"))
        assert _exec_form(ins["ENTRYPOINT"]) == ["porcelain"] and scripts["porcelain"] == "flows.cli:main"
        assert ins["WORKDIR"] == "/app"
        cmds.append(_exec_form(ins["CMD"]))
    assert _copy_sources(DOCKERFILES[0]) == _copy_sources(DOCKERFILES[1]), "both images carry the same files"
    app = tmp_path / "app"
    app.mkdir()
    for src in _copy_sources(DOCKERFILES[0]):
        s = ROOT / src
        if s.is_dir():
            shutil.copytree(s, app / src, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(s, app / src)
    imported = _first_party_imports(app)
    assert {"porcelain", "flows", "tasks"} <= set(imported)
    missing = {name: sorted(by) for name, by in imported.items() if not (app / name).exists()
               and not (app / f"{name}.py").exists()}
    assert not missing, f"the image's code imports modules the Dockerfiles do not copy: {missing}"

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", CHECK_ENTRYPOINT, json.dumps([["--help"], *cmds])],
                         cwd=app, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(run.stdout.split("RESULT ", 1)[1])
    for name, path in result["files"].items():
        assert Path(path).resolve().is_relative_to(app.resolve()), f"{name} imported from {path}, not the image's files"
    helped = result["parsed"]["--help"]
    assert helped["exit"] == 0 and all(c in helped["stdout"] for c in ("demo", "run", "config"))
    cpu_cmd = result["parsed"][" ".join(cmds[0])]
    assert cpu_cmd["exit"] == 0 and cpu_cmd["args"], f"the CPU image's CMD {cmds[0]} does not parse: {cpu_cmd}"
    assert cpu_cmd["args"]["command"] == "demo" and cpu_cmd["args"]["storage"] == "/runs", cpu_cmd
    assert result["parsed"][" ".join(cmds[1])]["exit"] == 0
