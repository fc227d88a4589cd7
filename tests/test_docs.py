"""The docs stay true to the code: docs/CONFIG.md is what conf/ generates, and every command the README and
docs/ quote names a real console script, Makefile target and configuration."""

from __future__ import annotations

import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# Every fenced block, whatever its language (a ```yaml block never shifts the pairing); shell ones are read.
FENCE = re.compile(r"```(\w*)\n(.*?)```", re.S)
SHELL = ("", "bash", "sh")
SPAN = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
# Config files a quoted command creates before the next one uses them (agecls-bins propose ... --install).
CREATED = {"bins=mybins": "bins=seed7"}


def generator():
    """docs/gen_config_reference.py as a module (registered first: its dataclass looks itself up there)."""
    name = "gen_config_reference"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "docs" / "gen_config_reference.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def console_scripts() -> set[str]:
    text = (REPO / "pyproject.toml").read_text()
    section = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([\w-]+)\s*=", section, re.M))


def make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w-]*)\s*:(?!=)", (REPO / "Makefile").read_text(), re.M))


def makefile_commands() -> list[str]:
    """The Makefile's recipe lines with their backslash continuations joined, whitespace collapsed."""
    text = (REPO / "Makefile").read_text().replace("\\\n", " ")
    return [" ".join(line.split()) for line in text.splitlines() if line.startswith("\t")]


def commands(text: str) -> list[list[str]]:
    """Each shell command of the fenced code blocks (continuation lines joined, comments dropped) as words."""
    out = []
    for lang, block in FENCE.findall(text):
        if lang not in SHELL:
            continue
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                out.append(words)
    return out


def program(word: str) -> str:
    return word.removeprefix(".venv/bin/")


def test_committed_config_reference_is_what_conf_generates(tmp_path):
    out = tmp_path / "CONFIG.md"
    assert generator().main(["--out", str(out)]) == 0
    committed = (REPO / "docs" / "CONFIG.md").read_text()
    assert committed == out.read_text(), "docs/CONFIG.md is out of date with conf/: run `make docs`"


def test_config_reference_lists_groups_options_and_the_default_keys_with_their_comments(tmp_path):
    conf = tmp_path / "conf"
    (conf / "model").mkdir(parents=True)
    (conf / "experiment").mkdir()
    (conf / "train.yaml").write_text(
        "# Entry config.\ndefaults:\n  - _self_\n  - model: small\n  - optional experiment: null\n\n"
        "# Seeds everything.\nseed: 42\n"
    )
    (conf / "model" / "small.yaml").write_text(
        "# A small CNN; `blocks` x conv.\nname: small\nblocks: 2      # conv blocks | each halves the image\n"
        "                # more blocks: smaller images\n# Widths per block.\nwidths:\n  - 8\n  - 16\n"
        "head:\n  hidden: 0    # 0: no hidden layer\n"
    )
    (conf / "model" / "big.yaml").write_text("# A big one.\nname: big\n")
    (conf / "experiment" / "x.yaml").write_text("# @package _global_\n# Sets <everything>.\nseed: 1\n")
    (conf / "eval.yaml").write_text("# agecls-eval's keys.\nckpt: ???   # a checkpoint\n")
    page = generator().render(conf)
    assert "| `seed` | `42` | Seeds everything. |" in page
    assert "Default: `model=small`." in page
    assert "| `big` | A big one. |\n| `small` | A small CNN; `blocks` x conv. |" in page
    assert (
        "| `model.blocks` | `2` | conv blocks \\| each halves the image more blocks: smaller images |" in page
    )
    assert "| `model.widths` | `[8, 16]` | Widths per block. |" in page
    assert "| `model.head.hidden` | `0` | 0: no hidden layer |" in page
    assert "| `model.head` |" not in page, "a mapping without a comment of its own gets no row"
    assert "| `x` | Sets &lt;everything>. |" in page
    assert "No default: an optional overlay, chosen with `experiment=<option>`" in page
    assert "## `agecls-eval` (`eval.yaml`)\n\nagecls-eval's keys.\n" in page
    assert "| `ckpt` | `???` | a checkpoint |" in page


