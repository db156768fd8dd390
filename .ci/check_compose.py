#!/usr/bin/env python3
"""Static checks of the Docker setup, for CI machines without a Docker engine.

What it checks (each failure is printed with where it is; exit 1 if any):

* docker-compose.yml parses as Compose reads it (YAML 1.2 scalars, merge keys, no duplicate
  keys), is interpolated like Compose does (``${VAR:-default}``, ``$$``...; defaults only, plus a
  ``.env`` file beside it and, with ``--use-environment``, the process environment) and validates
  against the Compose Specification's JSON Schema (``--schema``, by default
  ``<repo>/../shared/schemas/compose-spec.json``).
* References between services: ``depends_on``, ``links``, ``extends``, ``volumes_from``,
  ``network_mode: service:x`` name existing services, without cycles; a ``service_healthy``
  dependency has a healthcheck; a ``service_completed_successfully`` one does not restart forever;
  named volumes are declared; images of services that are not built are pinned to a tag.
* Every role built from ./Dockerfile runs a real subcommand of the binary, with known options
  and allowed argument values. The command tree comes from running ``--binary PATH --help`` (and
  each subcommand's ``--help``), or, without ``--binary``, from parsing ``src/cli.rs`` (the
  clap ``enum Command``, its nested subcommand enums, flattened option structs and ``ValueEnum``
  types such as ``ConsumerKind`` anywhere under ``src/``).
* Scalable roles (``relay``, ``consume``) set no ``container_name`` and publish no fixed host
  port; no two services publish the same host port.
* Hosts named in the services' ``*_URL`` / ``*_ENDPOINT`` variables are services of the file.
* The OpenTelemetry Collector config mounted into the collector service: pipelines name only
  defined receivers/processors/exporters/connectors, every defined component is used, the OTLP
  receiver listens beyond localhost, exporters point at services of the file.
* Files: ``./`` bind mounts, ``env_file``, build contexts and Dockerfiles exist, and every file
  the Dockerfile COPYs from the context exists and is not excluded by ``.dockerignore``.

Needs Python 3.11+ and ``pip install pyyaml jsonschema``.

    python3 .ci/check_compose.py [--binary target/debug/order-service] [--schema PATH]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

try:
    import jsonschema
    import yaml
except ImportError as missing:  # pragma: no cover - depends on the machine
    print(
        f"check_compose: cannot import {missing.name!r}; run: python3 -m pip install pyyaml jsonschema",
        file=sys.stderr,
    )
    sys.exit(2)

# Roles that several containers may run at once (docker compose up --scale ...).
SCALABLE_SUBCOMMANDS = {"relay", "consume"}
COMPOSE_FILE_NAMES = ["compose.yaml", "compose.yml", "docker-compose.yaml", "docker-compose.yml"]
COLLECTOR_SECTIONS = ("receivers", "processors", "exporters", "connectors", "extensions")
PIPELINE_TYPES = {"traces", "metrics", "logs", "profiles"}


class SetupError(Exception):
    """A problem that stops the checks from running at all (exit 2)."""


class BrokenFile(Exception):
    """A checked file cannot even be parsed: a check failure (exit 1), reported alone."""


# --------------------------------------------------------------------------------------------
# Reporting


class Report:
    def __init__(self) -> None:
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.facts: list[str] = []

    def error(self, where: str, message: str) -> None:
        self.errors.append(f"{where}: {message}")

    def warn(self, where: str, message: str) -> None:
        self.warnings.append(f"{where}: {message}")


# --------------------------------------------------------------------------------------------
# YAML as Compose reads it: YAML 1.2 core scalars (yes/no/on/off stay strings, no sexagesimal
# numbers, no timestamps), merge keys, and duplicate keys are errors (go-yaml v3 rejects them).


class ComposeLoader(yaml.SafeLoader):
    yaml_implicit_resolvers: dict = {}

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:
                    continue
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"found duplicate key {key!r} (first at line {seen[key].start_mark.line + 1})",
                        key_node.start_mark,
                    )
                seen[key] = key_node
        return super().construct_mapping(node, deep)


for _tag, _regexp, _first in [
    ("tag:yaml.org,2002:bool", r"^(?:true|True|TRUE|false|False|FALSE)$", list("tTfF")),
    ("tag:yaml.org,2002:int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", list("-+0123456789")),
    (
        "tag:yaml.org,2002:float",
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
        list("-+0123456789."),
    ),
    ("tag:yaml.org,2002:null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
    ("tag:yaml.org,2002:merge", r"^(?:<<)$", ["<"]),
]:
    ComposeLoader.add_implicit_resolver(_tag, re.compile(_regexp), _first)


def _construct_core_int(loader: ComposeLoader, node: yaml.ScalarNode) -> int:
    value = loader.construct_scalar(node)
    sign = -1 if value.startswith("-") else 1
    digits = value.lstrip("+-")
    if digits.startswith("0o"):
        return sign * int(digits[2:], 8)
    if digits.startswith("0x"):
        return sign * int(digits[2:], 16)
    return sign * int(digits, 10)


ComposeLoader.add_constructor("tag:yaml.org,2002:int", _construct_core_int)
# Compose's own tags (merging several files); one file read alone keeps the tagged value.
for _compose_tag in ("!reset", "!override"):
    ComposeLoader.add_constructor(
        _compose_tag,
        lambda loader, node: (
            loader.construct_mapping(node, deep=True)
            if isinstance(node, yaml.MappingNode)
            else loader.construct_sequence(node, deep=True)
            if isinstance(node, yaml.SequenceNode)
            else loader.construct_scalar(node)
        ),
    )


def load_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise SetupError(f"cannot read {path}: {error}") from error
    try:
        return yaml.load(text, Loader=ComposeLoader)  # noqa: S506 - ComposeLoader is a SafeLoader
    except yaml.YAMLError as error:
        raise BrokenFile(f"{path} is not valid YAML (read as Compose reads it: YAML 1.2 scalars, no duplicate keys): {error}") from error


# --------------------------------------------------------------------------------------------
# Interpolation, as Compose does it before validating.

_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class Interpolator:
    def __init__(self, env: dict[str, str], report: Report) -> None:
        self.env = env
        self.report = report
        self.used: set[str] = set()

    def apply(self, value: Any, where: str) -> Any:
        if isinstance(value, str):
            return self.string(value, where)
        if isinstance(value, list):
            return [self.apply(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, dict):
            return {k: self.apply(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
        return value

    def string(self, text: str, where: str) -> str:
        out: list[str] = []
        i = 0
        while i < len(text):
            ch = text[i]
            if ch != "$":
                out.append(ch)
                i += 1
                continue
            nxt = text[i + 1] if i + 1 < len(text) else ""
            if nxt == "$":
                out.append("$")
                i += 2
            elif nxt == "{":
                end = self._closing_brace(text, i + 2)
                if end < 0:
                    self.report.error(where, f"unterminated ${{...}} in {text!r}")
                    return text
                out.append(self._braced(text[i + 2 : end], where))
                i = end + 1
            else:
                match = _VAR_NAME.match(text, i + 1)
                if not match:
                    self.report.error(where, f"lone '$' in {text!r}: write '$$' for a literal dollar sign")
                    out.append("$")
                    i += 1
                    continue
                out.append(self._lookup(match.group(0), where))
                i = match.end()
        return "".join(out)

    @staticmethod
    def _closing_brace(text: str, start: int) -> int:
        depth = 1
        i = start
        while i < len(text):
            if text.startswith("${", i):
                depth += 1
                i += 2
                continue
            if text[i] == "}":
                depth -= 1
                if depth == 0:
                    return i
            i += 1
        return -1

    def _lookup(self, name: str, where: str) -> str:
        self.used.add(name)
        if name not in self.env:
            self.report.warn(where, f"variable {name} is not set and has no default: it becomes an empty string")
            return ""
        return self.env[name]

    def _braced(self, body: str, where: str) -> str:
        match = _VAR_NAME.match(body)
        if not match:
            self.report.error(where, f"invalid interpolation ${{{body}}}")
            return ""
        name, rest = match.group(0), body[match.end() :]
        self.used.add(name)
        value = self.env.get(name)
        if rest == "":
            return self._lookup(name, where)
        for op in (":-", "-", ":?", "?", ":+", "+"):
            if rest.startswith(op):
                arg = self.string(rest[len(op) :], where)
                unset = value is None
                empty = unset or value == ""
                missing = empty if op.startswith(":") else unset
                if op in (":-", "-"):
                    return arg if missing else value  # type: ignore[return-value]
                if op in (":?", "?"):
                    if missing:
                        self.report.error(where, f"required variable {name} is missing: {arg or 'no message'}")
                        return ""
                    return value  # type: ignore[return-value]
                return "" if missing else arg
        self.report.error(where, f"invalid interpolation ${{{body}}}")
        return ""


def read_dotenv(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    if not path.is_file():
        return env
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key = key.removeprefix("export ").strip()
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key] = value
    return env


# --------------------------------------------------------------------------------------------
# Schema


def validate_schema(doc: Any, schema_path: Path, report: Report) -> None:
    try:
        schema = json.loads(schema_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise SetupError(f"cannot load the JSON Schema {schema_path}: {error}") from error
    declared = str(schema.get("$schema", ""))
    if "draft-07" in declared:
        validator_class = jsonschema.Draft7Validator
    else:
        validator_class = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    validator_class.check_schema(schema)
    validator = validator_class(schema)
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    for error in errors[:25]:
        precise = _precise(error)
        path = _json_path(precise.absolute_path) or "(top level)"
        report.error(f"schema {path}", _message(precise))
    if len(errors) > 25:
        report.error("schema", f"... and {len(errors) - 25} more schema errors")


def _precise(error: Any) -> Any:
    """For a failed oneOf/anyOf, the error of the branch meant for this kind of value."""
    if not error.context:
        return error
    branches: dict[Any, list] = {}
    for sub in error.context:
        branches.setdefault(sub.relative_schema_path[0], []).append(sub)
    fitting = [
        errs
        for errs in branches.values()
        if not any(e.validator == "type" and not e.relative_path for e in errs)
    ]
    if len(fitting) == 1:
        return _precise(max(fitting[0], key=lambda e: len(e.relative_path)))
    return jsonschema.exceptions.best_match(error.context)


def _message(error: Any) -> str:
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = set((error.schema.get("properties") or {}).keys())
        patterns = [re.compile(p) for p in (error.schema.get("patternProperties") or {})]
        extra = [k for k in error.instance if k not in allowed and not any(p.search(k) for p in patterns)]
        if extra:
            return "unknown key(s): " + ", ".join(map(repr, extra))
    return error.message


def _json_path(parts: Any) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# --------------------------------------------------------------------------------------------
# Compose model helpers


def services_of(doc: dict) -> dict[str, dict]:
    services = doc.get("services") or {}
    return {name: (svc or {}) for name, svc in services.items()} if isinstance(services, dict) else {}


def depends_on(svc: dict) -> dict[str, dict]:
    deps = svc.get("depends_on") or {}
    if isinstance(deps, list):
        return {str(d): {"condition": "service_started"} for d in deps}
    if isinstance(deps, dict):
        return {str(k): (v or {}) for k, v in deps.items()}
    return {}


def environment(svc: dict) -> dict[str, str | None]:
    env = svc.get("environment") or {}
    if isinstance(env, dict):
        return {str(k): (None if v is None else str(v)) for k, v in env.items()}
    out: dict[str, str | None] = {}
    for item in env:
        key, sep, value = str(item).partition("=")
        out[key] = value if sep else None
    return out


def as_args(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, list):
        return [str(v) for v in value]
    try:
        return shlex.split(str(value))
    except ValueError:
        return [str(value)]


@dataclass
class Port:
    host_ip: str
    published: str
    target: str
    protocol: str
    text: str


def published_ports(svc: dict) -> list[Port]:
    ports: list[Port] = []
    for entry in svc.get("ports") or []:
        if isinstance(entry, dict):
            if entry.get("published") in (None, ""):
                continue
            ports.append(
                Port(
                    str(entry.get("host_ip") or ""),
                    str(entry["published"]),
                    str(entry.get("target", "")),
                    str(entry.get("protocol") or "tcp"),
                    json.dumps(entry),
                )
            )
            continue
        text = str(entry)
        spec, _, protocol = text.partition("/")
        ip = ""
        if spec.startswith("["):  # [::1]:8080:80
            ip, _, spec = spec[1:].partition("]")
            spec = spec.lstrip(":")
        parts = spec.split(":")
        if len(parts) == 3:
            ip, host, target = parts
        elif len(parts) == 2:
            host, target = parts
        else:
            continue  # container port only: Docker picks a free host port
        if host:
            ports.append(Port(ip, host, target, protocol or "tcp", text))
    return ports


def _expand_port_range(text: str) -> set[int]:
    try:
        if "-" in text:
            lo, hi = text.split("-", 1)
            return set(range(int(lo), int(hi) + 1))
        return {int(text)}
    except ValueError:
        return set()


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


# --------------------------------------------------------------------------------------------
# Service graph checks


def check_services(doc: dict, compose_dir: Path, report: Report) -> None:
    services = services_of(doc)
    if "version" in doc:
        report.error("version", "the top-level `version` key is obsolete in the Compose Specification; remove it")
    if not services:
        report.error("services", "no services defined")
        return
    declared_networks = set((doc.get("networks") or {}).keys()) | {"default"}

    for name, svc in services.items():
        where = f"services.{name}"
        if "image" not in svc and "build" not in svc and "extends" not in svc:
            report.error(where, "has neither `image` nor `build`")
        for dep, spec in depends_on(svc).items():
            if dep == name:
                report.error(f"{where}.depends_on", "a service cannot depend on itself")
            elif dep not in services:
                report.error(f"{where}.depends_on", f"unknown service {dep!r}")
            else:
                _check_condition(services, name, dep, spec.get("condition", "service_started"), report)
        for link in svc.get("links") or []:
            target = str(link).split(":", 1)[0]
            if target not in services:
                report.error(f"{where}.links", f"unknown service {target!r}")
        extends = svc.get("extends")
        if isinstance(extends, str) and extends not in services:
            report.error(f"{where}.extends", f"unknown service {extends!r}")
        elif isinstance(extends, dict) and "file" not in extends and extends.get("service") not in services:
            report.error(f"{where}.extends", f"unknown service {extends.get('service')!r}")
        for source in svc.get("volumes_from") or []:
            text = str(source)
            if text.startswith("container:"):
                continue
            target = text.removeprefix("service:").split(":", 1)[0]
            if target not in services:
                report.error(f"{where}.volumes_from", f"unknown service {target!r}")
        mode = str(svc.get("network_mode") or "")
        if mode.startswith("service:") and mode[len("service:") :] not in services:
            report.error(f"{where}.network_mode", f"unknown service {mode[len('service:'):]!r}")
        networks = svc.get("networks") or []
        for net in networks if isinstance(networks, list) else networks.keys():
            if net not in declared_networks:
                report.error(f"{where}.networks", f"network {net!r} is not declared under top-level networks")
        image = svc.get("image")
        if image and "build" not in svc:
            _check_pinned(where, str(image), report)

    _check_cycles(services, report)
    _check_ports(services, report)


def _check_condition(services: dict, name: str, dep: str, condition: str, report: Report) -> None:
    target = services[dep]
    where = f"services.{name}.depends_on.{dep}"
    if condition == "service_healthy":
        health = target.get("healthcheck") or {}
        test = health.get("test")
        disabled = health.get("disable") is True or (isinstance(test, list) and test[:1] == ["NONE"])
        if not health or disabled or not test:
            report.error(where, f"waits for service_healthy but services.{dep} defines no healthcheck")
    elif condition == "service_completed_successfully":
        restart = str(target.get("restart", "no"))
        if restart in ("always", "unless-stopped"):
            report.error(
                where,
                f"waits for service_completed_successfully but services.{dep} has restart: {restart}",
            )


def _check_pinned(where: str, image: str, report: Report) -> None:
    if "@sha256:" in image:
        return
    last = image.rsplit("/", 1)[-1]
    if ":" not in last:
        report.error(f"{where}.image", f"{image!r} has no tag: pin a version")
    elif last.rsplit(":", 1)[1] == "latest":
        report.error(f"{where}.image", f"{image!r} uses :latest: pin a version")


def _check_cycles(services: dict, report: Report) -> None:
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for dep in depends_on(services.get(node, {})):
            if dep not in services:
                continue
            if state.get(dep) == 1:
                cycle = trail[trail.index(dep) :] + [dep] if dep in trail else [node, dep]
                report.error("depends_on", "dependency cycle: " + " -> ".join(cycle))
            elif dep not in state:
                visit(dep, trail + [dep])
        state[node] = 2

    for name in services:
        if name not in state:
            visit(name, [name])


def _check_ports(services: dict, report: Report) -> None:
    taken: dict[tuple[str, int], str] = {}
    for name, svc in services.items():
        for port in published_ports(svc):
            for number in _expand_port_range(port.published):
                ip = port.host_ip or "0.0.0.0"
                for other_ip in {ip, "0.0.0.0"} if ip != "0.0.0.0" else {ip}:
                    key = (f"{other_ip}/{port.protocol}", number)
                    if key in taken and taken[key] != name:
                        report.error(
                            f"services.{name}.ports",
                            f"host port {number}/{port.protocol} is also published by services.{taken[key]}",
                        )
                taken.setdefault((f"{ip}/{port.protocol}", number), name)


# --------------------------------------------------------------------------------------------
# Files: bind mounts, env files, build contexts, Dockerfile COPY sources vs .dockerignore


def check_files(doc: dict, compose_dir: Path, report: Report) -> tuple[int, int]:
    services = services_of(doc)
    declared_volumes = set((doc.get("volumes") or {}).keys())
    binds = builds = 0
    for name, svc in services.items():
        where = f"services.{name}"
        for i, volume in enumerate(svc.get("volumes") or []):
            kind, source = _volume_source(volume)
            if kind == "bind":
                binds += 1
                path = _host_path(source, compose_dir)
                if not path.exists():
                    report.error(f"{where}.volumes[{i}]", f"bind-mount source {source!r} does not exist ({path})")
            elif kind == "volume" and source and source not in declared_volumes:
                report.error(f"{where}.volumes[{i}]", f"named volume {source!r} is not declared under top-level volumes")
        env_files = svc.get("env_file") or []
        for entry in [env_files] if isinstance(env_files, str) else env_files:
            path_text, required = (entry, True) if isinstance(entry, str) else (entry.get("path"), entry.get("required", True))
            if required and not _host_path(str(path_text), compose_dir).is_file():
                report.error(f"{where}.env_file", f"{path_text!r} does not exist")
        build = svc.get("build")
        if build is not None:
            builds += 1
            context, dockerfile = _build_paths(build, compose_dir)
            if not context.is_dir():
                report.error(f"{where}.build.context", f"{context} is not a directory")
            elif dockerfile is not None and not dockerfile.is_file():
                report.error(f"{where}.build.dockerfile", f"{dockerfile} does not exist")
    for section in ("configs", "secrets"):
        for key, spec in (doc.get(section) or {}).items():
            if isinstance(spec, dict) and spec.get("file"):
                if not _host_path(str(spec["file"]), compose_dir).exists():
                    report.error(f"{section}.{key}.file", f"{spec['file']!r} does not exist")
    return binds, builds


def _volume_source(volume: Any) -> tuple[str, str]:
    if isinstance(volume, dict):
        kind = str(volume.get("type", "volume"))
        return kind, str(volume.get("source") or "")
    text = str(volume)
    parts = text.split(":")
    if len(parts) >= 2 and len(parts[0]) == 1 and parts[0].isalpha():  # C:\path on Windows
        parts = [parts[0] + ":" + parts[1]] + parts[2:]
    if len(parts) == 1:
        return "anonymous", ""
    source = parts[0]
    if source.startswith((".", "/", "~")) or re.match(r"^[A-Za-z]:[\\/]", source):
        return "bind", source
    return "volume", source


def _host_path(source: str, base: Path) -> Path:
    path = Path(os.path.expanduser(source))
    return path if path.is_absolute() else (base / path)


def _build_paths(build: Any, compose_dir: Path) -> tuple[Path, Path | None]:
    if isinstance(build, str):
        return (compose_dir / build).resolve(), (compose_dir / build / "Dockerfile").resolve()
    context = (compose_dir / str(build.get("context", "."))).resolve()
    if build.get("dockerfile_inline"):
        return context, None
    dockerfile = Path(str(build.get("dockerfile", "Dockerfile")))
    return context, (dockerfile if dockerfile.is_absolute() else context / dockerfile).resolve()


@dataclass
class Dockerfile:
    path: Path
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    copies: list[tuple[int, str]] = field(default_factory=list)  # (line, source) from the context


def parse_dockerfile(path: Path) -> Dockerfile:
    result = Dockerfile(path)
    logical: list[tuple[int, str]] = []
    buffer, start = "", 0
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        stripped = raw.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if buffer and stripped.startswith("#"):
            continue
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer += stripped[:-1] + " "
            continue
        logical.append((start, buffer + stripped))
        buffer = ""
    for number, line in logical:
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        rest = rest.strip()
        if instruction == "FROM":
            result.entrypoint, result.cmd = None, None  # only the final stage counts
        elif instruction in ("ENTRYPOINT", "CMD"):
            try:
                value = json.loads(rest) if rest.startswith("[") else ["/bin/sh", "-c", rest]
            except ValueError:
                value = ["/bin/sh", "-c", rest]
            if instruction == "ENTRYPOINT":
                result.entrypoint, result.cmd = value, None  # ENTRYPOINT resets CMD
            else:
                result.cmd = value
        elif instruction in ("COPY", "ADD"):
            words = shlex.split(rest)
            if any(w.startswith("--from") for w in words):
                continue
            args = [w for w in words if not w.startswith("--")]
            if rest.startswith("["):
                try:
                    args = json.loads(rest)
                except ValueError:
                    pass
            if "<<" in rest:  # heredoc
                continue
            for source in args[:-1]:
                if not re.match(r"^[a-z]+://", source):
                    result.copies.append((number, source))
    return result


def read_dockerignore(context: Path) -> list[tuple[bool, re.Pattern[str]]]:
    path = context / ".dockerignore"
    rules: list[tuple[bool, re.Pattern[str]]] = []
    if not path.is_file():
        return rules
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line[1:].strip() if negate else line).lstrip("/")
        rules.append((negate, re.compile(_glob_to_regex(pattern))))
    return rules


def _glob_to_regex(pattern: str) -> str:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        elif pattern[i] == "[":
            end = pattern.find("]", i)
            if end < 0:
                out += re.escape(pattern[i])
                i += 1
            else:
                out += "[" + pattern[i + 1 : end].replace("\\", "\\\\") + "]"
                i = end + 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return f"^{out}$"


def dockerignored(relative: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a parent matches it."""
    parts = relative.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for negate, regex in rules:
        if any(regex.match(c) for c in candidates):
            ignored = not negate
    return ignored


