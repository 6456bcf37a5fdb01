"""Every example in README.md and docs/ works as written: rule files load
and pass `check` (a lab's as that lab's), configs load, commands name real
programs, subcommands and options, drop-ins pass `systemd-analyze verify`,
Python examples run, links lead somewhere, and the tables of config keys,
metrics, log events and hook variables name what the code has.

The validators are tried on broken copies of the examples too, so that a
broken example cannot pass."""

from __future__ import annotations

import contextlib
import dataclasses
import grp
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from harness import skip_or_fail
from test_deploy import (
    INSTALLED_DICOM_WATCHER,
    dicom_watcher_command,
    install_units,
    verify_problems,
)

from watcher.cli import build_parser, main
from watcher.config import Config, load_config
from watcher.errors import ConfigError
from watcher.rules import HOOK_PLACEHOLDERS
from watcher.synthetic import StudySpec, write_study

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: What a fenced block may be, and so how it is checked.
LANGUAGES = {"yaml", "sh", "ini", "python", "nginx", "logrotate", "bench-output"}
#: The lab whose folder docs/labs.md's rules are written for.
DOC_LAB = "smithlab"
#: The groups the examples name (made for the test when missing).
DOC_GROUPS = ("smithlab", "joneslab")
#: The service user of the manual (made for the test when missing).
SERVICE_USER = "dicom-watcher"
#: The programs an example may run that are not on this machine's PATH.
ELSEWHERE = {"sudo"}


@dataclasses.dataclass(frozen=True)
class Block:
    doc: Path
    line: int
    language: str
    text: str
    #: The prose and blocks before it, back to the previous heading.
    context: str

    def __str__(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def fenced_blocks(doc: Path, text: str | None = None) -> list[Block]:
    """The fenced code blocks of a Markdown file, with their line numbers."""
    lines = (doc.read_text(encoding="utf-8") if text is None else text).splitlines()
    blocks, index, since_heading = [], 0, 0
    while index < len(lines):
        line = lines[index]
        if line.startswith("#"):
            since_heading = index
        if line.startswith("```"):
            start = index
            index += 1
            while index < len(lines) and not lines[index].startswith("```"):
                index += 1
            context = "\n".join(lines[since_heading:start])
            body = "\n".join(lines[start + 1 : index]) + "\n"
            blocks.append(Block(doc, start + 1, line[3:].strip(), body, context))
        index += 1
    return blocks


def all_blocks() -> list[Block]:
    return [block for doc in DOCS for block in fenced_blocks(doc)]


def blocks_of(language: str) -> list[Block]:
    return [block for block in all_blocks() if block.language == language]


def test_every_block_says_what_it_is() -> None:
    unknown = [f"{b}: ```{b.language}" for b in all_blocks() if b.language not in LANGUAGES]
    assert not unknown, f"fenced blocks without a known language: {unknown}"


# -- YAML: rule files and configs -------------------------------------------------


CONFIG_KEYS = {field.name for field in dataclasses.fields(Config)}
RULE_KEYS = {"match", "destination", "path"}


@pytest.fixture(scope="module")
def doc_accounts() -> Iterator[None]:
    """The lab groups and the service user the examples name, as real
    accounts of this machine (made for the test when missing)."""
    groups = [name for name in DOC_GROUPS if not _group_exists(name)]
    service = not _group_exists(SERVICE_USER)
    if (groups or service) and os.geteuid() != 0:
        skip_or_fail(
            f"the examples name the groups {[*groups, SERVICE_USER]}; making them needs root"
        )
    for name in groups:
        subprocess.run(["groupadd", "--system", name], check=True, timeout=60)
    if service:
        subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home", SERVICE_USER],
            check=True,
            timeout=60,
        )
    yield
    if service:
        subprocess.run(["userdel", SERVICE_USER], check=False, timeout=60)
        if _group_exists(SERVICE_USER):
            subprocess.run(["groupdel", SERVICE_USER], check=False, timeout=60)
    for name in groups:
        subprocess.run(["groupdel", name], check=False, timeout=60)


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def yaml_kind(block: Block) -> str:
    data = yaml.safe_load(block.text)
    assert isinstance(data, dict), f"{block}: a YAML example is a mapping"
    if RULE_KEYS & data.keys():
        return "lab rule" if block.doc.name == "labs.md" else "rule"
    if data.keys() <= CONFIG_KEYS:
        return "config"
    raise AssertionError(f"{block}: neither a rule file nor a config: {sorted(data)}")


