"""Write docs/CONFIG.md, the configuration reference, from the YAML files of src/agecls/conf (`make docs`).

Every config group with its options (files) and their header comments, the top-level keys of train.yaml, the
keys of each group's default option with their comments, and the keys of the other commands (conf/<name>.yaml
for agecls-<name>). The YAML files are the source: edit them, then `make docs`; tests/test_docs.py fails while
the committed page differs from what this writes.

    .venv/bin/python docs/gen_config_reference.py              # rewrite docs/CONFIG.md
    .venv/bin/python docs/gen_config_reference.py --out F.md   # write elsewhere (the test compares)
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "src" / "agecls" / "conf"
OUT = REPO / "docs" / "CONFIG.md"
KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_+][\w.+/-]*)\s*:(?:\s+(?P<rest>.*))?$")
PACKAGE = re.compile(r"^#\s*@package\s+(\S+)")
# Group swaps on top of an experiment that validation refuses, and why (tests/test_composition.py checks that
# these, and only these, of every experiment x every option of the swappable groups are refused). `when`: the
# composed value that decides it (key, "<" or "==", value), None for every experiment.
REFUSED_SWAPS = [
    {
        "swap": "bins=search",
        "when": None,
        "error": "bins=search has no ranges of its own",
        "why": "its bin edges are drawn per trial of a study (`-m sweep=optuna_bin_edges`), not for one run",
    },
    {
        "swap": "model=inception_resnet_v1",
        "when": ("data.image_size", "<", 75),
        "error": "model 'inception_resnet_v1' needs a whole number >= 75",
        "why": "its valid convolutions shrink 75 px to 1x1 (experiment=demo at 64 px, utkface at 32); "
        "`model.padded=true` takes 32 px",
    },
    {
        "swap": "optimizer=adadelta",
        "when": ("scheduler.name", "==", "onecycle"),
        "error": "optimizer must support momentum or beta1",
        "why": "OneCycle cycles the momentum, which Adadelta has not (experiment=utkface); add "
        "`scheduler=none`",
    },
]
SWAPPABLE = ["optimizer", "scheduler", "model", "sampler", "augment", "bins", "task"]


@dataclass
class Key:
    """One key of a YAML file: its dotted path, the value as written (or a compact form), its comments."""

    path: str
    value: str
    comment: str
    is_mapping: bool


def split_comment(text: str) -> tuple[str, str]:
    """(value, comment) of what follows `key:`; `#` starts a comment only outside quotes, after a space."""
    quote = None
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1].isspace()):
            return text[:i].rstrip(), text[i + 1 :].strip()
    return text.rstrip(), ""


def header(lines: list[str]) -> str:
    """The file's leading comment block (Hydra's `# @package` line left out), as one paragraph."""
    out = []
    for line in lines:
        if not line.startswith("#"):
            break
        if not PACKAGE.match(line):
            out.append(line[1:])
    return join(out)


def join(comment_lines: list[str]) -> str:
    """Comment lines as one paragraph; a line indented further, or starting with `-`, starts a new line (a
    list or a table in the comment), marked with a NEWLINE character that `cell` turns into `<br>`."""
    text = ""
    for raw in comment_lines:
        line = " ".join(raw.split())
        if not line:
            continue
        structured = raw.startswith("  ") or line.startswith("- ")
        text += ("\n" if structured and text else " " if text else "") + line
    return text


def package(lines: list[str], default: str) -> str:
    """Where a file's keys go: its `# @package` directive, else the group's own path (`optuna/pruner` ->
    `optuna.pruner`); '' for `_global_`."""
    for line in lines:
        if not line.startswith("#"):
            break
        m = PACKAGE.match(line)
        if m:
            return "" if m.group(1) == "_global_" else m.group(1)
    return default


def lookup(data: object, parts: list[str]) -> object:
    for p in parts:
        data = data.get(p) if isinstance(data, dict) else None
    return data


def compact(value: object) -> str:
    """A value written as a block (a list over several lines) in one line of YAML flow style."""
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def keys(path: Path, prefix: str) -> list[Key]:
    """The file's keys in order: a comment block above a key and the key's inline comment (with the comment
    lines that continue it below) describe that key. `defaults:` and the insides of lists are left out."""
    lines = path.read_text().splitlines()
    data = yaml.safe_load(path.read_text()) or {}
    body = len(lines)
    for i, line in enumerate(lines):  # skip the header block
        if not line.startswith("#"):
            body = i
            break
    out: list[Key] = []
    stack: list[tuple[int, str]] = []
    pending: list[str] = []  # a comment block waiting for its key
    last: Key | None = None  # the key whose inline comment the next comment lines may continue
    skip_below: int | None = None  # inside a list (or `defaults:`): lines indented deeper than this
    for line in lines[body:]:
        stripped = line.strip()
        indent = len(line) - len(line.lstrip(" "))
        if not stripped:
            pending, last = [], None
            continue
        if stripped.startswith("#"):
            if last is not None and stack and indent > stack[-1][0]:  # continues the inline comment above
                last.comment = join([last.comment, stripped[1:]])
            elif skip_below is None or indent <= skip_below:
                pending.append(stripped[1:])
                last = None
            continue
        if skip_below is not None and indent > skip_below:
            continue
        skip_below = None
        m = KEY.match(line)
        if not m:
            pending, last = [], None
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        name = m.group("key")
        parts = [k for _, k in stack] + [name]
        stack.append((indent, name))
        value, inline = split_comment(m.group("rest") or "")
        if parts == ["defaults"]:
            skip_below, pending, last = indent, [], None
            continue
        current = lookup(data, parts)
        is_mapping = isinstance(current, dict) and not value
        if not value and isinstance(current, list):
            value, skip_below = compact(current), indent
        comment = " — ".join(x for x in (join(pending), inline) if x)
        key = Key(".".join(filter(None, [prefix, *parts])), value, comment, is_mapping)
        out.append(key)
        pending, last = [], (key if inline else None)
    return [k for k in out if not k.is_mapping or k.comment]


def cell(text: str) -> str:
    """Comment text for a Markdown table cell: code spans kept as written, emphasis marks and tag-like `<`
    escaped outside them, pipes escaped everywhere, line breaks as `<br>`; never empty."""
    parts = re.split(r"(`[^`]*`)", text)
    for i, part in enumerate(parts):
        if not part.startswith("`"):
            part = re.sub(r"<(?=[A-Za-z/!?])", "&lt;", part)  # would read as an HTML tag
            part = re.sub(r"(\*|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9]))", r"\\\1", part)  # not intraword _
        parts[i] = part.replace("|", "\\|").replace("\n", "<br>")
    return "".join(parts) or " "


def code(text: str) -> str:
    return "`" + text.replace("|", "\\|") + "`" if text else " "


def slug(title: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def key_table(rows: list[Key]) -> list[str]:
    out = ["| key | default | what it is |", "|---|---|---|"]
    for k in rows:
        value = "(keys below)" if k.is_mapping else code(k.value)
        out.append(f"| `{k.path}` | {value} | {cell(k.comment)} |")
    return out


def groups(conf: Path) -> list[str]:
    """Every folder of `conf` that holds YAML files, as a group path (`optuna/pruner`)."""
    found = {p.parent.relative_to(conf).as_posix() for p in conf.rglob("*.yaml") if p.parent != conf}
    return sorted(found)


def defaults_list(conf: Path) -> dict[str, str | None]:
    """group -> its default option in train.yaml (None: an optional overlay without a default)."""
    data = yaml.safe_load((conf / "train.yaml").read_text())
    out: dict[str, str | None] = {}
    for entry in data["defaults"]:
        if isinstance(entry, dict):
            ((group, option),) = entry.items()
            out[group.removeprefix("optional ").strip()] = option
    return out


def render(conf: Path = CONF) -> str:
    """The whole reference page for the config tree `conf` (train.yaml and its group folders)."""
    chosen = defaults_list(conf)
    names = groups(conf)
    ordered = [g for g in chosen if g in names] + [g for g in names if g not in chosen]
    train = conf / "train.yaml"
    others = sorted(p for p in conf.glob("*.yaml") if p.name != "train.yaml")
    lines = [
        "# Configuration reference",
        "",
        "Generated from the YAML files of `src/agecls/conf/` (also reachable as `conf/`; the `sweep` group "
        "as `sweeps/`) by `make docs` (`docs/gen_config_reference.py`): edit those files, not this page. "
        "Pick a group's option with `group=option`, change one key with `group.key=value`, and print what a "
        "command line composes with `agecls-train --cfg job [overrides]`.",
        "",
        "Groups: " + " · ".join(f"[`{g}`](#{slug(g)})" for g in ordered),
        *(
            [
                "",
                "Other commands' keys: "
                + " · ".join(f"[`agecls-{p.stem}`](#{slug(f'agecls-{p.stem} ({p.name})')})" for p in others),
            ]
            if others
            else []
        ),
        "",
        "## Top-level keys (`train.yaml`)",
        "",
        header(train.read_text().splitlines()),
        "",
        *key_table(keys(train, "")),
    ]
    for group in ordered:
        folder = conf / group
        files = sorted(folder.glob("*.yaml"))
        default = chosen.get(group)
        lines += ["", f"## `{group}`", ""]
        if default:
            lines.append(f"Default: `{group}={default}`.")
        else:
            lines.append(
                "No default: an optional overlay, chosen with "
                f"`{group}=<option>`; it may set keys of any group."
                if group in chosen
                else f"No default: chosen with `{group}=<option>`."
            )
        lines += ["", "| option | what it is |", "|---|---|"]
        for f in files:
            lines.append(f"| `{f.stem}` | {cell(header(f.read_text().splitlines()))} |")
        if default and (folder / f"{default}.yaml").is_file():
            path = folder / f"{default}.yaml"
            rows = keys(path, package(path.read_text().splitlines(), group.replace("/", ".")))
            if rows:
                lines += [
                    "",
                    f"Keys of the default option, `{default}`:",
                    "",
                    *key_table(rows),
                ]
    lines += swaps_section(conf)
    for path in others:  # the other commands' key files (agecls-eval, ...): `key=value` on their command line
        rows = keys(path, "")
        lines += ["", f"## `agecls-{path.stem}` (`{path.name}`)", "", header(path.read_text().splitlines())]
        lines += ["", *key_table(rows)] if rows else []
    return "\n".join(lines) + "\n"


def swaps_section(conf: Path) -> list[str]:
    """What may be swapped on top of an experiment, and the swaps validation refuses."""
    experiments = len(list((conf / "experiment").glob("*.yaml")))
    options = sum(len(list((conf / g).glob("*.yaml"))) for g in SWAPPABLE)
    lines = [
        "",
        "## Swapping a group on top of an experiment",
        "",
        f"Every experiment takes every option of {', '.join(f'`{g}`' for g in SWAPPABLE)}, e.g. "
        "`agecls-train experiment=v13 optimizer=rmsprop` or `experiment=agecnn model=vgg16`: an experiment "
        "sets only keys that every option of a group has (`optimizer.lr`, `optimizer.weight_decay`, "
        "`task.label_smoothing`) and selects an option for the rest (the dissertation's CNNs are the model "
        "presets `agecnn`, `agecnn_nodropout`, `gendercnn`, `ethnicitycnn` of `basic_cnn`), so a swap "
        f"replaces the whole option. tests/test_composition.py composes and validates all {experiments} x "
        f"{options} swaps; these are refused, each with a one-line error before anything runs:",
        "",
        "| swap | refused where | why |",
        "|---|---|---|",
    ]
    for rule in REFUSED_SWAPS:
        key, op, value = rule["when"] or ("", "", "")
        where = f"`{key}` {op} {value}" if key else "every experiment"
        lines.append(f"| `{rule['swap']}` | {cell(where)} | {cell(rule['why'])} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=OUT, help=f"where to write (default {OUT.relative_to(REPO)})"
    )
    args = parser.parse_args(argv)
    args.out.write_text(render())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