def check_dockerfile_copies(dockerfile: Dockerfile, context: Path, report: Report) -> int:
    rules = read_dockerignore(context)
    checked = 0
    for line, source in dockerfile.copies:
        where = f"{dockerfile.path.name}:{line}"
        matches = sorted(context.glob(source)) if any(c in source for c in "*?[") else [context / source]
        matches = [m for m in matches if m.exists()]
        if not matches:
            report.error(where, f"COPY source {source!r} does not exist in the build context {context}")
            continue
        root = context.resolve()
        for match in matches:
            relative = match.resolve().relative_to(root).as_posix()
            if relative in ("", "."):
                continue
            checked += 1
            if match.is_dir():
                # Docker copies what the exceptions (!pattern) bring back, so a directory is
                # only lost when every file in it is excluded.
                files = [f.resolve().relative_to(root).as_posix() for f in match.rglob("*") if f.is_file()]
                if files and all(dockerignored(f, rules) for f in files):
                    report.error(where, f"COPY source {source!r}: every file in it is excluded by {context / '.dockerignore'}")
            elif dockerignored(relative, rules):
                report.error(where, f"COPY source {source!r} is excluded by {context / '.dockerignore'}")
    return checked


# --------------------------------------------------------------------------------------------
# The binary's command tree


@dataclass
class CliSpec:
    name: str
    subcommands: dict[str, "CliSpec"] = field(default_factory=dict)
    positionals: list[list[str] | None] = field(default_factory=list)  # allowed values, None = any
    options: dict[str, bool] | None = field(default_factory=dict)  # long name -> takes a value
    variadic: bool = False


