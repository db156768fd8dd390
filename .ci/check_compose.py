#!/usr/bin/env python3
"""Static checks of docker-compose.yml that no existing tool makes for us.

    python3 .ci/check_compose.py --binary target/debug/order-service [--compose docker-compose.yml]

1. The file: with its ${VAR:-default} defaults substituted, it validates against the Compose
   JSON Schema (<repo>/../shared/schemas/compose-spec.json); bind-mounted YAML (the collector's)
   parses. Duplicate keys, which PyYAML hides by keeping the last, are yamllint's job.
2. References: depends_on names services, service_healthy targets have a healthcheck,
   service_completed_successfully ones do not restart forever; named volumes and networks are
   declared, bind-mount sources exist; URL hosts in environments (DATABASE_URL, AMQP_URL,
   OTEL_EXPORTER_OTLP_ENDPOINT...) are services; no host port is published twice, and the
   scalable roles (relay, consume) publish none and set no container_name (--scale works).
3. The binary: services running its image run a real subcommand (options and argument values
   included) and set only variables it reads: an [env: NAME] of one of its --help pages,
   RUST_LOG (log filter) or OTEL_* (OpenTelemetry SDK).

Why not `docker compose config`: CI has no Compose plugin, hence the schema and reference checks
here; and Compose accepts a service_healthy target without healthcheck (`up` fails later), sees
URLs as opaque strings and knows nothing of our binary. Collector pipelines are for `otelcol
validate`, the Dockerfile for `docker build`. Exit 1 listing every problem found, else 0.
"""

import argparse
import difflib
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import yaml

REPO = Path(__file__).resolve().parent.parent
SCHEMA = REPO.parent / "shared/schemas/compose-spec.json"  # the Compose Specification's, read-only
RESTARTS = {"always", "unless-stopped"}  # restart policies under which a one-shot never "completes"
SCALABLE = {"relay", "consume"}  # subcommands that `docker compose up --scale` may run many times
EXTRA_ENV, EXTRA_ENV_PREFIX = {"RUST_LOG"}, "OTEL_"  # read outside clap, so not in --help
VAR = re.compile(r"\$(?:\$|\{(\w+)(?:(:?[-?+])((?:[^{}]|\$\{[^{}]*\})*))?\}|\w+)")


# --- 1. the file -----------------------------------------------------------------------------
def interpolate(value, problems: list[str]):
    """Compose's ${VAR...} substitution with every variable unset, so the defaults apply."""
    if isinstance(value, dict):
        return {k: interpolate(v, problems) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, problems) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(m: re.Match) -> str:
        name, op, arg = m.groups()
        if m.group(0) == "$$":
            return "$"
        if op in (":?", "?"):
            problems.append(f"variable {name} is required and has no default ({value!r})")
        return interpolate(arg, problems) if op in (":-", "-") else ""  # ${VAR}, $VAR, ${VAR:+x}: empty

    return VAR.sub(substitute, value)


def validate_schema(doc: dict, schema_path: Path) -> list[str]:
    validator = jsonschema.Draft7Validator(json.loads(schema_path.read_text(encoding="utf-8")))
    problems = []
    for error in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path))):
        best = jsonschema.exceptions.best_match([error])  # inside a oneOf, the branch meant
        message = best.message
        if best.validator == "additionalProperties":  # jsonschema's message names the regexes, not the keys
            patterns, known = best.schema.get("patternProperties", {}), best.schema.get("properties", {})
            extra = [k for k in best.instance if k not in known and not any(re.search(r, k) for r in patterns)]
            message = f"unknown key(s) {', '.join(map(repr, extra))}"
        problems.append(f"schema: {'.'.join(map(str, best.absolute_path)) or '(top)'}: {message}")
    return problems


def yaml_problem(path: Path) -> str | None:
    """Why a bind-mounted YAML file (otel-collector.yaml) is broken; `otelcol validate` checks the rest."""
    try:
        return None if isinstance(yaml.safe_load(path.read_text(encoding="utf-8")), dict) else "is not a YAML mapping"
    except yaml.YAMLError as error:
        return f"is not valid YAML: {error}"


