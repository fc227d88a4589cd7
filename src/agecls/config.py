"""Config helpers shared by every entry point: composing a command's config (with errors that name the
closest valid key or option), resolvers, paths and flattening for tracking."""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from agecls.errors import UsageError

CONFIG_DIR = Path(__file__).resolve().parent / "conf"
_LISTED = 40  # valid names shown in an error message, at most


def project_root() -> Path:
    """Repository root when running from a source checkout, else the current directory."""
    here = Path(__file__).resolve()
    candidate = here.parents[2]
    if (candidate / "pyproject.toml").is_file() and (candidate / "src" / "agecls").is_dir():
        return candidate
    return Path.cwd()


def compose_train(overrides: Sequence[str] = ()) -> DictConfig:
    """The train config `agecls-train OVERRIDES` would run with; UsageError naming a bad override."""
    return compose("train", overrides)


def compose(
    config_name: str,
    overrides: Sequence[str] = (),
    config_dir: str | Path = CONFIG_DIR,
    *,
    return_hydra_config: bool = False,
) -> DictConfig:
    """Config `config_name` of `config_dir` with Hydra overrides, as an agecls command composes it.

    UsageError (one line) for an override Hydra rejects or would silently skip (a misspelt option of an
    `optional` group), naming the closest valid key or option."""
    return _checked(config_name, list(overrides), config_dir, multirun=False, hydra=return_hydra_config)


def check_overrides(
    config_name: str,
    overrides: Sequence[str],
    config_dir: str | Path = CONFIG_DIR,
    *,
    multirun: bool = False,
) -> DictConfig:
    """What `compose` checks, for a command line that may sweep (`a,b`, `choice(..)`, `range(..)`,
    `interval(..)`): every value of a group sweep must be an option, a swept key must exist, and so must the
    keys and options of the agecls_optuna sweeper's `optuna.params`. Returns the config composed with the
    first value of each sweep (hydra node included)."""
    return _checked(config_name, list(overrides), config_dir, multirun=multirun, hydra=True)


# -- checking overrides --------------------------------------------------------------------------------------


def _checked(
    config_name: str, lines: list[str], config_dir: str | Path, multirun: bool, hydra: bool
) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from hydra.types import RunMode
    from omegaconf import open_dict
    from omegaconf.errors import OmegaConfBaseException

    register_resolvers()
    failures = (HydraException, OmegaConfBaseException, ValueError)
    try:
        context = initialize_config_dir(config_dir=str(config_dir), version_base="1.3")
    except failures as exc:
        raise UsageError(_first_lines(exc)) from None
    with context:
        loader = GlobalHydra.instance().config_loader()
        parsed = parse_overrides(lines, loader)
        problems = _group_problems(parsed, loader)
        sweeps = [o for o in parsed if o.is_sweep_override()]
        deferred: list[Any] = []
        if sweeps:
            lines, deferred = _first_values(parsed, loader)
        try:
            cfg = hydra_compose(config_name, overrides=lines, return_hydra_config=True)
        except failures as exc:
            raise UsageError(
                problems[0] if problems else _explain(config_name, parsed, loader, exc)
            ) from None
        # Options are listed from the config dir alone: with more search paths (--config-dir,
        # hydra.searchpath) an option found there is not a problem, and Hydra checks every non-optional group.
        if problems and not OmegaConf.select(cfg, "hydra.searchpath"):
            raise UsageError(problems[0])
        if sweeps:
            if not (multirun or OmegaConf.select(cfg, "hydra.mode") == RunMode.MULTIRUN):
                raise UsageError(
                    f"{sweeps[0].input_line!r} sweeps several values, which only a -m (--multirun) run "
                    "does; a list is key=[a,b], text holding commas is quoted: key='a,b'"
                )
            keys = set(config_keys(cfg))
            for override in deferred:
                _check_key(override, keys, cfg, config_name)
    if not hydra:  # as hydra.compose(return_hydra_config=False) leaves it
        with open_dict(cfg):
            del cfg["hydra"]
    return cfg


def parse_overrides(lines: Sequence[str], loader: Any = None) -> list[Any]:
    """Hydra's parsed overrides (hydra.core.override_parser.types.Override), one line at a time so that a
    parse error (UsageError) names its line."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create(config_loader=loader)
    parsed = []
    for line in lines:
        try:
            parsed += parser.parse_overrides([line])
        except HydraException as exc:
            detail = str(exc).split("\n")[0]
            raise UsageError(
                f"cannot parse {line!r}: {detail} (Hydra's override grammar; quote a value "
                "holding spaces or special characters)"
            ) from None
    return parsed


def is_group(loader: Any, name: str) -> bool:
    """Whether `name` is a config group (a folder of options) of Hydra's config `loader`."""
    return bool(name) and loader.repository.group_exists(name)


