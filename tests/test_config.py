"""The config file and what it gives each lab: `labs.<lab>.destinations` (a
lab's rule can never write outside its own folders), each key checked with
one clear error, and hook entries checked with file:line, through `check`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from watcher import cli
from watcher.config import load_config
from watcher.errors import ConfigError


def _check_with_config(
    tmp_path: Path, destinations: dict[str, list[str]], rules: dict[str, str], capsys
):
    """`dicom-watcher check --config FILE` on real rule files in lab folders
    (`rules` keys are `lab/name`); each lab may write under `destinations`
    and claims every study. Returns (status, stdout, {key: path of its file})."""
    folder = tmp_path / "rules"
    folder.mkdir()
    files = {}
    for key, text in rules.items():
        files[key] = folder / f"{key}.yaml"
        files[key].parent.mkdir(exist_ok=True)
        files[key].write_text(text, encoding="utf-8")
    labs = {lab: {"destinations": roots, "claims": "all"} for lab, roots in destinations.items()}
    config = tmp_path / "dicom-watcher.yaml"
    config.write_text(yaml.safe_dump({"rules": str(folder), "labs": labs}), encoding="utf-8")
    status = cli.main(["check", "--config", str(config)])
    return status, capsys.readouterr().out, files


def _rule(destination: Path, lab: str | None = None) -> str:
    text = "match: {}\n"
    if lab:
        text += f"lab: {lab}\n"
    # `destination` on line 3 (or 2 without a lab): the line a refusal points at.
    return text + f"destination: {destination}\npath: '{{PatientID}}/{{SOPInstanceUID}}.dcm'\n"


def test_a_sibling_folder_sharing_the_labs_root_name_as_a_prefix_is_refused(tmp_path, capsys):
    nas = tmp_path / "nas"
    (nas / "lab").mkdir(parents=True)
    (nas / "lab2").mkdir()
    status, out, files = _check_with_config(
        tmp_path,
        {"lab": [str(nas / "lab")]},
        {"lab/a": _rule(nas / "lab2")},  # /nas/lab2 is not inside /nas/lab
        capsys,
    )
    assert status == 1, out
    assert f"{files['lab/a']}:2: refused: destination {nas / 'lab2'} is outside" in out


def test_a_symbolic_link_inside_the_labs_root_to_another_area_is_refused(tmp_path, capsys):
    nas = tmp_path / "nas"
    (nas / "smith").mkdir(parents=True)
    (nas / "jones").mkdir()
    (nas / "smith" / "door").symlink_to(nas / "jones")
    status, out, files = _check_with_config(
        tmp_path,
        {"smith": [str(nas / "smith")], "jones": [str(nas / "jones")]},
        {"smith/a": _rule(nas / "smith" / "door")},
        capsys,
    )
    assert status == 1, out
    assert f"{files['smith/a']}:2: refused:" in out and "outside labs.smith.destinations" in out


def test_dotdot_out_of_the_labs_root_is_refused_and_a_real_subfolder_is_allowed(tmp_path, capsys):
    nas = tmp_path / "nas"
    (nas / "smith" / "dicom").mkdir(parents=True)
    (nas / "jones").mkdir()
    status, out, files = _check_with_config(
        tmp_path,
        {"smith": [str(nas / "smith")]},
        {
            "smith/good": _rule(nas / "smith" / "dicom", lab="smith"),
            "smith/sneaky": _rule(Path(f"{nas}/smith/../jones"), lab="smith"),
        },
        capsys,
    )
    assert status == 1, out
    assert f"{files['smith/sneaky']}:3: refused:" in out
    assert f"{files['smith/good']}:" not in out


def test_a_folder_that_is_no_lab_of_the_config_is_refused(tmp_path, capsys):
    nas = tmp_path / "nas"
    (nas / "smith").mkdir(parents=True)
    status, out, files = _check_with_config(
        tmp_path,
        {"smith": [str(nas / "smith")]},
        {"smith/a": _rule(nas / "smith"), "stranger/a": _rule(nas / "smith")},
        capsys,
    )
    assert status == 1, out
    assert f"{files['stranger/a'].parent}:0: folder stranger/ is not a lab of the config" in out


def test_relative_lab_roots_are_relative_to_the_config_file(tmp_path, capsys, monkeypatch):
    # The config lives elsewhere than the current folder: `nas/smith` in it
    # means <config folder>/nas/smith.
    (tmp_path / "nas" / "smith").mkdir(parents=True)
    monkeypatch.chdir("/")
    status, out, _ = _check_with_config(
        tmp_path, {"smith": ["nas/smith"]}, {"smith/a": _rule(tmp_path / "nas" / "smith")}, capsys
    )
    assert status == 0, out


# --- config validation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        ("quiet_seconds: -5\n", "quiet_seconds must be a number >= 0"),
        ("hook_concurrency: '3'\n", "hook_concurrency must be a number >= 0"),
        ("poll: 'yes please'\n", "poll must be true or false"),
        ("poll: 1\n", "poll must be true or false"),
        ("inbox: 5\n", "inbox must be a folder path"),
        ("quiet_secs: 5\n", "unknown key 'quiet_secs'"),
        ("allowed_destinations:\n  smith: [/nas]\n", "replaced by labs.<lab>.destinations"),
        ("labs: [a, b]\n", "labs must map lab names"),
        ("labs:\n  smith:\n    destinations: 5\n", "labs.smith.destinations must be a list"),
        ("labs:\n  ../x: {}\n", "labs.../x: a lab name is letters"),
        ("labs:\n  smith:\n    claim: all\n", "labs.smith: unknown key 'claim'"),
        ("labs:\n  smith:\n    claims: any\n", "labs.smith.claims must be `all` or a list"),
        ("labs:\n  smith:\n    claims: [{X: '('}]\n", "labs.smith.claims[1]: "),
        ("labs:\n  smith:\n    group: no-such-group-here\n", "labs.smith.group: unknown"),
        ("inbox: ./in\nquiet_seconds: [\n", "not valid YAML"),
    ],
)
def test_every_bad_config_value_is_one_clear_error(tmp_path, text, message):
    config = tmp_path / "dicom-watcher.yaml"
    config.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as raised:
        load_config(config)
    assert message in str(raised.value)
    assert str(config) in str(raised.value) and "\n" not in str(raised.value)


def test_a_yaml_error_in_the_config_names_its_line(tmp_path):
    config = tmp_path / "dicom-watcher.yaml"
    config.write_text("inbox: ./in\nstate: ./st\nquiet_seconds: 5\n  bad: indent\n")
    with pytest.raises(ConfigError, match=rf"^{config}:4: not valid YAML"):
        load_config(config)


# --- hook entries in rule files are validated, with file:line --------------------------------


@pytest.mark.parametrize(
    "hook, message",
    [
        ("{command: [record, '{nope}']}", "hook 1: unknown placeholder {nope}"),
        ("{command: [record], retries: 11}", "hook 1: retries must be a whole number from 0 to 10"),
        ("{command: [record], retries: -1}", "hook 1: retries must be a whole number from 0 to 10"),
        ("{command: [record], timeout: 0}", "hook 1: timeout must be a number of seconds > 0"),
        ("{command: 'record {study_folder}'}", "hook 1: command must be a list of arguments"),
        ("{command: [record], shell: true}", "hook 1: unknown key 'shell'"),
    ],
)
def test_a_bad_hook_is_reported_at_the_hooks_line(tmp_path, capsys, hook, message):
    lab = tmp_path / "lab"
    lab.mkdir()
    rules = tmp_path / "rules"
    rules.mkdir()
    rule = rules / "smith.yaml"
    rule.write_text(
        f"match: {{}}\ndestination: {lab}\npath: '{{PatientID}}.dcm'\nhooks:\n  - {hook}\n"
    )
    status = cli.main(["check", "--rules", str(rules)])
    out = capsys.readouterr().out
    assert status == 1, out
    assert f"{rule}:4: {message}" in out