# --- 2. references ---------------------------------------------------------------------------
def env_of(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    env = dict(str(e).partition("=")[::2] for e in env) if isinstance(env, list) else env  # KEY=value list
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def check_depends_on(services: dict) -> list[str]:
    problems = []
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        for dep, spec in ({d: {} for d in deps} if isinstance(deps, list) else deps).items():
            where, target = f"services.{name}.depends_on.{dep}", services.get(dep)
            condition = (spec or {}).get("condition", "service_started")
            if target is None:
                problems.append(f"{where}: no service {dep!r} in this file")
            elif condition == "service_healthy" and not (target.get("healthcheck") or {}).get("test"):
                problems.append(f"{where}: waits for service_healthy but services.{dep} has no healthcheck")
            elif condition == "service_completed_successfully" and (restart := target.get("restart")) in RESTARTS:
                problems.append(f"{where}: waits for it to complete but services.{dep} has restart: {restart}")
    return problems


def volume_source(volume) -> tuple[str, str]:
    """('bind' | 'volume' | 'anonymous', source) of a short- or long-syntax volume."""
    if isinstance(volume, dict):
        return str(volume.get("type", "volume")), str(volume.get("source") or "")
    parts = str(volume).split(":")  # source:target[:mode], or a target alone (anonymous volume)
    kind = "anonymous" if len(parts) == 1 else "bind" if parts[0].startswith((".", "/", "~")) else "volume"
    return kind, parts[0] if len(parts) > 1 else ""


def check_volumes_networks(doc: dict, services: dict, base: Path) -> list[str]:
    problems, volumes, networks = [], set(doc.get("volumes") or {}), set(doc.get("networks") or {}) | {"default"}
    for name, svc in services.items():
        for kind, source in map(volume_source, svc.get("volumes") or []):
            path = base / os.path.expanduser(source)
            if kind == "volume" and source and source not in volumes:
                problems.append(f"services.{name}.volumes: volume {source!r} is not declared under top-level volumes")
            elif kind == "bind" and not path.exists():
                problems.append(f"services.{name}.volumes: bind-mount source {source!r} does not exist")
            elif kind == "bind" and path.is_file() and path.suffix in (".yaml", ".yml") and (why := yaml_problem(path)):
                problems.append(f"services.{name}.volumes: {source} {why}")
        for net in svc.get("networks") or []:
            if net not in networks:
                problems.append(f"services.{name}.networks: network {net!r} is not declared under top-level networks")
    return problems


def check_urls(services: dict) -> list[str]:
    """The host of every URL in an environment is a service (or its hostname, alias...)."""
    hosts = {"localhost", "host.docker.internal", *services}
    for svc in services.values():
        hosts |= {str(svc[k]) for k in ("hostname", "container_name") if svc.get(k)}
        if isinstance(svc.get("networks"), dict):
            hosts |= {str(a) for net in svc["networks"].values() for a in (net or {}).get("aliases") or []}
    problems = []
    for name, svc in services.items():
        for key, value in env_of(svc).items():
            host = urlsplit(value).hostname if "://" in value else None
            if host and not re.fullmatch(r"[\d.]+|.*:.*", host) and host not in hosts:  # IPs are fine
                problems.append(f"services.{name}.environment.{key}: host {host!r} is not a service of this file")
    return problems


def host_ports(svc: dict) -> list[tuple[str, str]]:
    """(host ip, "port/protocol") of each fixed host port; container-only ports and ranges are skipped."""
    out = []
    for entry in svc.get("ports") or []:
        if isinstance(entry, dict):
            ip, host, proto = entry.get("host_ip"), str(entry.get("published") or ""), entry.get("protocol")
        else:  # [[ip:]host:]container[/protocol]
            spec, _, proto = str(entry).partition("/")
            ip, host, _ = ["", "", *spec.rsplit(":", 2)][-3:]
        if host.isdigit():
            out.append((str(ip or "0.0.0.0").strip("[]"), f"{host}/{proto or 'tcp'}"))
    return out


def check_ports(services: dict, roles: dict[str, str]) -> list[str]:
    problems, taken = [], []
    for name, svc in services.items():
        if roles.get(name) in SCALABLE and svc.get("container_name"):
            problems.append(f"services.{name}.container_name: a fixed container name stops `--scale` of this role")
        if roles.get(name) in SCALABLE and host_ports(svc):
            problems.append(f"services.{name}.ports: a fixed host port stops `--scale` of this role")
        for ip, port in host_ports(svc):
            for other, o_ip, o_port in taken:
                if other != name and port == o_port and (ip == o_ip or "0.0.0.0" in (ip, o_ip)):
                    problems.append(f"services.{name}.ports: host port {port} is also published by services.{other}")
            taken.append((name, ip, port))
    return problems


# --- 3. the binary ---------------------------------------------------------------------------
@dataclass
class Cli:
    name: str
    commands: dict[str, "Cli"] = field(default_factory=dict)
    args: list[list[str] | None] = field(default_factory=list)  # positionals: allowed values or None
    options: dict[str, bool] = field(default_factory=dict)  # --long name -> takes a value
    env: set[str] = field(default_factory=set)  # variables read by this command and its subcommands


def read_cli(binary: Path, path: list[str]) -> Cli:
    """The command tree, from `binary <path> --help` recursively."""
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "1000"}  # no colours, no wrapped lines
    done = subprocess.run([binary, *path, "--help"], capture_output=True, text=True, timeout=30, env=env)
    if done.returncode != 0:
        sys.exit(f"error: `{binary} {' '.join(path)} --help` exited {done.returncode}: {done.stderr.strip()}")
    sections: dict[str, list[str]] = {}
    for line in done.stdout.splitlines():
        if header := re.match(r"^([A-Z][A-Za-z ]*):\s*$", line):
            current = sections.setdefault(header.group(1), [])
        elif sections:
            current.append(line)
    cli = Cli(path[-1] if path else binary.name, env=set(re.findall(r"\[env:\s*(\w+)", done.stdout)))
    for line in sections.get("Commands", []):
        if (m := re.match(r"^  ([\w-]+)", line)) and m.group(1) != "help":
            cli.commands[m.group(1)] = read_cli(binary, [*path, m.group(1)])
            cli.env |= cli.commands[m.group(1)].env
    for block in re.split(r"\n(?=  [<\[])", "\n".join(sections.get("Arguments", [])).strip("\n")):
        if block:  # `[possible values: a, b]` in short help, a `- a: ...` list in long help
            inline = re.search(r"\[possible values: ([^\]]*)\]", block)
            listed = re.findall(r"^\s*- ([^\s:]+)", block, re.M)
            cli.args.append([v.strip() for v in inline.group(1).split(",")] if inline else listed or None)
    for line in sections.get("Options", []):
        if m := re.match(r"^ {2,6}(?:-\w, )?--([\w-]+)([ =][<\[])?", line):
            cli.options[m.group(1)] = bool(m.group(2))
    return cli


