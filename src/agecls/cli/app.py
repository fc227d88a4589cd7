"""One way to call every agecls command: a Hydra config per command (conf/<command>.yaml) that `key=value`
overrides change (Hydra's grammar), `--cfg job` to print it composed, `--help`, and one mapping of errors to
`PROG: error: message` and exit codes (0 done, 1 a data or runtime problem, 2 bad arguments)."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf

from agecls.config import CONFIG_DIR, compose, config_keys, parse_overrides
from agecls.errors import AgeclsError, UsageError

HELP_FLAGS = ("-h", "--help")


@dataclass(frozen=True)
class App:
    """A command: its name, primary config, the words of its --help, and the shorthands its older command
    lines use (`agecls-report demo` is `agecls-report name=demo`)."""

    prog: str
    config: str  # conf/<config>.yaml
    summary: str  # one line: what the command does
    usage: str  # the command line, without "usage: "
    examples: tuple[str, ...]  # 2-4 command lines, `# comment` allowed
    description: str = ""
    exit_codes: str = "0 done, 1 a data or runtime problem, 2 bad arguments"
    positional: tuple[str, ...] = ()  # keys that bare words fill, in order
    options: Mapping[str, str] = field(default_factory=dict)  # `--out DIR` -> out=DIR
    switches: Mapping[str, str] = field(default_factory=dict)  # `--install` -> install=true
    text_keys: tuple[str, ...] = ()  # values kept as the text given (a run id like 1e10 stays text)
    sweep_hint: str = "quote a value holding commas: key='a,b'"
    train_overrides: bool = False  # keys beyond its own are agecls-train's: groups, +key, ~key, hydra.*
    note: str = ""  # after the config listing


@dataclass
class Command:
    """A parsed command line: the overrides in order, and the flags that print instead of running."""

    overrides: list[str] = field(default_factory=list)
    help: bool = False
    cfg: str | None = None
    resolve: bool = False


def quoted(text: str) -> str:
    """`text` as a Hydra quoted string, so that the override keeps it as given."""
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text
    escaped = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, text).replace("'", "\\'")
    return f"'{escaped}'"


def parse_argv(app: App, argv: Sequence[str]) -> Command:
    """Command-line words -> overrides (positional words and `--option VALUE` shorthands mapped to their
    keys), --help, --cfg job, --resolve; UsageError for anything else."""
    command, positional, args = Command(), list(app.positional), list(argv)
    if args == ["help"]:
        return Command(help=True)

    def value_of(flag: str, inline: str | None) -> str:
        if inline is not None:
            return inline
        if not args:
            raise UsageError(f"{flag} needs a value (see --help)")
        return args.pop(0)

    while args:
        arg = args.pop(0)
        name, eq, inline = arg.partition("=")
        if arg in HELP_FLAGS:
            command.help = True
        elif name in ("--cfg", "-c"):
            command.cfg = value_of(name, inline if eq else None)
            if command.cfg not in ("job", "all"):
                raise UsageError(f"--cfg {command.cfg}: {app.prog} prints its composed config with --cfg job")
        elif arg == "--resolve":
            command.resolve = True
        elif name in app.options:
            key = app.options[name]
            command.overrides.append(_override(app, key, value_of(name, inline if eq else None)))
        elif arg in app.switches:
            command.overrides.append(app.switches[arg])
        elif arg.startswith("-"):
            raise UsageError(f"unexpected argument {arg!r}: give key=value pairs (see --help)")
        elif eq:
            command.overrides.append(_override(app, name, inline) if name in app.text_keys else arg)
        elif positional:
            command.overrides.append(f"{positional.pop(0)}={quoted(arg)}")
        else:
            raise UsageError(f"unexpected argument {arg!r}: give key=value pairs (see --help)")
    return command


def _override(app: App, key: str, value: str) -> str:
    return f"{key}={quoted(value) if key in app.text_keys else value}"


def compose_app(app: App, overrides: Sequence[str]) -> DictConfig:
    """The command's config with `overrides`; UsageError naming a bad one (the closest valid key)."""
    if not app.train_overrides:
        for override in parse_overrides(overrides):
            line = override.input_line
            if override.is_sweep_override():
                raise UsageError(f"{line!r}: one value per key ({app.sweep_hint})")
            if override.is_add() or override.is_force_add() or override.is_delete() or override.package:
                raise UsageError(f"{line!r}: only plain key=value is supported ({app.prog}'s keys: --help)")
            if override.is_hydra_override():
                raise UsageError(f"{line!r}: {app.prog} runs no Hydra job; hydra.* keys do not apply")
    cfg = compose(app.config, overrides)
    OmegaConf.set_struct(cfg, False)
    return cfg