def spec_from_binary(binary: Path) -> CliSpec:
    if not binary.is_file() or not os.access(binary, os.X_OK):
        raise SetupError(f"--binary {binary} is not an executable file")
    return _spec_from_help(binary, [])


def _run_help(binary: Path, path: list[str]) -> str:
    try:
        done = subprocess.run(
            [str(binary), *path, "--help"],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200"},
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise SetupError(f"running {binary} {' '.join(path)} --help failed: {error}") from error
    if done.returncode != 0:
        raise SetupError(f"{binary} {' '.join(path)} --help exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def _help_sections(text: str) -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        header = re.match(r"^([A-Z][A-Za-z ]*):\s*$", line)
        if header:
            current = header.group(1)
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
    return sections


def _spec_from_help(binary: Path, path: list[str]) -> CliSpec:
    text = _run_help(binary, path)
    sections = _help_sections(text)
    spec = CliSpec(path[-1] if path else binary.name)
    for line in sections.get("Commands", []):
        match = re.match(r"^  (\S+?)(?:,\s*\S+)*(?:\s{2,}|$)", line)
        if not match or match.group(1) == "help":
            continue
        spec.subcommands[match.group(1)] = _spec_from_help(binary, path + [match.group(1)])
    arguments = sections.get("Arguments", [])
    blocks: list[list[str]] = []
    for line in arguments:
        if re.match(r"^  [<\[]", line):
            blocks.append([line])
        elif blocks:
            blocks[-1].append(line)
    for block in blocks:
        body = "\n".join(block)
        values = re.search(r"\[possible values: ([^\]]*)\]", body)
        if values:
            spec.positionals.append([v.strip() for v in values.group(1).split(",") if v.strip()])
        elif "Possible values:" in body:
            spec.positionals.append(re.findall(r"^\s*-\s*([^\s:]+)", body, flags=re.M))
        else:
            spec.positionals.append(None)
        if "..." in block[0]:
            spec.variadic = True
    for line in sections.get("Options", []):
        match = re.match(r"^\s{2,}(?:-\w,\s*)?--([A-Za-z0-9][\w-]*)(?:[ =](<[^>]+>|\[[^\]]+\]))?", line)
        if match:
            spec.options[match.group(1)] = bool(match.group(2))
    return spec


# --- the same tree from the clap derive in src/ ------------------------------------------------

_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<line_comment>//[^\n]*)
  | (?P<block_comment>/\*.*?\*/)
  | (?P<raw_string>b?r(?P<hashes>\#*)".*?"(?P=hashes))
  | (?P<string>b?"(?:\\.|[^"\\])*")
  | (?P<char>'(?:\\.[^']*|[^\\'])')
  | (?P<lifetime>'[A-Za-z_][A-Za-z0-9_]*)
  | (?P<ident>(?:r\#)?[A-Za-z_][A-Za-z0-9_]*)
  | (?P<number>[0-9][0-9A-Za-z_.]*)
  | (?P<punct>::|->|=>|[^\sA-Za-z0-9_])
    """,
    re.S | re.X,
)


@dataclass
class Tok:
    kind: str
    text: str


def tokenize(source: str) -> list[Tok]:
    tokens: list[Tok] = []
    pos = 0
    while pos < len(source):
        match = _TOKEN.match(source, pos)
        if not match:
            pos += 1
            continue
        pos = match.end()
        kind = match.lastgroup or ""
        if kind == "hashes":
            kind = "raw_string"
        if kind in ("ws", "line_comment", "block_comment"):
            continue
        if kind == "raw_string":
            kind = "string"
        tokens.append(Tok(kind, match.group(0)))
    return tokens


def _group_end(tokens: list[Tok], start: int) -> int:
    """Index just past the bracket group opening at tokens[start]."""
    pairs = {"{": "}", "(": ")", "[": "]", "<": ">"}
    opener = tokens[start].text
    closer = pairs[opener]
    depth = 0
    i = start
    while i < len(tokens):
        text = tokens[i].text if tokens[i].kind == "punct" else ""
        if text == opener:
            depth += 1
        elif text == closer:
            depth -= 1
            if depth == 0:
                return i + 1
        elif opener == "<" and text == "->":
            pass
        i += 1
    return len(tokens)


@dataclass
class Item:
    kind: str  # "enum" or "struct"
    name: str
    attrs: str
    body: list[Tok]


@dataclass
class Member:
    attrs: str
    name: str
    type_tokens: list[Tok]
    shape: str = "unit"  # unit, struct, tuple (for enum variants) or field


def parse_items(tokens: list[Tok]) -> dict[str, Item]:
    items: dict[str, Item] = {}
    i = 0
    attrs: list[str] = []
    while i < len(tokens):
        tok = tokens[i]
        if tok.text == "#" and i + 1 < len(tokens) and tokens[i + 1].text in ("[", "!"):
            open_at = i + 1 if tokens[i + 1].text == "[" else i + 2
            end = _group_end(tokens, open_at)
            attrs.append(" ".join(t.text for t in tokens[open_at:end]))
            i = end
            continue
        if tok.kind == "ident" and tok.text in ("enum", "struct") and i + 1 < len(tokens):
            name = tokens[i + 1].text
            j = i + 2
            if j < len(tokens) and tokens[j].text == "<":
                j = _group_end(tokens, j)
            while j < len(tokens) and tokens[j].text not in ("{", ";", "("):
                j += 1  # where clauses
            if j < len(tokens) and tokens[j].text == "{":
                end = _group_end(tokens, j)
                items[name] = Item(tok.text, name, " ".join(attrs), tokens[j + 1 : end - 1])
                i = end
                attrs = []
                continue
        if tok.kind == "ident" and tok.text in ("pub", "crate", "super", "in"):
            i += 1
            continue
        if tok.text in ("(",) and i > 0 and tokens[i - 1].text == "pub":
            i = _group_end(tokens, i)
            continue
        if tok.kind != "punct" or tok.text in (";", "}", "{"):
            attrs = [] if tok.text in (";", "}", "{") or tok.kind == "ident" else attrs
        i += 1
    return items


def split_members(body: list[Tok], is_enum: bool) -> list[Member]:
    members: list[Member] = []
    i = 0
    attrs: list[str] = []
    while i < len(body):
        tok = body[i]
        if tok.text == "#" and i + 1 < len(body) and body[i + 1].text == "[":
            end = _group_end(body, i + 1)
            attrs.append(" ".join(t.text for t in body[i + 1 : end]))
            i = end
            continue
        if tok.text == "pub":
            i += 1
            if i < len(body) and body[i].text == "(":
                i = _group_end(body, i)
            continue
        if tok.kind != "ident":
            i += 1
            continue
        name = tok.text.removeprefix("r#")
        i += 1
        member = Member(" ".join(attrs), name, [])
        attrs = []
        if is_enum:
            if i < len(body) and body[i].text in ("{", "("):
                end = _group_end(body, i)
                member.shape = "struct" if body[i].text == "{" else "tuple"
                member.type_tokens = body[i + 1 : end - 1]
                i = end
            if i < len(body) and body[i].text == "=":
                while i < len(body) and body[i].text != ",":
                    i += 1
        else:
            member.shape = "field"
            if i < len(body) and body[i].text == ":":
                i += 1
            start = i
            depth = 0
            while i < len(body):
                text = body[i].text if body[i].kind == "punct" else ""
                if text in ("<", "(", "["):
                    depth += 1
                elif text in (">", ")", "]"):
                    depth -= 1
                elif text == "," and depth == 0:
                    break
                i += 1
            member.type_tokens = body[start:i]
        members.append(member)
        if i < len(body) and body[i].text == ",":
            i += 1
    return members


def kebab(name: str) -> str:
    words = re.findall(r"[A-Z]+(?=[A-Z][a-z]|[0-9]|$|_)|[A-Z]?[a-z]+|[A-Z]+|[0-9]+", name.replace("_", " "))
    return "-".join(w.lower() for w in words) if words else name.lower()


def _attr_value(attrs: str, key: str) -> str | None:
    match = re.search(rf"\b{key}\s*=\s*(\"(?:\\.|[^\"\\])*\")", attrs)
    return json.loads(match.group(1)) if match else None


def _has(attrs: str, word: str) -> bool:
    return re.search(rf"\b{word}\b", attrs) is not None


def _base_type(tokens: list[Tok]) -> tuple[str, str]:
    """(outer, inner) type names: Option<ConsumerKind> -> ("Option", "ConsumerKind")."""
    idents = [t.text for t in tokens if t.kind == "ident" and t.text not in ("crate", "self", "super")]
    if not idents:
        return "", ""
    outer = idents[0]
    if outer in ("Option", "Vec", "Box") and len(idents) > 1:
        return outer, idents[-1]
    return "", idents[-1]


class SourceCli:
    def __init__(self, src: Path, cli_file: Path, root_enum: str) -> None:
        self.items: dict[str, Item] = {}
        files = sorted(src.rglob("*.rs"))
        if not cli_file.is_file():
            raise SetupError(f"{cli_file} does not exist; pass --binary to read the commands from the binary")
        for path in [cli_file] + [f for f in files if f != cli_file]:
            for name, item in parse_items(tokenize(path.read_text(encoding="utf-8"))).items():
                self.items.setdefault(name, item)
        root = self.items.get(root_enum)
        if root is None or root.kind != "enum":
            raise SetupError(f"no `enum {root_enum}` found in {cli_file}; pass --binary or --cli-enum")
        self.root_enum = root_enum

    def spec(self) -> CliSpec:
        spec = self._enum_spec(self.items[self.root_enum], "order-service")
        parser = next(
            (i for i in self.items.values() if i.kind == "struct" and re.search(r"\bParser\b", i.attrs)),
            None,
        )
        spec.options = {"help": False, "version": False}
        if parser is not None:
            self._collect_fields(parser, spec, set())
        return spec

    def _enum_spec(self, item: Item, name: str) -> CliSpec:
        spec = CliSpec(name, options=None)
        for variant in split_members(item.body, is_enum=True):
            if _has(variant.attrs, "skip") or _has(variant.attrs, "external_subcommand"):
                continue
            command = _attr_value(variant.attrs, "name") or kebab(variant.name)
            child = CliSpec(command, options={"help": False})
            if variant.shape == "struct":
                fields = split_members(variant.type_tokens, is_enum=False)
                self._apply_fields(fields, child, set())
            elif variant.shape == "tuple":
                _, inner = _base_type(variant.type_tokens)
                target = self.items.get(inner)
                if target is not None and target.kind == "enum":
                    nested = self._enum_spec(target, command)
                    child.subcommands = nested.subcommands
                elif target is not None:
                    self._collect_fields(target, child, set())
                else:
                    child.options = None
            spec.subcommands[command] = child
            for alias in re.findall(r"\balias\s*=\s*\"([^\"]+)\"", variant.attrs):
                spec.subcommands[alias] = child
        return spec

    def _collect_fields(self, item: Item, spec: CliSpec, seen: set[str]) -> None:
        if item.name in seen:
            return
        seen.add(item.name)
        self._apply_fields(split_members(item.body, is_enum=False), spec, seen)

    def _apply_fields(self, fields: list[Member], spec: CliSpec, seen: set[str]) -> None:
        for member in fields:
            attrs = member.attrs
            outer, inner = _base_type(member.type_tokens)
            if re.search(r"\bcommand\s*\(\s*subcommand\b", attrs):
                target = self.items.get(inner)
                if target is not None and target.kind == "enum":
                    spec.subcommands.update(self._enum_spec(target, spec.name).subcommands)
                continue
            if re.search(r"\b(?:command|clap)\s*\(\s*flatten\b", attrs):
                target = self.items.get(inner)
                if target is None:
                    spec.options = None
                else:
                    self._collect_fields(target, spec, seen)
                continue
            if _has(attrs, "skip"):
                continue
            arg_attrs = " ".join(re.findall(r"\b(?:arg|clap)\s*\((.*)\)", attrs))
            is_option = re.search(r"\blong\b", arg_attrs) or re.search(r"\bshort\b", arg_attrs)
            if is_option:
                long_name = _attr_value(arg_attrs, "long") or kebab(member.name)
                takes_value = not (inner == "bool" and not outer) or re.search(r"\baction\b", arg_attrs) is not None
                if inner == "bool" and re.search(r"ArgAction\s*::\s*Set\b", arg_attrs) is None:
                    takes_value = False
                if re.search(r"\blong\b", arg_attrs) and spec.options is not None:
                    spec.options[long_name] = takes_value
                continue
            if inner == "bool" and not outer:
                continue
            spec.positionals.append(self._allowed_values(inner, arg_attrs))
            if outer == "Vec":
                spec.variadic = True

    def _allowed_values(self, type_name: str, arg_attrs: str) -> list[str] | None:
        parser = re.search(r"value_parser\s*=\s*\[([^\]]*)\]", arg_attrs)
        if parser:
            return re.findall(r"\"([^\"]*)\"", parser.group(1))
        target = self.items.get(type_name)
        if target is None or target.kind != "enum" or not re.search(r"\bValueEnum\b", target.attrs):
            return None
        values = []
        for variant in split_members(target.body, is_enum=True):
            if re.search(r"\bvalue\s*\(\s*skip\b", variant.attrs):
                continue
            values.append(_attr_value(variant.attrs, "name") or kebab(variant.name))
            values += re.findall(r"\balias\s*=\s*\"([^\"]+)\"", variant.attrs)
        return values


# --- checking one command against the tree -----------------------------------------------------


def check_args(args: list[str], spec: CliSpec, where: str, report: Report) -> str | None:
    """Returns the first-level subcommand, or None when the command is not valid."""
    node = spec
    path: list[str] = []
    positionals: list[str] = []
    i = 0
    first: str | None = None
    while i < len(args):
        arg = args[i]
        if arg == "--":
            positionals += args[i + 1 :]
            break
        if arg.startswith("--") and len(arg) > 2:
            name, has_value, _ = arg[2:].partition("=")
            if node.options is not None and name not in node.options:
                report.error(where, f"`{' '.join([spec.name, *path])}` has no option --{name}")
                return None
            takes = node.options.get(name, False) if node.options is not None else (not has_value and i + 1 < len(args) and not args[i + 1].startswith("-") and args[i + 1] not in node.subcommands)
            i += 2 if takes and not has_value else 1
            continue
        if arg.startswith("-") and len(arg) > 1:
            i += 1  # short flags are not checked
            continue
        if node.subcommands and not positionals:
            if arg not in node.subcommands:
                known = ", ".join(sorted(node.subcommands))
                report.error(where, f"{arg!r} is not a subcommand of `{' '.join([spec.name, *path])}` (known: {known})")
                return None
            path.append(arg)
            first = first or arg
            node = node.subcommands[arg]
            i += 1
            continue
        positionals.append(arg)
        i += 1
    if node.subcommands:
        report.error(where, f"`{' '.join([spec.name, *path])}` needs a subcommand ({', '.join(sorted(node.subcommands))})")
        return None
    if len(positionals) > len(node.positionals) and not node.variadic:
        report.error(where, f"`{' '.join([spec.name, *path])}` takes {len(node.positionals)} argument(s), got {positionals}")
        return None
    for value, allowed in zip(positionals, node.positionals):
        if allowed is not None and value not in allowed:
            report.error(where, f"{value!r} is not one of {allowed} for `{' '.join([spec.name, *path])}`")
            return None
    return first


def check_roles(
    doc: dict, compose_dir: Path, repo: Path, spec: CliSpec, source: str, report: Report
) -> tuple[int, dict[str, str], Dockerfile | None]:
    services = services_of(doc)
    built_images: set[str] = set()
    role_names: list[str] = []
    dockerfile: Dockerfile | None = None
    repo_dockerfile = (repo / "Dockerfile").resolve()
    for name, svc in services.items():
        build = svc.get("build")
        if build is None:
            continue
        context, path = _build_paths(build, compose_dir)
        if path == repo_dockerfile:
            role_names.append(name)
            if svc.get("image"):
                built_images.add(str(svc["image"]))
    for name, svc in services.items():
        if name not in role_names and svc.get("image") and str(svc["image"]) in built_images:
            role_names.append(name)
    if not role_names:
        report.error("services", f"no service is built from {repo_dockerfile}")
        return 0, {}, None
    if repo_dockerfile.is_file():
        dockerfile = parse_dockerfile(repo_dockerfile)
    roles: dict[str, str] = {}
    for name in role_names:
        svc = services[name]
        where = f"services.{name}.command"
        if svc.get("entrypoint") is not None:
            report.warn(f"services.{name}.entrypoint", "overrides the image's entrypoint; its command is not checked")
            continue
        args = as_args(svc.get("command"))
        if args is None:
            args = list(dockerfile.cmd or []) if dockerfile else []
            where = f"services.{name} (the Dockerfile's CMD)"
        if not args:
            report.error(where, "runs the binary without a subcommand")
            continue
        subcommand = check_args(args, spec, where, report)
        if subcommand is None:
            continue
        roles[name] = subcommand
        if subcommand in SCALABLE_SUBCOMMANDS:
            if svc.get("container_name"):
                report.error(f"services.{name}.container_name", "a fixed container name stops `--scale` of this role")
            if published_ports(svc):
                report.error(f"services.{name}.ports", "a fixed host port stops `--scale` of this role")
    for name, svc in services.items():
        if svc.get("container_name") and name not in roles:
            report.warn(f"services.{name}.container_name", "fixes the container name: two copies of the stack would clash")
    names = [environment(services[n]).get("OTEL_SERVICE_NAME") for n in roles]
    seen: dict[str, str] = {}
    for role, otel_name in zip(roles, names):
        if otel_name and otel_name in seen and roles[role] != "migrate":
            report.warn(f"services.{role}.environment.OTEL_SERVICE_NAME", f"{otel_name!r} is also used by services.{seen[otel_name]}")
        elif otel_name:
            seen[otel_name] = role
    report.facts.append(f"{len(roles)} role commands are real `{spec.name}` subcommands (from {source})")
    return len(roles), roles, dockerfile


# --------------------------------------------------------------------------------------------
# Hosts named in URLs


def known_hosts(doc: dict) -> set[str]:
    hosts = {"localhost", "host.docker.internal"}
    for name, svc in services_of(doc).items():
        hosts.add(name)
        for key in ("hostname", "container_name"):
            if svc.get(key):
                hosts.add(str(svc[key]))
        networks = svc.get("networks")
        if isinstance(networks, dict):
            for net in networks.values():
                hosts.update(str(a) for a in (net or {}).get("aliases") or [])
        extra = svc.get("extra_hosts") or []
        entries = extra.keys() if isinstance(extra, dict) else [str(e).split(":", 1)[0].split("=", 1)[0] for e in extra]
        hosts.update(entries)
    return hosts


def check_urls(doc: dict, report: Report) -> None:
    hosts = known_hosts(doc)
    for name, svc in services_of(doc).items():
        for key, value in environment(svc).items():
            if not value or not re.search(r"(_URL|_URI|_ENDPOINT|_ADDR)$", key) or "://" not in value:
                continue
            try:
                host = urlsplit(value).hostname or ""
            except ValueError:
                report.error(f"services.{name}.environment.{key}", "is not a valid URL")
                continue
            if host and not is_ip(host) and host not in hosts:
                report.error(f"services.{name}.environment.{key}", f"host {host!r} is not a service of this file")


# --------------------------------------------------------------------------------------------
# OpenTelemetry Collector config


def find_collector(doc: dict, compose_dir: Path) -> tuple[str, Path, str] | None:
    for name, svc in services_of(doc).items():
        image = str(svc.get("image") or "")
        if "opentelemetry-collector" not in image and "otelcol" not in image:
            continue
        args = as_args(svc.get("command")) or []
        config_target = None
        for i, arg in enumerate(args):
            if arg.startswith("--config="):
                config_target = arg.split("=", 1)[1]
            elif arg == "--config" and i + 1 < len(args):
                config_target = args[i + 1]
        if config_target is None:
            config_target = "/etc/otelcol-contrib/config.yaml" if "contrib" in image else "/etc/otelcol/config.yaml"
        for volume in svc.get("volumes") or []:
            kind, source = _volume_source(volume)
            target = volume.get("target") if isinstance(volume, dict) else str(volume).split(":")[1]
            if kind == "bind" and target == config_target:
                return name, _host_path(source, compose_dir), config_target
        if config_target.startswith(("file:", "env:", "http:", "https:", "yaml:")):
            return None
        return name, Path(), config_target
    return None


def check_collector(config_path: Path, where_svc: str, doc: dict, report: Report) -> None:
    where = config_path.name
    config = load_yaml(config_path)
    if not isinstance(config, dict):
        report.error(where, "is not a mapping")
        return
    defined: dict[str, set[str]] = {}
    for section in COLLECTOR_SECTIONS:
        entries = config.get(section) or {}
        if not isinstance(entries, dict):
            report.error(f"{where} {section}", "must be a mapping")
            entries = {}
        defined[section] = set(map(str, entries))
        for component in entries:
            if not re.match(r"^[a-z][a-z0-9_]*(?:/[^/\s]+)?$", str(component)):
                report.error(f"{where} {section}.{component}", "is not a valid component id (type[/name])")
    service = config.get("service") or {}
    pipelines = service.get("pipelines") or {}
    if not pipelines:
        report.error(f"{where} service.pipelines", "no pipeline defined")
    used: dict[str, set[str]] = {s: set() for s in COLLECTOR_SECTIONS}
    connector_as_exporter: set[str] = set()
    connector_as_receiver: set[str] = set()
    for pipeline, body in pipelines.items():
        pwhere = f"{where} service.pipelines.{pipeline}"
        if str(pipeline).split("/", 1)[0] not in PIPELINE_TYPES:
            report.error(pwhere, f"unknown signal type; use one of {sorted(PIPELINE_TYPES)}")
        body = body or {}
        for section in ("receivers", "processors", "exporters"):
            names = body.get(section) or []
            if not isinstance(names, list):
                report.error(f"{pwhere}.{section}", "must be a list")
                continue
            if section != "processors" and not names:
                report.error(f"{pwhere}.{section}", f"a pipeline needs at least one of its {section}")
            for dup in {n for n in names if names.count(n) > 1}:
                report.error(f"{pwhere}.{section}", f"{dup!r} is listed twice")
            for component in map(str, names):
                if component in defined[section]:
                    used[section].add(component)
                elif section != "processors" and component in defined["connectors"]:
                    (connector_as_receiver if section == "receivers" else connector_as_exporter).add(component)
                else:
                    report.error(f"{pwhere}.{section}", f"{component!r} is not defined under {section}")
        processors = [str(p) for p in body.get("processors") or []]
        limiter = [p for p in processors if p.split("/")[0] == "memory_limiter"]
        if limiter and processors[0] != limiter[0]:
            report.warn(f"{pwhere}.processors", "memory_limiter should come first")
    for section in ("receivers", "processors", "exporters"):
        for unused in sorted(defined[section] - used[section]):
            report.error(f"{where} {section}.{unused}", "is defined but used by no pipeline")
    for connector in sorted(defined["connectors"]):
        if connector not in connector_as_exporter or connector not in connector_as_receiver:
            report.error(f"{where} connectors.{connector}", "must be an exporter of one pipeline and a receiver of another")
    listed_extensions = [str(e) for e in service.get("extensions") or []]
    for ext in listed_extensions:
        if ext not in defined["extensions"]:
            report.error(f"{where} service.extensions", f"{ext!r} is not defined under extensions")
    for ext in sorted(defined["extensions"] - set(listed_extensions)):
        report.error(f"{where} extensions.{ext}", "is defined but not listed in service.extensions")

    receiver_ports = _check_receiver_endpoints(config, where, report)
    hosts = known_hosts(doc)
    for exporter, body in (config.get("exporters") or {}).items():
        endpoint = str((body or {}).get("endpoint") or "")
        if not endpoint:
            continue
        host = (urlsplit(endpoint).hostname if "://" in endpoint else endpoint.rsplit(":", 1)[0]) or ""
        if host and not is_ip(host) and host not in hosts:
            report.error(f"{where} exporters.{exporter}.endpoint", f"host {host!r} is not a service of the compose file")
    # The roles' OTLP endpoint must reach a port the collector listens on.
    for name, svc in services_of(doc).items():
        endpoint = environment(svc).get("OTEL_EXPORTER_OTLP_ENDPOINT")
        if not endpoint or "://" not in endpoint:
            continue
        parts = urlsplit(endpoint)
        if parts.hostname == where_svc and parts.port and receiver_ports and parts.port not in receiver_ports:
            report.error(
                f"services.{name}.environment.OTEL_EXPORTER_OTLP_ENDPOINT",
                f"port {parts.port} is none of the collector's receiver ports {sorted(receiver_ports)}",
            )
    total = sum(len(defined[s]) for s in ("receivers", "processors", "exporters", "connectors"))
    report.facts.append(f"{where}: {len(pipelines)} pipeline(s), all {total} components defined and used")


def _check_receiver_endpoints(config: dict, where: str, report: Report) -> set[int]:
    ports: set[int] = set()
    for receiver, body in (config.get("receivers") or {}).items():
        if str(receiver).split("/")[0] != "otlp":
            continue
        protocols = (body or {}).get("protocols") or {}
        if not protocols:
            report.error(f"{where} receivers.{receiver}", "enables no protocol (grpc/http)")
        for protocol, settings in protocols.items():
            default = "4317" if protocol == "grpc" else "4318"
            endpoint = str((settings or {}).get("endpoint") or "")
            if not endpoint:
                report.error(
                    f"{where} receivers.{receiver}.protocols.{protocol}",
                    f"no endpoint: the collector then listens on localhost:{default} only, out of other containers' reach",
                )
                ports.add(int(default))
                continue
            host, _, port = endpoint.rpartition(":")
            if host in ("localhost", "127.0.0.1", "::1", "[::1]"):
                report.error(f"{where} receivers.{receiver}.protocols.{protocol}.endpoint", f"{endpoint} is unreachable from other containers")
            if port.isdigit():
                ports.add(int(port))
    return ports


# --------------------------------------------------------------------------------------------


def locate_compose(repo: Path, explicit: str | None, report: Report) -> Path:
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise SetupError(f"{path} does not exist")
        return path
    present = [repo / n for n in COMPOSE_FILE_NAMES if (repo / n).is_file()]
    if not present:
        raise SetupError(f"no compose file in {repo} (looked for {', '.join(COMPOSE_FILE_NAMES)})")
    if len(present) > 1:
        report.error(
            present[1].name,
            f"{present[0].name} also exists and `docker compose` reads only that one; keep one file",
        )
    for override in ("compose.override.yaml", "compose.override.yml", "docker-compose.override.yml", "docker-compose.override.yaml"):
        if (repo / override).is_file():
            report.warn(override, "is merged by `docker compose` automatically and is not checked here")
    return present[0]


def main(argv: list[str] | None = None) -> int:
    repo_default = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=repo_default, help="repository root (default: %(default)s)")
    parser.add_argument("--compose", help="compose file (default: the one `docker compose` picks in --repo)")
    parser.add_argument("--schema", type=Path, help="Compose JSON Schema (default: <repo>/../shared/schemas/compose-spec.json)")
    parser.add_argument("--binary", type=Path, help="built binary whose --help lists the subcommands (default: parse src/cli.rs)")
    parser.add_argument("--cli-source", type=Path, help="file with the clap command enum (default: <repo>/src/cli.rs)")
    parser.add_argument("--cli-enum", default="Command", help="name of the root subcommand enum (default: %(default)s)")
    parser.add_argument("--collector-config", type=Path, help="collector config (default: the file mounted into the collector service)")
    parser.add_argument("--use-environment", action="store_true", help="interpolate with this process's environment too")
    parser.add_argument("--strict", action="store_true", help="treat warnings as errors")
    args = parser.parse_args(argv)

    report = Report()
    try:
        repo = args.repo.resolve()
        compose_path = locate_compose(repo, args.compose, report)
        compose_dir = compose_path.resolve().parent
        schema = args.schema or (repo.parent / "shared" / "schemas" / "compose-spec.json")
        if not schema.is_file():
            raise SetupError(f"JSON Schema {schema} not found (pass --schema)")

        raw = load_yaml(compose_path)
        if not isinstance(raw, dict):
            raise SetupError(f"{compose_path} is not a mapping")
        env = read_dotenv(compose_dir / ".env")
        if args.use_environment:
            env.update(os.environ)
        doc = Interpolator(env, report).apply(raw, "")
        validate_schema(doc, schema, report)
        check_services(doc, compose_dir, report)
        binds, builds = check_files(doc, compose_dir, report)

        if args.binary:
            spec, source = spec_from_binary(args.binary.resolve()), f"{args.binary} --help"
        else:
            cli_file = (args.cli_source or repo / "src" / "cli.rs").resolve()
            spec = SourceCli(cli_file.parent if cli_file.parent.name == "src" else repo / "src", cli_file, args.cli_enum).spec()
            spec.name = "order-service"
            source = str(cli_file.relative_to(repo) if cli_file.is_relative_to(repo) else cli_file)
        _, _, dockerfile = check_roles(doc, compose_dir, repo, spec, source, report)
        copies = check_dockerfile_copies(dockerfile, repo, report) if dockerfile else 0
        check_urls(doc, report)

        collector = find_collector(doc, compose_dir)
        if args.collector_config:
            check_collector(args.collector_config, collector[0] if collector else "", doc, report)
        elif collector is None:
            report.warn("services", "no OpenTelemetry Collector service found; collector config not checked")
        elif collector[1] == Path():
            report.error(f"services.{collector[0]}", f"no bind mount provides its config file {collector[2]}")
        elif collector[1].is_file():
            check_collector(collector[1], collector[0], doc, report)
    except SetupError as error:
        print(f"check_compose: {error}", file=sys.stderr)
        return 2
    except BrokenFile as error:
        print(f"error: {error}", file=sys.stderr)
        print("FAILED: a file could not be parsed", file=sys.stderr)
        return 1

    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    problems = report.errors + (report.warnings if args.strict else [])
    if problems:
        for error in report.errors:
            print(f"error: {error}", file=sys.stderr)
        print(f"FAILED: {len(problems)} problem(s) in the Docker setup", file=sys.stderr)
        return 1
    summary = [
        f"{compose_path.name}: {len(services_of(doc))} services valid against {schema.name}",
        *report.facts,
        f"{binds} bind mount(s), {builds} build(s) and {copies} Dockerfile COPY source(s) present",
    ]
    print("OK: " + "; ".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