def check_yaml(block: Block, folder: Path) -> str:
    """Load the example as what it is; return what `check` printed (for a
    rule) or "" (a config). Raises AssertionError with the problem."""
    kind = yaml_kind(block)
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "config":
        path = folder / "config.yaml"
        path.write_text(block.text, encoding="utf-8")
        try:
            load_config(path, resolve=False)
        except ConfigError as error:
            raise AssertionError(f"{block}: {error}") from error
        return ""
    rules = folder / "rules"
    if kind == "lab rule":
        lab = rules / DOC_LAB
        lab.mkdir(parents=True)
        lab.chmod(0o2775)
        (lab / "example.yaml").write_text(block.text, encoding="utf-8")
        config = folder / "config.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "rules": str(rules),
                    "labs": {DOC_LAB: {"destinations": [f"/nas/{DOC_LAB}"], "claims": "all"}},
                }
            ),
            encoding="utf-8",
        )
        argv = ["check", "--config", str(config)]
    else:
        rules.mkdir(parents=True)
        (rules / "example.yaml").write_text(block.text, encoding="utf-8")
        argv = ["check", "--rules", str(rules)]
    output = io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        status = main(argv)
    assert status == 0, f"{block}: `dicom-watcher {' '.join(argv)}` says:\n{output.getvalue()}"
    return output.getvalue()


@pytest.mark.usefixtures("doc_accounts")
@pytest.mark.parametrize("block", blocks_of("yaml"), ids=str)
def test_yaml_examples_load(block: Block, tmp_path: Path) -> None:
    printed = check_yaml(block, tmp_path)
    if yaml_kind(block) != "config":
        assert re.search(r"^ok: 1 rule\(s\)", printed, re.M), printed


@pytest.mark.usefixtures("doc_accounts")
@pytest.mark.parametrize(
    "breakage",
    [
        ('"^SMITH"', '"^SMITH("'),  # a bad regular expression
        ("{InstanceNumber:05d}", "{InstanceNumbr:05d}"),  # an unknown keyword
        ("destination:", "destinaton:"),  # a misspelt key
    ],
)
def test_a_broken_rule_example_fails(breakage: tuple[str, str], tmp_path: Path) -> None:
    (block,) = [b for b in blocks_of("yaml") if b.doc.name == "README.md" and breakage[0] in b.text]
    broken = dataclasses.replace(block, text=block.text.replace(*breakage))
    with pytest.raises(AssertionError):
        check_yaml(broken, tmp_path)


@pytest.mark.usefixtures("doc_accounts")
def test_a_lab_rule_example_outside_the_labs_folders_fails(tmp_path: Path) -> None:
    (block, *_) = [b for b in blocks_of("yaml") if yaml_kind(b) == "lab rule"]
    broken = dataclasses.replace(block, text=block.text.replace("/nas/smithlab/", "/nas/joneslab/"))
    with pytest.raises(AssertionError, match="joneslab"):
        check_yaml(broken, tmp_path)


@pytest.mark.usefixtures("doc_accounts")
def test_a_broken_config_example_fails(tmp_path: Path) -> None:
    (block, *_) = [b for b in blocks_of("yaml") if "labs:" in b.text and yaml_kind(b) == "config"]
    with pytest.raises(AssertionError, match="unknown group"):
        check_yaml(
            dataclasses.replace(
                block, text=block.text.replace("group: smithlab", "group: nosuchgroup-dw")
            ),
            tmp_path,
        )


# -- shell commands -----------------------------------------------------------------


def commands(block: Block) -> list[list[str]]:
    """The command lines of a shell block (continuations joined, comments
    dropped), split as the shell would."""
    joined = block.text.replace("\\\n", " ")
    found = []
    for line in joined.splitlines():
        argv = shlex.split(line, comments=True)
        if argv:
            found.append(argv)
    return found


def program(argv: list[str]) -> list[str]:
    """The command without `sudo [-u USER]` or `runuser -u USER --` in front."""
    while argv and argv[0] in {"sudo", "runuser"}:
        argv = argv[3:] if argv[1:2] == ["-u"] else argv[1:]
        argv = argv[1:] if argv[:1] == ["--"] else argv
    return argv