def check_args(args: list[str], root: Cli) -> tuple[str | None, str | None]:
    """(first subcommand, None) if `root args` is a valid command line, else (None, what is wrong)."""
    node, path, positionals, i = root, [root.name], [], 0
    while i < len(args):
        arg, i, usage = args[i], i + 1, f"`{' '.join(path)}`"
        if arg.startswith("--"):
            name, eq, _ = arg[2:].partition("=")
            if name not in node.options:
                return None, f"{usage} has no option --{name} (known: {', '.join(node.options)})"
            i += node.options[name] and not eq  # skip the option's value
        elif arg.startswith("-"):
            continue  # short flags are not checked
        elif node.commands:
            if arg not in node.commands:
                return None, f"{arg!r} is not a subcommand of {usage} (known: {', '.join(node.commands)})"
            node = node.commands[arg]
            path.append(arg)
        else:
            positionals.append(arg)
    usage = f"`{' '.join(path)}`"
    if node.commands:
        return None, f"{usage} needs a subcommand ({', '.join(node.commands)})"
    if len(positionals) > len(node.args):
        return None, f"{usage} takes {len(node.args)} argument(s), got {positionals}"
    for value, allowed in zip(positionals, node.args):
        if allowed and value not in allowed:
            return None, f"{value!r} is not one of {allowed} for {usage}"
    return (path[1] if len(path) > 1 else None), None