def _options(loader: Any, group: str) -> list[str]:
    from hydra.core.object_type import ObjectType

    return list(loader.get_group_options(group, results_filter=ObjectType.CONFIG))


def _values(override: Any) -> list[str] | None:
    """The option names a group override asks for (every value of a choice or range sweep); None when
    they cannot be listed (an interval, `null`)."""
    if override.is_sweep_override():
        return list(override.sweep_string_iterator()) if override.is_discrete_sweep() else None
    value = override.value()
    if isinstance(value, list):
        return [str(v) for v in value]
    return None if value is None else [str(value)]


def _group_problems(parsed: list[Any], loader: Any) -> list[str]:
    """What is wrong with the group overrides: an option that does not exist (Hydra would skip a misspelt
    option of an `optional` group without a word), no option named, or a dotted key naming a group
    (`optuna.pruner=median`)."""
    problems = []
    for override in parsed:
        group = override.key_or_group
        if override.is_delete():
            continue
        if not is_group(loader, group):
            dotted = group.replace(".", "/")
            value = None if override.is_sweep_override() else override.value()
            if "." in group and is_group(loader, dotted) and str(value) in _options(loader, dotted):
                problems.append(
                    f"{override.input_line}: {dotted} is a config group; choose an option with "
                    f"{dotted}={value}"
                )
            continue
        options = _options(loader, group)
        values = _values(override)
        if values is None and not override.is_sweep_override():
            problems.append(
                f"{override.input_line}: name an option of {group} ({_listed(options)}), or "
                f"leave {group}= out"
            )
        problems += [
            _bad_option(group, v, options) for v in values or [] if v not in options and "/" not in v
        ]
    return problems


def _bad_option(group: str, value: str, options: list[str]) -> str:
    close = difflib.get_close_matches(value, options, n=1, cutoff=0.5)
    hint = f"; did you mean {group}={close[0]}?" if close else ""
    return f"{group}={value}: no option {value!r} in group {group}{hint} (valid: {_listed(options)})"


def _first_values(parsed: list[Any], loader: Any) -> tuple[list[str], list[Any]]:
    """Override lines with each enumerable sweep replaced by its first value, and the sweeps left out
    (intervals), whose keys are checked against the composed config instead."""
    lines, deferred = [], []
    for override in parsed:
        first = None
        if override.is_discrete_sweep():
            first = next(iter(override.sweep_string_iterator()), None)
        if not override.is_sweep_override():
            lines.append(override.input_line)
        elif first is not None:
            lines.append(f"{override.get_key_element()}={first}")
        elif not is_group(loader, override.key_or_group):
            deferred.append(override)
    return lines, deferred


def _check_key(override: Any, keys: set[str], cfg: DictConfig, config_name: str) -> None:
    plain = override.package is None and not override.is_add() and not override.is_force_add()
    if plain and override.key_or_group not in keys:
        raise UsageError(_unknown_key(override.key_or_group, keys, _groups(cfg), config_name))