#: Where the installed files of the manual are in this checkout.
INSTALLED = {
    "/opt/dicom-watcher/scripts/": "scripts/",
}
REPO_PATH = re.compile(r"^(systemd|scripts|rules|requirements|tests|docs)/")


def check_command(argv: list[str], where: str) -> None:
    """A command of the docs names what exists: our subcommands and
    options, our files, our units, and programs this machine has."""
    argv = program(argv)
    name = argv[0]
    for installed, here in INSTALLED.items():
        if name.startswith(installed):
            name = here + name[len(installed) :]
    if name.endswith("/dicom-watcher") or name == "dicom-watcher":
        try:
            with contextlib.redirect_stderr(io.StringIO()) as said:
                build_parser().parse_args(argv[1:])
        except SystemExit as exit:
            if exit.code != 0:
                raise AssertionError(f"{where}: {shlex.join(argv)}: {said.getvalue()}") from None
        return
    if REPO_PATH.match(name.removeprefix("./")):
        path = ROOT / name.removeprefix("./")
        assert path.is_file() and os.access(path, os.X_OK), f"{where}: no program {name}"
    elif name.startswith("/opt/dicom-watcher/venv/bin/"):
        assert Path(sys.executable).with_name(Path(name).name).exists() or Path(name).name in {
            "python",
            "pip",
        }, f"{where}: {name} is not installed into a venv"
    elif name not in ELSEWHERE:
        search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
        if shutil.which(name, path=search) is None:
            skip_or_fail(f"{where}: {name} is not installed here")
    for argument in argv[1:]:
        if REPO_PATH.match(argument) and not argument.startswith("tests/alerts"):
            assert (ROOT / argument).exists(), f"{where}: {argument} is not in the checkout"
    if name == "systemctl":
        for unit in argv[2:]:
            if unit.startswith("-") or argv[1] in {"show"} and unit.startswith("ReadWritePaths"):
                continue
            base = unit.strip("'").removesuffix(".service")
            if "@" in base:
                base = base.split("@", 1)[0] + "@"
            assert (ROOT / "systemd" / f"{base}.service").is_file(), f"{where}: no unit {unit}"


@pytest.mark.parametrize("block", blocks_of("sh"), ids=str)
def test_shell_commands_name_what_exists(block: Block) -> None:
    for argv in commands(block):
        check_command(argv, str(block))


@pytest.mark.parametrize(
    "line",
    [
        "dicom-watcher check --rulez /etc/dicom-watcher/rules",
        "dicom-watcher statuz",
        "install -m 0644 systemd/no-such.service /etc/systemd/system/",
        "systemctl enable --now dicom-watcher-hooks@smithlab dicom-watcher-webb",
        "./scripts/no-such-script",
        "runuser -u dicom-watcher -- /opt/dicom-watcher/venv/bin/dicom-watcher status --jsn",
    ],
)
def test_a_broken_command_fails(line: str) -> None:
    with pytest.raises(AssertionError):
        check_command(shlex.split(line), "broken example")


def test_the_test_studys_python_line_writes_a_study(tmp_path: Path) -> None:
    """The one Python line of the manual's installation test, run as written
    but into a folder of the test's."""
    (block,) = [b for b in blocks_of("sh") if "write_study(StudySpec()" in b.text]
    (line,) = [argv for argv in commands(block) if argv[0].endswith("/python")]
    code = line[line.index("-c") + 1].replace("/tmp/test-study", str(tmp_path / "study"))
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert len(list((tmp_path / "study").iterdir())) == StudySpec().series * StudySpec().instances


# -- systemd drop-ins -------------------------------------------------------------------


def drop_in_unit(block: Block) -> str:
    """The unit a drop-in is for: the one `systemctl edit` names just before
    it, else the daemon's."""
    edits = re.findall(r"systemctl edit (\S+)", block.context)
    return edits[-1] if edits else "dicom-watcher.service"


@pytest.mark.parametrize("block", blocks_of("ini"), ids=str)
def test_drop_ins_pass_systemd_analyze_verify(block: Block, tmp_path: Path) -> None:
    units = install_units(tmp_path)
    unit = drop_in_unit(block)
    assert unit in {path.name for path in units.values()}, f"{block}: no unit {unit}"
    folder = tmp_path / f"{unit}.d"
    folder.mkdir()
    # (an ExecStart= of the installed program, as install_units does for the unit)
    text = block.text.replace(INSTALLED_DICOM_WATCHER, dicom_watcher_command())
    (folder / "override.conf").write_text(text, encoding="utf-8")
    problems = verify_problems([tmp_path / unit])
    assert not problems, f"{block}:\n" + "\n".join(problems)