def as_args(value) -> list[str] | None:
    """A command/entrypoint as a list of words; None when unset."""
    return None if value is None else [str(a) for a in value] if isinstance(value, list) else shlex.split(str(value))


def check_roles(services: dict, cli: Cli) -> tuple[list[str], dict[str, str]]:
    """(problems, {service: subcommand}) of the services that run the binary's image."""
    problems, roles, known_env = [], {}, cli.env | EXTRA_ENV
    built = [s for s in services.values() if s.get("build")]
    images = {s["image"] for s in built if s.get("image")}
    for name, svc in services.items():
        if not svc.get("build") and svc.get("image") not in images:
            continue
        args, entrypoint = as_args(svc.get("command")), as_args(svc.get("entrypoint"))
        if entrypoint is not None and Path((entrypoint or [""])[0]).name != cli.name:
            print(f"warning: services.{name}: entrypoint {entrypoint} is not {cli.name}; not checked", file=sys.stderr)
        elif entrypoint is None and args is None:
            print(f"warning: services.{name}: no command, runs the image's CMD; not checked", file=sys.stderr)
        else:  # an entrypoint set in the file drops the image's CMD
            subcommand, error = check_args(entrypoint[1:] + (args or []) if entrypoint else args, cli)
            if error:
                problems.append(f"services.{name}.command: {error}")
            elif subcommand:
                roles[name] = subcommand
        for key in sorted(k for k in env_of(svc) if k not in known_env and not k.startswith(EXTRA_ENV_PREFIX)):
            near = difflib.get_close_matches(key, known_env, n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            problems.append(f"services.{name}.environment.{key}: {cli.name} reads no such variable{hint}")
    if not built:
        problems.append(f"no service is built from the Dockerfile, so none runs {cli.name}")
    return problems, roles


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--binary", type=Path, required=True, help="the built order-service binary")
    parser.add_argument("--compose", type=Path, default=REPO / "docker-compose.yml", help="default: %(default)s")
    opts = parser.parse_args()
    for path, what in ((opts.compose, "compose file"), (SCHEMA, "JSON Schema"), (opts.binary, "binary")):
        if not path.is_file():
            sys.exit(f"error: {what} {path} not found" + (" (cargo build first)" if what == "binary" else ""))
    text, name, base = opts.compose.read_text(encoding="utf-8"), opts.compose.name, opts.compose.resolve().parent
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as error:
        sys.exit(f"error: {name} is not valid YAML: {error}")
    if not isinstance(doc, dict) or not isinstance(doc.get("services"), dict):
        sys.exit(f"error: {name} has no `services` mapping")

    problems: list[str] = []
    doc = interpolate(doc, problems)
    services = {k: v or {} for k, v in doc["services"].items()}
    cli = read_cli(opts.binary.resolve(), [])
    cli.name = opts.binary.name
    role_problems, roles = check_roles(services, cli)
    problems += validate_schema(doc, SCHEMA) + check_depends_on(services)
    problems += check_volumes_networks(doc, services, base) + check_urls(services)
    problems += check_ports(services, roles) + role_problems
    if problems := list(dict.fromkeys(problems)):  # once each, however often an anchor repeats it
        print("\n".join(f"error: {p}" for p in problems), file=sys.stderr)
        print(f"FAILED: {len(problems)} problem(s) in {opts.compose}", file=sys.stderr)
        return 1
    print(f"OK: {name}: {len(services)} services valid against {SCHEMA.name}, references resolve; "
          f"{len(roles)} roles run real {cli.name} subcommands ({', '.join(f'{n}={s}' for n, s in roles.items())}) "
          "and set only variables it reads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