def test_readme_opens_with_the_two_commands_ci_runs():
    first = FENCE.search((REPO / "README.md").read_text()).group(2)
    assert [shlex.split(line, comments=True) for line in first.splitlines()] == [
        ["make", "demo"],
        ["make", "test"],
    ]
    assert "make test" in (REPO / ".ci" / "run").read_text()


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_quoted_commands_name_real_console_scripts_and_make_targets(doc):
    text = doc.read_text()
    scripts, targets = console_scripts(), make_targets()
    quoted = commands(text) + [span.split() for span in SPAN.findall(text)]
    bad = []
    for words in quoted:
        name = program(words[0])
        if re.fullmatch(r"agecls-[a-z]+", name) and name not in scripts:
            bad.append(name)
        if name == "make" and len(words) > 1 and words[1] not in targets:
            bad.append(f"make {words[1]}")
    assert not bad, f"{doc.name} quotes commands that do not exist: {bad}"
    assert "agecls-train" in scripts and "docs" in targets  # the parsers found something


# The lever rounds and explorations that found the recipe, moved from BENCHMARKS.md to their own page.
EARLIER = [
    "recipe-followups",
    "levers-runs",
    "levers",
    "age_heads",
    "bin_discovery",
    "quality-64px-recipe",
    "sweep_pruning",
    "overhead",
    "data_pipeline",
]


def test_earlier_benchmark_sections_live_on_their_page_and_their_make_targets_write_there():
    earlier = (REPO / "docs" / "BENCHMARKS-EARLIER.md").read_text()
    main = (REPO / "BENCHMARKS.md").read_text()
    for name in EARLIER:
        begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
        assert earlier.count(begin) == 1 and earlier.count(end) == 1, name
        assert begin not in main and end not in main, name
    assert "](docs/BENCHMARKS-EARLIER.md)" in main
    commands = makefile_commands()
    for marker in ("bench/levers.py --notes", "$(RECIPE_64) --notes"):
        found = [c for c in commands if marker in c]
        assert found and all(c.endswith("--write docs/BENCHMARKS-EARLIER.md") for c in found), found


def test_make_targets_keep_the_hand_written_reading_of_their_sections():
    """A section's notes (bench/results/<section>-notes.md) are appended only when the script is given them:
    the make target that rewrites the section passes them, so a rerun through make keeps the reading."""
    commands = makefile_commands()
    notes = sorted((REPO / "bench" / "results").glob("*-notes.md"))
    assert notes
    missing = [n.name for n in notes if not any(f"--notes bench/results/{n.name}" in c for c in commands)]
    assert not missing, f"no make target passes these notes to its bench script: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_local_links_point_at_files_that_exist(doc):
    missing = [
        link
        for link in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", doc.read_text())
        if not (doc.parent / link).exists()
    ]
    assert not missing, f"{doc.name} links to missing files: {missing}"


def _overrides(words: list[str]) -> list[str] | None:
    """The config overrides of an agecls-train / agecls-data command, sweeps reduced to one point; None for a
    command that takes no overrides (--help, --config-path)."""
    if words[0] == "agecls-data":
        words = words[1:]
        if words[:1] != ["prepare"] and words[:1] != ["show"] or "--manifest" in words:
            return None
    multirun = "-m" in words
    out = []
    for word in words[1:]:
        if word in ("-m", "--cfg", "job") or word.startswith(("hydra/", "hydra.")):
            continue
        if word.startswith("-"):
            return None
        key, _, value = word.partition("=")
        if multirun and re.match(r"(choice|range|interval|tag)\(", value):
            continue
        if multirun and "," in value and not value.startswith(("[", "{", "'", '"')):
            value = value.split(",")[0]
        out.append(CREATED.get(f"{key}={value}", f"{key}={value}"))
    return out


def test_quoted_agecls_train_and_data_commands_compose():
    from hydra import compose, initialize_config_dir

    from agecls.config import CONFIG_DIR

    checked, failed = 0, []
    for doc in DOCS:
        for words in commands(doc.read_text()):
            words = [program(words[0]), *words[1:]]
            if words[0] not in ("agecls-train", "agecls-data"):
                continue
            overrides = _overrides(words)
            if overrides is None:
                continue
            try:
                with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
                    compose("train", overrides=overrides)
                checked += 1
            except Exception as exc:  # noqa: BLE001 - every failure is listed with its command
                failed.append(f"{doc.name}: {' '.join(words)}: {type(exc).__name__}: {exc}"[:400])
    assert not failed, "\n".join(failed)
    assert checked >= 30, checked


