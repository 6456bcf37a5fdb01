"""Lab tenancy: a lab's rule files, in its own folder under rules/, reach
only what the operator's config gives that lab. Each test is an attack a
careless or hostile lab could make, and fails when its protection is gone."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
import unicodedata
from pathlib import Path

import pytest
import yaml
from harness import lab_files, wait_for

from watcher import cli
from watcher.config import load_config
from watcher.errors import ConfigError, DestinationUnavailable
from watcher.hooks import hook_values, substitute
from watcher.logs import JsonFormatter, KeyValueFormatter, escape, parse_pairs
from watcher.placement import TEMP_PREFIX, open_root
from watcher.rules import RuleBook, load_rule_file, load_rules
from watcher.synthetic import StudySpec, write_study

PATH = "{PatientID}/{SOPInstanceUID}.dcm"
SMITH_STUDY = {"StudyDescription": "SMITH^MEMORY", "PatientID": "P1", "SOPInstanceUID": "1.2"}
JONES_STUDY = {"StudyDescription": "JONES^VISION", "PatientID": "P2", "SOPInstanceUID": "1.3"}


class Centre:
    """A config with two labs (smith claims `^SMITH`, jones `^JONES`), their
    folders under rules/ and their trees under nas/."""

    def __init__(self, root: Path, **labs: dict[str, object]) -> None:
        self.root = root
        self.rules = root / "rules"
        self.rules.mkdir()
        self.nas = root / "nas"
        settings: dict[str, dict[str, object]] = {
            "smith": {"claims": [{"StudyDescription": "^SMITH\\^"}]},
            "jones": {"claims": [{"StudyDescription": "^JONES\\^"}]},
        }
        for name, extra in labs.items():
            settings.setdefault(name, {}).update(extra)
        for name, entry in settings.items():
            (self.nas / name).mkdir(parents=True)
            (self.rules / name).mkdir()
            entry.setdefault("destinations", [str(self.nas / name)])
        self.config_path = root / "dicom-watcher.yaml"
        self.config_path.write_text(
            yaml.safe_dump({"rules": str(self.rules), "labs": settings}), encoding="utf-8"
        )

    @property
    def labs(self):
        return load_config(self.config_path).labs

    def rule(self, where: str, destination: Path | None = None, **keys: object) -> Path:
        """rules/<where>.yaml (`lab/name` for a lab's file), taking everything
        into `destination` (default: the lab's tree) unless `keys` say otherwise."""
        lab = where.split("/")[0]
        data = {"match": {}, "destination": str(destination or self.nas / lab), "path": PATH}
        data.update(keys)
        file = self.rules / f"{where}.yaml"
        file.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        return file

    def load(self):
        return load_rules(self.rules, self.labs)

    def check(self, capsys) -> tuple[int, str]:
        status = cli.main(["check", "--config", str(self.config_path)])
        return status, capsys.readouterr().out


@pytest.fixture
def centre(tmp_path: Path) -> Centre:
    return Centre(tmp_path)


def names(rules) -> list[str]:
    return [rule.name for rule in rules]


# --- who a lab is comes from its folder, not from the rule file -----------------------------


def test_a_rule_claiming_another_lab_in_its_lab_key_is_refused_at_that_line(centre, capsys):
    file = centre.rule("smith/takeover", lab="jones")
    status, out = centre.check(capsys)
    assert status == 1
    assert f"{file}:4: lab: jones in a rule of lab smith's folder" in out
    assert centre.load().rules == ()


def test_a_lab_cannot_shadow_another_labs_or_the_operators_rule_by_name(centre):
    # aaa.yaml in smith's folder sorts first and is named like jones's rule
    # and the operator's: all three load, each in its own namespace.
    centre.rule("smith/aaa", name="joneslab")
    centre.rule("jones/joneslab")
    centre.rule("joneslab", destination=centre.nas)
    ruleset = centre.load()
    assert ruleset.problems == ()
    assert sorted(names(ruleset.rules)) == ["jones/joneslab", "joneslab", "smith/joneslab"]
    [jones] = [r for r in ruleset.rules if r.tenant == "jones"]
    assert jones.source == str(centre.rules / "jones" / "joneslab.yaml")


def test_a_lab_rule_writing_into_another_labs_tree_is_refused(centre, capsys):
    file = centre.rule("jones/steal", destination=centre.nas / "smith")
    status, out = centre.check(capsys)
    assert status == 1
    assert f"{file}:2: refused: destination {centre.nas / 'smith'} is outside" in out


def test_a_folder_that_is_no_lab_of_the_config_is_refused(centre):
    centre.rule("smith/a")
    (centre.rules / "stranger").mkdir()
    centre.rule("stranger/a", destination=centre.nas / "smith")
    ruleset = centre.load()
    assert names(ruleset.rules) == ["smith/a"]
    assert any("stranger/ is not a lab of the config" in str(p) for p in ruleset.problems)


def test_without_labs_a_subfolder_is_a_warning_and_the_operators_rules_load(tmp_path, capsys):
    rules = tmp_path / "rules"
    (rules / "examples").mkdir(parents=True)
    (rules / "examples" / "a.yaml").write_text(f"match: {{}}\ndestination: /\npath: '{PATH}'\n")
    (rules / "top.yaml").write_text(f"match: {{}}\ndestination: {tmp_path}\npath: '{PATH}'\n")
    status = cli.main(["check", "--rules", str(rules)])
    out = capsys.readouterr().out
    assert status == 0, out
    assert f"{rules / 'examples'}: warning: folder examples/ is not a lab" in out
    assert "ok: 1 rule(s)" in out and ": top" in out


# --- what a lab may take ---------------------------------------------------------------------


def test_a_catch_all_exclusive_lab_rule_takes_only_what_its_lab_claims(centre):
    # The attack: match everything, exclusive, a huge priority.
    centre.rule("smith/everything", exclusive=True, priority=10**9)
    centre.rule("jones/vision", match={"StudyDescription": "^JONES"})
    centre.rule("archive", destination=centre.nas)  # the operator's: takes everything
    ruleset = centre.load()
    assert ruleset.problems == ()
    assert names(ruleset.matching(SMITH_STUDY)) == ["smith/everything", "archive"]
    assert names(ruleset.matching(JONES_STUDY)) == ["archive", "jones/vision"]


def test_a_lab_exclusive_rule_wins_only_among_its_own_rules(tmp_path):
    centre = Centre(tmp_path, jones={"claims": "all"})
    centre.rule("smith/first", exclusive=True, priority=5)
    centre.rule("smith/second")
    centre.rule("jones/all")
    ruleset = centre.load()
    assert names(ruleset.matching(SMITH_STUDY)) == ["smith/first", "jones/all"]


def test_the_operators_exclusive_rule_still_takes_from_everyone(centre):
    centre.rule("smith/all")
    centre.rule("quarantine", destination=centre.nas, exclusive=True)
    assert names(centre.load().matching(SMITH_STUDY)) == ["quarantine"]


def test_a_lab_without_claims_takes_nothing_and_check_says_so(tmp_path, capsys):
    centre = Centre(tmp_path, lazy={"claims": None})
    centre.rule("lazy/all")
    status, out = centre.check(capsys)
    assert status == 0, out
    assert "warning: lab lazy has no claims: its rules take nothing" in out
    assert centre.load().matching(SMITH_STUDY) == []


def test_claims_all_takes_any_study(tmp_path):
    centre = Centre(tmp_path, core={"claims": "all"})
    centre.rule("core/all")
    ruleset = centre.load()
    assert names(ruleset.matching(SMITH_STUDY)) == ["core/all"]
    assert names(ruleset.matching(JONES_STUDY)) == ["core/all"]


def test_a_claim_on_a_field_no_rule_names_is_read_and_holds(daemon, tmp_path):
    # The daemon reads only the header fields rules need: a claim's fields
    # are among them, or the claim could never hold.
    smith = tmp_path / "nas" / "smith"
    smith.mkdir(parents=True)
    run = daemon(
        labs={
            "smith": {"destinations": [str(smith)], "claims": [{"InstitutionName": "^Princeton"}]}
        }
    )
    run.add_rule("smith/all", smith, path="{PatientID}/{InstanceNumber:05d}.dcm")
    write_study(StudySpec(series=1, instances=2), run.inbox)
    write_study(
        StudySpec(series=1, instances=1, patient_id="SUBJ02", institution="Yale"), run.inbox
    )
    run.start()
    run.wait_event("study_placed")
    run.wait_event("study_unmatched")
    assert [p.relative_to(smith).as_posix() for p in lab_files(smith)] == [
        "SUBJ01/00001.dcm",
        "SUBJ01/00002.dcm",
    ]


def test_two_labs_destinations_may_not_overlap(tmp_path):
    nas = tmp_path / "nas"
    config = tmp_path / "dicom-watcher.yaml"
    config.write_text(
        yaml.safe_dump(
            {"labs": {"a": {"destinations": [str(nas)]}, "b": {"destinations": [str(nas / "b")]}}}
        )
    )
    with pytest.raises(
        ConfigError, match=r"labs.a.destinations .* and labs.b.destinations .* overlap"
    ):
        load_config(config)


# --- the lab's rules folder is the lab's and the operator's only -----------------------------


def test_a_world_writable_lab_folder_is_refused(centre):
    centre.rule("smith/a")
    (centre.rules / "smith").chmod(0o777)
    ruleset = centre.load()
    assert ruleset.rules == ()
    assert "refused: the folder is writable by everyone" in str(ruleset.problems[0])


def test_a_world_writable_rule_file_is_refused(centre):
    file = centre.rule("smith/a")
    file.chmod(0o666)
    ruleset = centre.load()
    assert ruleset.rules == ()
    assert f"{file}:0: cannot read: refused: the file is writable by everyone" in str(
        ruleset.problems[0]
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a folder's group and owner needs root")
def test_a_lab_folder_writable_by_another_group_or_owned_by_a_lab_member_is_refused(tmp_path):
    centre = Centre(tmp_path, smith={"group": 0})
    centre.rule("smith/a")
    folder = centre.rules / "smith"
    folder.chmod(0o2775)
    assert names(centre.load().rules) == ["smith/a"]  # group root, the lab's: fine
    os.chown(folder, 0, 4242)
    problems = [str(p) for p in centre.load().problems]
    assert problems == [
        f"{folder}:0: refused: the folder is writable by group 4242, not the lab's group root"
    ]
    os.chown(folder, 4242, 0)
    problems = [str(p) for p in centre.load().problems]
    assert problems == [
        f"{folder}:0: refused: the folder must belong to the operator (root), not uid 4242"
    ]


def test_symbolic_links_for_a_lab_folder_or_rule_file_are_refused(centre):
    elsewhere = centre.root / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "x.yaml").write_text(
        f"match: {{}}\ndestination: {centre.nas / 'smith'}\npath: '{PATH}'\n"
    )
    (centre.rules / "smith" / "linked.yaml").symlink_to(elsewhere / "x.yaml")
    (centre.rules / "jones").rmdir()
    (centre.rules / "jones").symlink_to(elsewhere)
    ruleset = centre.load()
    assert ruleset.rules == ()
    problems = sorted(str(p) for p in ruleset.problems)
    assert problems == [
        f"{centre.rules / 'jones'}:0: a lab's folder may not be a symbolic link: refused",
        f"{centre.rules / 'smith' / 'linked.yaml'}:0: refused: a lab's rule file must be a "
        "regular file, not a link",
    ]


def test_a_fifo_for_a_rule_file_never_blocks_the_loader(centre):
    fifo = centre.rules / "smith" / "a.yaml"
    os.mkfifo(fifo)
    # Found as a FIFO: refused without opening it.
    assert "must be a regular file" in str(centre.load().problems[0])
    # Swapped in after the folder was listed: opened without blocking, refused.
    result: list[object] = []
    reader = threading.Thread(
        target=lambda: result.append(load_rule_file(fifo, centre.labs, "smith"))
    )
    reader.start()
    reader.join(10)
    if reader.is_alive():
        with open(fifo, "w"):  # unblock it, then fail
            pass
        reader.join()
        pytest.fail("reading a FIFO rule file blocked")
    rule, problems = result[0]
    assert rule is None and "not a regular file" in str(problems[0])


def test_a_rule_book_reloads_when_a_lab_folder_becomes_writable_by_everyone(centre):
    centre.rule("smith/a")
    book = RuleBook(centre.rules, centre.labs)
    assert book.refresh() == []
    assert names(book.ruleset.rules) == ["smith/a"]
    (centre.rules / "smith").chmod(0o777)
    problems = book.refresh()
    assert problems and "writable by everyone" in str(problems[0])
    assert book.ruleset.rules == ()


# --- modes and groups -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, mode, message",
    [
        ("file_mode", "6777", "file_mode 6777 is refused"),
        ("file_mode", "4640", "file_mode 4640 is refused"),
        ("file_mode", "2640", "file_mode 2640 is refused"),
        ("file_mode", "0646", "file_mode 0646 is refused"),
        ("folder_mode", "1777", "folder_mode 1777 is refused"),
        ("folder_mode", "4750", "folder_mode 4750 is refused"),
    ],
)
def test_check_refuses_dangerous_modes_at_their_line(centre, capsys, key, mode, message):
    file = centre.rule("smith/a", **{key: mode})
    status, out = centre.check(capsys)
    assert status == 1
    assert f"{file}:4: {message}" in out


def test_a_setgid_folder_mode_is_allowed(centre):
    centre.rule("smith/a", folder_mode="2770", file_mode="0640")
    [rule] = centre.load().rules
    assert (rule.folder_mode, rule.file_mode) == (0o2770, 0o640)


def test_a_lab_rule_cannot_choose_another_group(tmp_path, capsys):
    centre = Centre(tmp_path, smith={"group": 0})
    file = centre.rule("smith/a", group=1)
    status, out = centre.check(capsys)
    assert status == 1
    assert f"{file}:4: refused: a lab's files get the group the config gives it" in out
    centre.rule("smith/a")
    [rule] = centre.load().rules
    assert rule.group == 0  # the lab's group, from the config


# --- labs can see what they will get --------------------------------------------------------


def _preview_centre(centre: Centre) -> Path:
    """smith: an exclusive catch-all and an MR rule; jones: a catch-all; the
    operator: an archive of everything. Returns a folder with a study for
    smith (3 files) and one for nobody's claim (2 files)."""
    (centre.nas / "smith" / "mr").mkdir()
    (centre.nas / "archive").mkdir()
    centre.rule("smith/memory", exclusive=True)
    centre.rule("smith/mr", centre.nas / "smith" / "mr", match={"Modality": "^MR$"})
    centre.rule("jones/all")
    centre.rule("archive", centre.nas / "archive")
    samples = centre.root / "samples"
    write_study(StudySpec(series=1, instances=3, patient_id="P1", description="SMITH^Mem"), samples)
    write_study(StudySpec(series=1, instances=2, patient_id="P2", description="OTHER"), samples)
    return samples


def _study_blocks(out: str) -> dict[str, str]:
    """The preview's lines per study, by PatientID."""
    blocks = {}
    for block in out.split("study ")[1:]:
        blocks[block.split("patient='")[1].split("'")[0]] = block
    return blocks


@pytest.mark.parametrize("command", ["preview", "check"])
def test_preview_and_check_show_per_lab_which_rules_and_claims_take_an_instance(
    centre, capsys, command
):
    samples = _preview_centre(centre)
    status = cli.main([command, "--config", str(centre.config_path), str(samples)])
    out = capsys.readouterr().out
    assert status == 0, out
    smiths, nobodys = _study_blocks(out)["P1"], _study_blocks(out)["P2"]
    nas = centre.nas
    assert f"  rule archive -> {nas / 'archive'} (3 files)" in smiths
    assert "  lab smith:\n    claim 1 (StudyDescription ~ ^SMITH\\^) allows 3 file(s)\n" in smiths
    assert f"    rule smith/memory -> {nas / 'smith'} (3 files)" in smiths
    assert (
        "    rule smith/mr: matches 3 file(s), not taken: exclusive rule smith/memory takes them"
        in (smiths)
    )
    assert (
        "  lab jones:\n    rule jones/all: matches 3 file(s), blocked: no claim of lab jones "
        "holds (claims: StudyDescription ~ ^JONES\\^)"
    ) in smiths
    assert "rule jones/all ->" not in smiths
    assert f"  rule archive -> {nas / 'archive'} (2 files)" in nobodys
    assert "rule smith/memory: matches 2 file(s), blocked: no claim of lab smith holds" in nobodys
    assert "claim 1" not in nobodys and "unmatched" not in nobodys
    if command == "check":
        assert (
            f"lab smith: takes StudyDescription ~ ^SMITH\\^; writes under {nas / 'smith'}; "
            "rules: smith/memory, smith/mr"
        ) in out


def test_preview_without_the_config_sees_no_labs_and_says_so(centre, capsys):
    samples = _preview_centre(centre)
    cli.main(["preview", "--rules", str(centre.rules), str(samples)])
    captured = capsys.readouterr()
    assert "lab smith" not in captured.out and "rule smith/" not in captured.out
    assert f"{centre.rules / 'smith'}: warning:" in captured.out + captured.err


def test_check_warns_only_when_the_operators_exclusive_rule_takes_from_a_lab(centre, capsys):
    centre.rule("smith/memory")
    centre.rule("archive", centre.nas / "smith")
    assert "may match" not in centre.check(capsys)[1]
    centre.rule("archive", centre.nas / "smith", exclusive=True)
    out = centre.check(capsys)[1]
    assert (
        f"{centre.rules / 'smith' / 'memory.yaml'}: warning: the operator's exclusive rule archive "
        "takes what it and smith/memory both match"
    ) in out


# --- linear-time matching ------------------------------------------------------------------


def test_a_catastrophic_pattern_neither_pins_the_daemon_nor_delays_other_labs(daemon, tmp_path):
    # Backtracking engines take exponential time on these against a long
    # value: the loop would never come back, SIGTERM would never be acted on.
    smith, jones = tmp_path / "nas" / "smith", tmp_path / "nas" / "jones"
    smith.mkdir(parents=True)
    jones.mkdir(parents=True)
    run = daemon(
        labs={
            "smith": {"destinations": [str(smith)], "claims": "all"},
            "jones": {"destinations": [str(jones)], "claims": "all"},
        }
    )
    run.add_rule("smith/uid", smith, match={"StudyInstanceUID": "^([0-9.]+)+x"})
    run.add_rule("smith/patient", smith, match={"PatientID": "(a+)+$"})
    run.add_rule("jones/all", jones)
    uid = "1.2." + ".".join(["1234567"] * 7)  # 60 characters, all of them digits and dots
    write_study(
        StudySpec(series=1, instances=2, study_uid=uid, patient_id="a" * 60 + "!"), run.inbox
    )
    run.start()
    run.wait_event("study_placed", timeout=60)
    assert len(lab_files(jones)) == 2 and lab_files(smith) == []
    assert run.terminate() == 0


def test_check_names_a_pattern_re2_cannot_take_at_its_line_with_a_hint(centre):
    file = centre.rule("smith/a", match={"StudyDescription": "^(?!JONES)", "PatientID": r"(a)\1"})
    result = subprocess.run(
        [sys.executable, "-m", "watcher", "check", "--config", str(centre.config_path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert (
        f"{file}:2: bad regular expression for StudyDescription: invalid perl operator: (?! "
        "(negative look-aheads are not supported" in result.stdout
    )
    assert f"{file}:3: bad regular expression for PatientID: invalid escape sequence: \\1" in (
        result.stdout
    )
    # Only the command's own lines: nothing from RE2's logging.
    assert result.stderr.splitlines() == [f"2 problem(s) in {centre.rules}"]


# --- the lab's tree is hostile ground --------------------------------------------------------


def _two_labs(daemon, tmp_path, smith_destination: Path | None = None):
    """A daemon with labs smith and jones (each claiming everything); smith's
    rule writes `{PatientID}/{InstanceNumber}` into `smith_destination`."""
    smith, jones = tmp_path / "nas" / "smith", tmp_path / "nas" / "jones"
    smith.mkdir(parents=True, exist_ok=True)
    jones.mkdir(parents=True, exist_ok=True)
    run = daemon(
        labs={
            "smith": {"destinations": [str(smith)], "claims": "all"},
            "jones": {"destinations": [str(jones)], "claims": "all"},
        }
    )
    run.add_rule("smith/a", smith_destination or smith, path="{PatientID}/{InstanceNumber:05d}.dcm")
    return run, smith, jones


def test_a_folder_swapped_for_a_link_after_the_rule_loaded_parks_the_study(daemon, tmp_path):
    smith, jones = tmp_path / "nas" / "smith", tmp_path / "nas" / "jones"
    (smith / "projects" / "dicom").mkdir(parents=True)
    run, _, _ = _two_labs(daemon, tmp_path, smith / "projects" / "dicom")
    run.start()
    run.wait_event("rules_loaded")
    # The lab swaps a folder on the way to its destination for a link into
    # jones's tree, which has the same layout.
    (jones / "dicom").mkdir()
    (smith / "projects").rename(smith / "projects.real")
    (smith / "projects").symlink_to(jones)
    write_study(StudySpec(series=1, instances=2), run.inbox)
    [parked] = run.wait_event("study_parked")
    assert "'projects' on the way to it is now a symbolic link" in parked["error"]
    assert list(jones.rglob("*.dcm")) == []
    (smith / "projects").unlink()
    (smith / "projects.real").rename(smith / "projects")
    run.wait_event("study_resumed", timeout=60)
    run.wait_event("study_placed")
    assert len(list((smith / "projects" / "dicom").rglob("*.dcm"))) == 2
    assert list(jones.rglob("*")) == [jones / "dicom"]


def test_links_at_the_manifests_names_never_reach_another_labs_file(daemon, tmp_path):
    run, smith, jones = _two_labs(daemon, tmp_path)
    victim = jones / "results.txt"
    victim.write_text("jones's results\n")
    victim.chmod(0o600)
    before = (victim.read_bytes(), victim.stat().st_mode, victim.stat().st_gid)
    run.start()
    run.wait_event("rules_loaded")
    study = smith / "SUBJ01"
    study.mkdir()
    # The names a predictable writer would use for its temporary manifest...
    for pid in range(run.process.pid, run.process.pid + 64):
        (study / f"{TEMP_PREFIX}{pid}.manifest.json").symlink_to(victim)
    write_study(StudySpec(series=1, instances=2), run.inbox)
    run.wait_event("manifest_written")
    assert (victim.read_bytes(), victim.stat().st_mode, victim.stat().st_gid) == before
    assert json.loads((study / "manifest.json").read_text())["files"] == 2
    # ... and the manifest's own name: neither read (merged) nor replaced.
    (study / "manifest.json").unlink()
    (study / "manifest.json").symlink_to(victim)
    write_study(
        StudySpec(series=1, instances=1, study_uid="1.2.3.4.5", patient_id="SUBJ01"), run.inbox
    )
    [failed] = run.wait_event("manifest_failed")
    assert "manifest.json is a symbolic link: left as it is" in failed["error"]
    assert (study / "manifest.json").is_symlink()
    assert (victim.read_bytes(), victim.stat().st_mode, victim.stat().st_gid) == before


def test_a_fifo_at_the_manifests_name_never_blocks_the_daemon(daemon, tmp_path):
    run, smith, jones = _two_labs(daemon, tmp_path)
    run.add_rule("jones/a", jones)
    run.start()
    run.wait_event("rules_loaded")
    (smith / "SUBJ01").mkdir()
    os.mkfifo(smith / "SUBJ01" / "manifest.json")
    write_study(StudySpec(series=1, instances=2), run.inbox)
    [failed] = run.wait_event("manifest_failed")
    assert "manifest.json is not a regular file" in failed["error"]
    # The daemon goes on: the next study is placed for both labs.
    write_study(StudySpec(series=1, instances=1, patient_id="SUBJ02"), run.inbox)
    run.wait_event("study_placed", count=4)
    assert (smith / "SUBJ02" / "manifest.json").is_file()


@pytest.mark.skipif(os.geteuid() != 0, reason="giving folders other groups needs root")
def test_files_linked_from_the_inbox_get_the_setgid_folders_group(daemon, tmp_path):
    run, smith, _ = _two_labs(daemon, tmp_path)
    os.chown(smith, -1, 4244)
    smith.chmod(0o2775)
    os.chown(run.inbox, -1, 4243)
    run.inbox.chmod(0o2775)  # storescp's files get the inbox's group
    write_study(StudySpec(series=1, instances=3), run.inbox)
    assert {p.stat().st_gid for p in run.inbox.rglob("*") if p.is_file()} == {4243}
    run.start()
    run.wait_event("study_placed")
    placed = list(smith.rglob("*.dcm"))
    assert len(placed) == 3
    assert {p.stat().st_gid for p in placed} == {4244}
    assert all(p.stat().st_nlink == 1 for p in placed)  # linked, then the inbox name removed


def test_a_labs_long_quiet_period_and_count_never_delay_another_labs_copies(daemon, tmp_path):
    run, smith, jones = _two_labs(daemon, tmp_path)
    run.add_rule("smith/slow", smith / "slow", quiet_seconds=100000000, expected_instances=10**6)
    (smith / "slow").mkdir()
    run.add_rule("jones/a", jones)
    run.start()
    write_study(StudySpec(series=1, instances=2), run.inbox)
    placed = run.wait_event("study_placed", count=3, timeout=60)  # the config's short quiet
    assert {line["rule"] for line in placed} == {"smith/a", "smith/slow", "jones/a"}
    assert len(lab_files(jones)) == 2
    # A study for smith alone waits as smith's rules say.
    run.add_rule("jones/a", jones, match={"StudyDescription": "^JONES"})
    run.wait_event("rules_loaded", count=2)
    write_study(StudySpec(series=1, instances=1, patient_id="SUBJ02"), run.inbox)

    def waiting() -> list[int]:
        studies = run.status().get("studies", [])
        return [int(s["next"].split()[2]) for s in studies if s["patient"] == "SUBJ02"]  # type: ignore[index]

    [left] = wait_for(waiting, 30, "the study for smith alone to be pending")
    assert left > 1000000
    assert not (smith / "SUBJ02").exists()


# --- logs and hook values ------------------------------------------------------------------

# A header value that would clear an operator's terminal and forge a log line.
HOSTILE_ID = (
    "P1\x1b[2J\x1b]0;pwned\x07\r\n2026-12-07T00:00:00Z level=ERROR event=forged\u202e\u2028"
)


def _unescaped(text: str) -> list[str]:
    return sorted(
        {
            c
            for c in text
            if c != "\n" and (ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 or c in "\u202e\u2028")
        }
    )


@pytest.mark.parametrize("log_format", ["kv", "json"])
def test_control_characters_from_headers_never_reach_the_log_raw(daemon, tmp_path, log_format):
    run = daemon()
    (tmp_path / "nas").mkdir()
    run.add_rule("all", tmp_path / "nas", path="{StudyInstanceUID}/{InstanceNumber:05d}.dcm")
    write_study(StudySpec(series=1, instances=1, patient_id=HOSTILE_ID), run.inbox)
    run.start("--log-format", log_format)
    wait_for(lambda: "study_placed" in run.log_path.read_text(), 30, "the study to be placed")
    assert run.terminate() == 0
    text = run.log_path.read_text(encoding="utf-8")
    assert _unescaped(text) == []
    assert "escape sequence" not in text, "pydicom's own warnings stay out of the log"
    lines = [line for line in text.splitlines() if "study_placed" in line]
    assert len(lines) == 1
    record = (
        json.loads(lines[0]) if log_format == "json" else parse_pairs(lines[0].split(" ", 2)[2])
    )
    assert record["event"] == "study_placed" and record["patient"] == HOSTILE_ID
    assert (
        "forged" not in {json.loads(line).get("event") for line in text.splitlines()}
        if (log_format == "json")
        else not any(line.startswith("2026-12-07T00:00:00Z") for line in text.splitlines())
    )


def test_values_logged_another_way_are_escaped_by_the_formatters():
    record = logging.LogRecord("watcher", logging.INFO, __file__, 1, "raw %s", (HOSTILE_ID,), None)
    for formatter in (KeyValueFormatter(), JsonFormatter()):
        line = formatter.format(record)
        assert "\n" not in line and _unescaped(line) == []
    assert json.loads(JsonFormatter().format(record))["message"] == f"raw {HOSTILE_ID}"


@pytest.mark.parametrize("value", ["..", ".", "", "../../etc", "-rf", " .. "])
def test_a_header_value_never_makes_a_dot_dot_component_in_a_hook_argument(value, tmp_path):
    values = hook_values(
        study_folder=tmp_path,
        lab="smith",
        rule="smith/a",
        patient=value,
        study_uid=value,
        files=1,
        manifest=None,
        destination=tmp_path,
    )
    for argument in substitute(
        ("/data/{patient}/{study_uid}", "{patient}{study_uid}", "{patient}"), values
    ):
        assert not set(argument.split("/")) & {".", ".."}, argument
        assert argument and not argument.startswith("-")


def test_every_control_format_and_separator_character_is_escaped():
    unsafe = [
        chr(c)
        for c in range(0x110000)
        if not 0xD800 <= c <= 0xDFFF and unicodedata.category(chr(c)) in ("Cc", "Cf", "Zl", "Zp")
    ]
    assert [c for c in unsafe if escape(c) == c] == []
    assert escape("Müller^Zoë 山田") == "Müller^Zoë 山田"


# --- what a lab can do to its root and its rule files ------------------------------------------


def test_a_lab_that_swaps_its_root_for_a_link_reaches_no_other_tree(tmp_path):
    # smith may write only under nas/smith/dicom, but owns nas/smith: it can
    # put a link to jones's tree in place of its root.
    centre = Centre(tmp_path, smith={"destinations": [str(tmp_path / "nas" / "smith" / "dicom")]})
    root = centre.nas / "smith" / "dicom"
    root.mkdir()
    (centre.nas / "jones" / "dicom").mkdir()
    centre.rule("smith/a", root)
    labs = centre.labs  # as the daemon loaded them at its start
    [rule] = load_rules(centre.rules, labs).rules
    root.rename(centre.nas / "smith" / "was-dicom")
    root.symlink_to(centre.nas / "jones" / "dicom")
    # A placement of the rule loaded before goes nowhere...
    with pytest.raises(DestinationUnavailable, match="'dicom' on the way to it is now a symbolic"):
        open_root(rule.destination, rule.anchor, rule.beneath)
    # ... and the rule loaded again after the swap is refused.
    reloaded = load_rules(centre.rules, labs)
    assert reloaded.rules == ()
    assert "is outside labs.smith.destinations" in str(reloaded.problems[0])


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("match: {}\ndescription: " + "[" * 5000 + "]" * 5000 + "\n", 2, "nested more than 16"),
        (
            "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n"
            + "".join(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 9))
            + "name: *a8\n",
            1,
            "YAML anchors and aliases (&name, *name) are not allowed",
        ),
    ],
    ids=["deeply-nested", "alias-bomb"],
)
def test_a_rule_file_built_to_exhaust_the_parser_is_refused_at_once(centre, text, line, message):
    file = centre.rules / "smith" / "bomb.yaml"
    file.write_text(text)
    centre.rule("smith/fine")
    started = time.monotonic()
    ruleset = centre.load()
    assert time.monotonic() - started < 30  # (a guard against a hang, not a timing target)
    assert [rule.name for rule in ruleset.rules] == ["smith/fine"]
    [problem] = ruleset.problems
    assert str(problem).startswith(f"{file}:{line}: {message}")


def test_a_labs_long_quiet_period_holds_no_copy_of_a_study_another_lab_takes_later_instances_of(
    daemon, tmp_path
):
    # The study's first instances are MR, which smith alone takes (with a
    # quiet period of years); its later CT instances are jones's too. Which
    # labs share a study comes from all its instances, not the first.
    run, smith, jones = _two_labs(daemon, tmp_path)
    run.add_rule("smith/slow", smith / "slow", quiet_seconds=100000000, expected_instances=10**6)
    (smith / "slow").mkdir()
    run.add_rule("jones/ct", jones, match={"Modality": "^CT$"})
    run.start()
    run.wait_event("started")
    uid = "1.2.826.0.1.3680043.10.1389.77"
    write_study(StudySpec(series=1, instances=2, study_uid=uid), run.inbox)
    wait_for(lambda: run.status().get("studies"), 30, "the MR instances to be read")
    ct = StudySpec(series=1, instances=2, study_uid=uid, extra={"Modality": "CT"})
    write_study(ct, run.inbox / "ct")
    placed = run.wait_event("study_placed", count=3, timeout=60)  # the config's short quiet
    assert {line["rule"] for line in placed} == {"smith/a", "smith/slow", "jones/ct"}
    assert len(lab_files(jones)) == 2