def check_lines(
    lines: Sequence[str], cfg: DictConfig, config_name: str, config_dir: str | Path = CONFIG_DIR
) -> None:
    """UsageError for `key=value` lines (no sweeps) that name an unknown key or group option of `cfg`, the
    config composed from `config_name` in `config_dir`: what a program that applies such lines to the
    config later (a study's search space, say) must check before it starts."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        parsed = parse_overrides(lines, loader)
        problems = _group_problems(parsed, loader)
        if problems:
            raise UsageError(problems[0])
        keys = set(config_keys(cfg))
        for override in parsed:
            if not is_group(loader, override.key_or_group):
                _check_key(override, keys, cfg, config_name)


def _explain(config_name: str, parsed: list[Any], loader: Any, exc: Exception) -> str:
    """One line saying which override Hydra refused and what would be valid (Hydra's own words when no
    override can be blamed)."""
    from hydra import compose as hydra_compose

    try:
        base = hydra_compose(config_name, overrides=[], return_hydra_config=True)
    except Exception:  # the config itself does not compose: Hydra's message says why
        return _first_lines(exc)
    tree = _groups(base)
    group_lines = []
    for override in parsed:
        group = override.key_or_group
        if is_group(loader, group) and override.package is None:
            if group not in tree and not override.is_add():
                return _not_a_group(override, set(config_keys(base)), tree, config_name)
            if not override.is_sweep_override():
                group_lines.append(override.input_line)
            elif override.is_discrete_sweep():  # as composed: its first value
                first = next(iter(override.sweep_string_iterator()), None)
                group_lines += [f"{override.get_key_element()}={first}"] if first is not None else []
    try:
        cfg = (
            hydra_compose(config_name, overrides=group_lines, return_hydra_config=True)
            if group_lines
            else base
        )
    except Exception:
        return _first_lines(exc)
    keys = set(config_keys(cfg))
    for override in parsed:
        key = override.key_or_group
        if is_group(loader, key) or override.package is not None or override.is_force_add():
            continue
        if override.is_add():
            if key in keys:
                return f"{override.input_line}: {key} is already set; change it with {key}=... (no +)"
            continue
        if key not in keys:
            return _unknown_key(key, keys, _groups(cfg), config_name, delete=override.is_delete())
        value = None if override.is_delete() or override.is_sweep_override() else override.value()
        new = [str(k) for k in value if f"{key}.{k}" not in keys] if isinstance(value, dict) else []
        if new:  # a dict merges into the node, which takes no new keys
            children = sorted(
                k[len(key) + 1 :] for k in keys if k.startswith(key + ".") and "." not in k[len(key) + 1 :]
            )
            return (
                f"{override.input_line}: {key} has no key {new[0]!r} "
                f"(its keys: {_listed(children) or 'none'}); ++{key}=... replaces the whole node"
            )
    return _first_lines(exc)


def _not_a_group(override: Any, keys: set[str], groups: list[str], config_name: str) -> str:
    key = override.key_or_group
    children = [
        k[len(key) + 1 :] for k in sorted(keys) if k.startswith(key + ".") and "." not in k[len(key) + 1 :]
    ]
    if not children:
        return _unknown_key(key, keys, groups, config_name)
    return (
        f"{override.input_line}: {key} is not a config group of {config_name} but holds keys "
        f"({_listed(children)}); set one with {key}.{children[0]}=..."
    )


def _first_lines(exc: Exception) -> str:
    text = str(exc).split("\nConfig search path")[0]  # Hydra appends its search path
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return "".join(f"{line}{' ' if line.endswith(('.', ':')) else '; '}" for line in lines[:-1]) + "".join(
        lines[-1:]
    )


def _groups(cfg: DictConfig) -> list[str]:
    choices = OmegaConf.select(cfg, "hydra.runtime.choices")
    return [str(g) for g in choices] if choices is not None else []


def _unknown_key(key: str, keys: set[str], groups: list[str], config_name: str, delete: bool = False) -> str:
    """`unknown key 'a.bx'; did you mean a.b? (keys of a: ...)` - the closest name among the config's keys
    and config groups, and the valid names beside the misspelt one."""
    hydra = key.startswith(("hydra.", "hydra/"))
    candidates = [k for k in keys if k.startswith("hydra") == hydra] + [
        g for g in groups if g.startswith("hydra") == hydra
    ]
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else ""
    parent = key
    while "." in parent:
        parent = parent.rsplit(".", 1)[0]
        if parent in keys:
            break
    else:
        parent = ""
    if parent:
        names = [k[len(parent) + 1 :] for k in sorted(keys) if k.startswith(parent + ".")]
        where = f"keys of {parent}"
    else:
        own_groups = {g for g in groups if not g.startswith("hydra")}
        names = sorted({k for k in keys if "." not in k and k != "hydra"} | own_groups)
        where = f"top-level keys{' and groups' if own_groups else ''} of {config_name}.yaml"
    names = [n for n in names if "." not in n]
    what = "cannot delete" if delete else "unknown key"
    return f"{what} {key!r}{hint} ({where}: {_listed(names)})"


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_LISTED])
    return shown + (f", ... ({len(names)} in all)" if len(names) > _LISTED else "")


def config_keys(cfg: DictConfig) -> list[str]:
    """Dotted names of every node of a config, inner ones included, without resolving interpolations."""
    return list(_walk(OmegaConf.to_container(cfg, resolve=False), ""))


def _walk(node: Any, prefix: str) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            name = f"{prefix}{key}"
            yield name
            yield from _walk(value, f"{name}.")


def register_resolvers() -> None:
    """Register agecls's OmegaConf resolvers (idempotent); call it before composing a config with Hydra."""
    if not OmegaConf.has_resolver("agecls_root"):
        OmegaConf.register_new_resolver("agecls_root", lambda: str(project_root()))


def flatten(cfg: DictConfig | dict, prefix: str = "") -> dict[str, Any]:
    """Flatten a nested config into dotted keys (lists become their string form)."""
    container = (
        OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, (DictConfig, ListConfig)) else cfg
    )
    out: dict[str, Any] = {}
    for key, value in container.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, prefix=f"{name}."))
        else:
            out[name] = value
    return out


def default_paths() -> DictConfig:
    """The `paths` group as agecls-train resolves it here (AGECLS_OUTPUT_DIR or the default outputs/)."""
    register_resolvers()  # its root_dir is ${agecls_root:}
    return OmegaConf.create({"paths": OmegaConf.load(CONFIG_DIR / "paths" / "default.yaml")}).paths