def test_a_broken_drop_in_fails(tmp_path: Path) -> None:
    units = install_units(tmp_path)
    assert "dicom-watcher.service" in {path.name for path in units.values()}
    folder = tmp_path / "dicom-watcher.service.d"
    folder.mkdir()
    (folder / "override.conf").write_text("[Service]\nReadWritePath=-/mnt/x\n")
    assert verify_problems([tmp_path / "dicom-watcher.service"])


# -- the reverse proxy and logrotate --------------------------------------------------


@pytest.mark.parametrize("block", blocks_of("nginx"), ids=str)
def test_the_reverse_proxy_points_at_the_page(block: Block) -> None:
    (target,) = re.findall(r"proxy_pass\s+http://([^/;]+)/", block.text)
    assert target == Config().web_listen


@pytest.mark.usefixtures("doc_accounts")
@pytest.mark.parametrize("block", blocks_of("logrotate"), ids=str)
def test_the_logrotate_example_rotates_the_log_file_of_the_drop_in(
    block: Block, tmp_path: Path
) -> None:
    (rotated,) = re.findall(r"^(/\S+) \{", block.text, re.M)
    drop_ins = [b.text for b in blocks_of("ini") if "--log-file" in b.text]
    assert any(f"--log-file {rotated}" in text for text in drop_ins), rotated
    logrotate = shutil.which("logrotate", path="/usr/sbin:/usr/bin:/sbin")
    if logrotate is None:
        skip_or_fail("logrotate is not installed (Debian: logrotate)")
    config = tmp_path / "dicom-watcher"
    config.write_text(block.text.replace(rotated, str(tmp_path / "dicom-watcher.log")))
    (tmp_path / "dicom-watcher.log").write_text("a line\n")
    done = subprocess.run(
        [logrotate, "--debug", "--state", str(tmp_path / "state"), str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and "error" not in done.stderr.lower(), done.stderr
    assert "Handling 1 logs" in done.stderr, done.stderr


@pytest.mark.parametrize("block", blocks_of("bench-output"), ids=str)
def test_bench_output_is_what_the_bench_prints(block: Block) -> None:
    """A pasted report is scripts/bench's: its title, and its tools' names."""
    bench = (ROOT / "scripts" / "bench").read_text(encoding="utf-8")
    assert block.text.startswith("dicom-watcher benchmark (")
    assert "dicom-watcher benchmark (" in bench
    for tool in re.findall(r"^  (dicom-watcher [a-z -]+?|cp -r && sync)  ", block.text, re.M):
        assert tool.strip() in bench, tool


# -- Python examples ------------------------------------------------------------------


@pytest.fixture(scope="module")
def placed_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A study placed by `run --once`, as a lab finds it: its manifest."""
    root = tmp_path_factory.mktemp("placed")
    (root / "lab").mkdir()
    (root / "rules").mkdir()
    (root / "rules" / "lab.yaml").write_text(
        yaml.safe_dump(
            {
                "match": {},
                "destination": "../lab",
                "path": "{PatientID}/{StudyDate}/{SeriesNumber:03d}/{InstanceNumber:05d}.dcm",
            }
        )
    )
    write_study(StudySpec(series=2, instances=3), root / "inbox")
    (root / "config.yaml").write_text("inbox: inbox\nrules: rules\nstate: state\n")
    handlers = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            assert main(["run", "--once", "--config", str(root / "config.yaml")]) == 0
    finally:  # (`run` installs its stop handlers in this process)
        for number, handler in handlers.items():
            signal.signal(number, handler)
    (manifest,) = (root / "lab").rglob("manifest.json")
    return manifest


def test_the_manifest_reading_script_runs_on_a_placed_study(
    placed_manifest: Path, tmp_path: Path
) -> None:
    (block,) = [b for b in blocks_of("python") if b.doc.name == "labs.md"]
    script = tmp_path / "check_study.py"
    script.write_text(block.text)
    done = subprocess.run(
        [sys.executable, str(script), str(placed_manifest)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "SUBJ01: 6 files in series [1, 2]; hooks none"
    # and it notices a file that is not whole
    placed = next(placed_manifest.parent.rglob("*.dcm"))
    original = placed.read_bytes()
    try:
        placed.write_bytes(original[:-1])
        broken = subprocess.run(
            [sys.executable, str(script), str(placed_manifest)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        placed.write_bytes(original)
    assert broken.returncode != 0 and "not the bytes" in broken.stderr


def test_the_example_test_of_the_development_guide_passes(tmp_path: Path) -> None:
    (block,) = [b for b in blocks_of("python") if b.doc.name == "development.md"]
    example = tmp_path / "test_example.py"
    example.write_text(block.text)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(example)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT / "tests")},
    )
    assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout + done.stderr


# -- links -------------------------------------------------------------------------------


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def broken_links(doc: Path, text: str) -> list[str]:
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+://", target):
            continue
        path, _, fragment = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            broken.append(target)
            continue
        if fragment:
            headings = re.findall(r"^#+ (.+)$", file.read_text(encoding="utf-8"), re.M)
            if fragment not in {anchor(h) for h in headings}:
                broken.append(target)
    return broken


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_links_lead_somewhere(doc: Path) -> None:
    assert broken_links(doc, doc.read_text(encoding="utf-8")) == []


def test_a_broken_link_fails() -> None:
    doc = ROOT / "docs" / "labs.md"
    assert broken_links(doc, "[x](operators.md#no-such-part) [y](nowhere.md)") == [
        "operators.md#no-such-part",
        "nowhere.md",
    ]


# -- the tables name what the code has -------------------------------------------------


def table_names(text: str, header: str) -> set[str]:
    """The first column's `names` of the Markdown table whose header row
    starts with `header`."""
    start = text.index(f"| {header} |")
    names = set()
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        names |= set(re.findall(r"`([^`]+)`", line.split("|")[1]))
    return names


def test_the_operators_config_table_is_every_config_key() -> None:
    text = (ROOT / "docs" / "operators.md").read_text(encoding="utf-8")
    assert table_names(text, "key") == CONFIG_KEYS


def test_the_metrics_table_is_every_metric_served(placed_manifest: Path) -> None:
    from watcher.metrics import render

    state = placed_manifest.parents[3] / "state"
    status = json.loads((state / "status.json").read_text())
    served = set(re.findall(r"^# HELP (\S+)", render(status, time.time()).decode(), re.M))
    text = (ROOT / "docs" / "operators.md").read_text(encoding="utf-8")
    assert table_names(text, "metric") == served


def test_the_hook_variables_are_the_placeholders() -> None:
    text = (ROOT / "docs" / "labs.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`DW_([A-Z_]+)`", text))
    placeholders = set(re.findall(r"`\{([a-z_]+)\}`", text))
    assert {n.lower() for n in named} == set(HOOK_PLACEHOLDERS) == placeholders


def logged_events() -> set[str]:
    """Every string literal of the package: an event is one of them."""
    literals = set()
    for source in (ROOT / "watcher").glob("*.py"):
        literals |= set(re.findall(r'"([a-z_]+)"', source.read_text(encoding="utf-8")))
    return literals


def documented_events(text: str) -> set[str]:
    events = set(re.findall(r"event=([a-z_]+)", text))
    part = text.split("Others:", 1)[1].split("\n\n", 1)[0] if "Others:" in text else ""
    events |= set(re.findall(r"`([a-z_]+)`", part))
    return events


def test_the_log_events_of_the_manual_are_logged() -> None:
    text = (ROOT / "docs" / "operators.md").read_text(encoding="utf-8")
    events = documented_events(text)
    assert len(events) > 30
    assert events - logged_events() == set()


def test_a_log_event_the_code_does_not_have_fails() -> None:
    assert documented_events("x event=study_vanished y") - logged_events() == {"study_vanished"}


def test_the_commands_table_names_real_options() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    parser = build_parser()
    subparsers = next(
        action for action in parser._actions if action.__class__.__name__ == "_SubParsersAction"
    )
    rows = re.findall(r"^\| `dicom-watcher (\w+)([^`]*)`", text, re.M)
    assert {name for name, _ in rows} == set(subparsers.choices)  # type: ignore[attr-defined]
    for name, usage in rows:
        known = set(subparsers.choices[name]._option_string_actions)  # type: ignore[attr-defined]
        assert set(re.findall(r"--[a-z-]+", usage)) <= known, name