def compose_args(app: App, argv: Sequence[str]) -> DictConfig:
    """The command's config from its command-line words (shorthands included), for its parse_args."""
    command = parse_argv(app, argv)
    if command.help or command.cfg:
        raise UsageError("--help and --cfg print instead of running; give only key=value pairs here")
    return compose_app(app, command.overrides)


def app_keys(app: App) -> list[str]:
    """Dotted names of the leaves of the command's own config file."""
    cfg = OmegaConf.load(CONFIG_DIR / f"{app.config}.yaml")
    keys = config_keys(cfg)
    return [k for k in keys if not any(other.startswith(k + ".") for other in keys) and k != "defaults"]


def help_text(app: App) -> str:
    """--help: what the command does, examples, then its config file (every key, its default and meaning)."""
    path = CONFIG_DIR / f"{app.config}.yaml"
    lines = [f"{app.prog}: {app.summary}", ""]
    if app.description:
        lines += [app.description.strip(), ""]
    lines += ["examples:", *(f"  {example}" for example in app.examples), ""]
    lines += [f"usage: {app.usage}", ""]
    lines += [
        f"== Config ({path.name}) ==",
        "Override any key with key=value (Hydra's override grammar); --cfg job prints the composed config.",
        "",
        path.read_text().rstrip(),
        "",
    ]
    shorthands = []
    if app.positional:
        words = " ".join(key.upper() for key in app.positional)
        shorthands.append(f"{words} = " + " ".join(f"{key}={key.upper()}" for key in app.positional))
    shorthands += [f"{flag} VALUE = {key}=VALUE" for flag, key in app.options.items()]
    shorthands += [f"{flag} = {line}" for flag, line in app.switches.items()]
    if shorthands:
        lines += ["shorthands: " + "; ".join(shorthands), ""]
    if app.note:
        lines += [app.note.strip(), ""]
    lines.append(f"exit codes: {app.exit_codes}")
    return "\n".join(lines) + "\n"


def exit_code(exc: BaseException) -> int | None:
    """The exit code of an error a message can explain; None for a bug (let its traceback show)."""
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(exc, AgeclsError):
        return exc.exit_code
    if isinstance(exc, OmegaConfBaseException):  # a config value that does not resolve or fit
        return 2
    if isinstance(exc, (ValueError, OSError)):  # data problems: unreadable files, bad labels, ...
        return 1
    return None


def report(prog: str, exc: BaseException, usage: str | None = None) -> int:
    """Print `PROG: error: message` (after the usage line for a usage error); the exit code, or re-raise."""
    code = exit_code(exc)
    if code is None:
        raise exc
    if code == 2 and usage:
        print(f"usage: {usage}  (--help for every key)", file=sys.stderr)
    print(f"{prog}: error: {exc}", file=sys.stderr)
    return code


def run(app: App, argv: Sequence[str] | None, body: Callable[[DictConfig, list[str]], int]) -> int:
    """Run a command: --help and --cfg job print and exit 0; else `body(config, overrides)` gives the exit
    code. Errors become `PROG: error: message` with their exit codes."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        command = parse_argv(app, args)
        if command.help:
            print(help_text(app), end="")
            return 0
        cfg = compose_app(app, command.overrides)
        if command.cfg:
            print(OmegaConf.to_yaml(cfg, resolve=command.resolve), end="")
            return 0
        return body(cfg, command.overrides)
    except Exception as exc:
        return report(app.prog, exc, app.usage.split("\n")[0])