def _keys(data: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in data.items():
        out.add(prefix + key)
        if isinstance(value, dict):
            out |= _keys(value, f"{prefix}{key}.")
    return out


def test_quoted_key_value_arguments_of_the_other_commands_are_their_keys():
    """agecls-eval, -predict, -serve, -compare, -bins, -report: every `key=value` quoted is a key of the
    command's own conf/<name>.yaml (agecls-train and agecls-data are composed above)."""
    import yaml

    from agecls.config import CONFIG_DIR

    checked, bad = 0, []
    for doc in DOCS:
        for words in commands(doc.read_text()):
            name = program(words[0]).removeprefix("agecls-")
            conf = Path(CONFIG_DIR) / f"{name}.yaml"
            if not program(words[0]).startswith("agecls-") or name in ("train", "data") or not conf.is_file():
                continue
            valid = _keys(yaml.safe_load(conf.read_text()))
            for word in words[1:]:
                if word.startswith("[") and word.endswith("]"):  # an optional argument, `[key=value]`
                    word = word[1:-1]
                if "=" in word and not word.startswith("-"):
                    checked += 1
                    if word.split("=", 1)[0] not in valid:
                        bad.append(f"{doc.name}: agecls-{name} {word}")
    assert not bad, "\n".join(bad)
    assert checked >= 15, checked


BENCHMARKS = REPO / "BENCHMARKS.md"
SECTION = re.compile(r"^<!-- ([\w-]+):begin -->\n(.*?)^<!-- \1:end -->", re.S | re.M)
HEADER = ("- Command: ", "- Machine: ", "- Date: ")


def table_cells(text: str) -> list[str]:
    """Every cell of every Markdown table in `text` (an escaped pipe stays inside its cell)."""
    return [
        cell.strip()
        for line in text.splitlines()
        if line.startswith("|")
        for cell in re.split(r"(?<!\\)\|", line.strip()[1:-1])
    ]


def test_readme_and_benchmarks_stay_short_and_benchmark_tables_hold_values():
    readme, benchmarks = (REPO / "README.md").read_text(), BENCHMARKS.read_text()
    assert len(readme.splitlines()) <= 150, "README.md: at most 150 lines; move detail to docs/"
    assert len(benchmarks.splitlines()) <= 250, "BENCHMARKS.md: at most 250 lines"
    long = [cell[:80] + "..." for cell in table_cells(benchmarks) if len(cell) > 200]
    assert not long, f"BENCHMARKS.md cells over 200 characters (narrative belongs in bench/results/): {long}"


def test_each_benchmark_section_is_its_provenance_one_table_and_a_short_reading():
    """Command, machine and date; one table (none while a section waits for its machine); at most five lines
    of reading. A section's per-run narrative lives in its record or notes file under bench/results/."""
    sections = SECTION.findall(BENCHMARKS.read_text())
    assert len(sections) >= 8
    for name, body in sections:
        lines = body.splitlines()
        for key in HEADER:
            assert any(line.startswith(key) for line in lines), f"{name}: no '{key.strip()}' line"
        tables = sum(
            1 for i, line in enumerate(lines) if line.startswith("|") and not lines[i - 1].startswith("|")
        )
        assert tables == 1 or (tables == 0 and "not measured" in lines[0]), f"{name}: {tables} tables"
        reading = [line for line in lines if line.strip() and not line.startswith(("|", "#", "![", *HEADER))]
        assert len(reading) <= 5, f"{name}: {len(reading)} lines of reading, at most 5: {reading}"


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("doc", [*DOCS, BENCHMARKS], ids=lambda p: p.name)
def test_section_links_name_headings_that_exist(doc):
    missing = []
    for target, anchor in re.findall(r"\]\(([^)#:\s]*)#([^)\s]+)\)", doc.read_text()):
        page = (doc.parent / target) if target else doc
        if page.suffix != ".md":
            continue
        headings = {slug(h) for h in re.findall(r"^#+ (.+)$", page.read_text(), re.M)}
        if anchor not in headings:
            missing.append(f"{target}#{anchor}")
    assert not missing, f"{doc.name} links to headings that do not exist: {missing}"


def test_architecture_lists_every_module_of_the_package():
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    package = REPO / "src" / "agecls"
    modules = [p.relative_to(package).as_posix() for p in package.rglob("*.py") if p.name != "__init__.py"]
    assert len(modules) > 50
    assert [m for m in sorted(modules) if f"`{m}`" not in text] == []
