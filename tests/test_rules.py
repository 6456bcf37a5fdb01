"""Rule files: loading, matching, and validation reported as `file:line: message`,
then `dicom-watcher check` on real rule folders."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from watcher import cli, headers
from watcher.rules import RuleBook, load_rule_file, load_rules

SMITH = """\
name: smithlab
match:
  StudyDescription: "^SMITH"
  InstitutionName: "(?i)princeton"
destination: {destination}
path: "{{PatientID}}/{{StudyDate}}_{{StudyDescription}}/\
{{SeriesNumber:03d}}_{{SeriesDescription}}/{{InstanceNumber:05d}}.dcm"
"""


@pytest.fixture
def lab(tmp_path: Path) -> Path:
    folder = tmp_path / "nas" / "smithlab"
    folder.mkdir(parents=True)
    return folder


def problems_of(folder: Path) -> list[str]:
    return [str(problem) for problem in load_rules(folder).problems]


# --- loading -------------------------------------------------------------------


def test_a_valid_rule_loads(rules_dir, lab):
    file = rules_dir.write("smith", SMITH.format(destination=lab))
    ruleset = load_rules(rules_dir.path)
    assert ruleset.problems == ()
    [rule] = ruleset.rules
    assert rule.name == "smithlab"
    assert rule.source == str(file)
    assert rule.destination == lab
    assert [(c.field, c.pattern.pattern) for c in rule.match] == [
        ("StudyDescription", "^SMITH"),
        ("InstitutionName", "(?i)princeton"),
    ]
    assert rule.path.source.startswith("{PatientID}/")
    assert {"StudyDescription", "InstitutionName", "PatientID", "SeriesNumber"} <= rule.fields
    assert {"StudyDescription", "InstitutionName"} <= ruleset.fields


def test_name_defaults_to_the_stem_and_a_relative_destination_is_beside_the_rules(rules_dir):
    rules_dir.write(
        "jones-lab.yml", "match: {}\ndestination: ../labs/jones\npath: '{PatientID}.dcm'\n"
    )
    [rule] = load_rules(rules_dir.path).rules
    assert rule.name == "jones-lab"
    assert rule.destination == rules_dir.path.parent / "labs" / "jones"


def test_files_that_are_not_yaml_are_ignored_and_an_empty_folder_is_reported(rules_dir, lab):
    (rules_dir.path / "README.txt").write_text("not a rule")
    (rules_dir.path / "smith.yaml.orig").write_text("name: [broken")
    assert [str(p) for p in load_rules(rules_dir.path).problems] == [
        f"{rules_dir.path}:0: no rule files (*.yaml) in this folder"
    ]
    rules_dir.rule("smith", lab)
    assert load_rules(rules_dir.path).problems == ()


# --- matching ------------------------------------------------------------------

VALUES = {
    "StudyDescription": "SMITH^Memory",
    "InstitutionName": "Princeton University",
    "ImageType": "ORIGINAL\\PRIMARY\\M\\ND",
    "PatientName": "Doe^Jane",
    "PatientID": "",
}


@pytest.mark.parametrize(
    ("match", "expected"),
    [
        ({}, True),  # matches everything
        ({"StudyDescription": "^SMITH"}, True),
        ({"StudyDescription": "Memory"}, True),  # searched, not anchored
        ({"StudyDescription": "^Memory"}, False),
        ({"StudyDescription": "^smith"}, False),  # case matters unless (?i)
        ({"InstitutionName": "(?i)princeton"}, True),
        ({"StudyDescription": "^SMITH", "InstitutionName": "Yale"}, False),  # all must match
        ({"SeriesDescription": ".*"}, False),  # absent field: no match, whatever the pattern
        ({"SeriesDescription": ""}, False),
        ({"PatientID": ".*"}, False),  # empty field: no match
        ({"PatientID": "^$"}, False),
        ({"ImageType": "PRIMARY"}, True),  # multi-valued: searched in "A\B" form
        ({"ImageType": r"^ORIGINAL\\PRIMARY"}, True),
        ({"ImageType": r"ORIGINAL\\SECONDARY"}, False),
        ({"PatientName": "^Doe\\^Jane$"}, True),
        ({"PatientName.family": "^Doe$"}, True),
        ({"PatientName.given": "^Doe$"}, False),
    ],
)
def test_match_semantics(rules_dir, lab, match, expected):
    rules_dir.rule("smith", lab, match=match)
    ruleset = load_rules(rules_dir.path)
    assert ruleset.problems == ()
    [rule] = ruleset.rules
    assert rule.matches(VALUES) is expected
    routes = ruleset.route(VALUES)
    assert len(routes) == (1 if expected else 0)


def test_a_route_says_where_and_which_values_decided(rules_dir, lab):
    rules_dir.write("smith", SMITH.format(destination=lab))
    ruleset = load_rules(rules_dir.path)
    values = {
        **VALUES,
        "PatientID": "SUBJ01",
        "StudyDate": "20261125",
        "SeriesNumber": "3",
        "SeriesDescription": "rfMRI_REST",
        "InstanceNumber": "12",
    }
    [route] = ruleset.route(values)
    assert route.relative_path == "SUBJ01/20261125_SMITH^Memory/003_rfMRI_REST/00012.dcm"
    assert route.decided_by == (
        ("StudyDescription", "SMITH^Memory"),
        ("InstitutionName", "Princeton University"),
    )


def test_matching_a_real_file(rules_dir, lab, make_dicom, tmp_path):
    rules_dir.rule("smith", lab, match={"ImageType": r"ORIGINAL\\PRIMARY", "Modality": "^MR$"})
    ruleset = load_rules(rules_dir.path)
    tags = headers.tags_for(ruleset.fields)
    primary = make_dicom(tmp_path / "in", ImageType=["ORIGINAL", "PRIMARY", "M"])
    derived = make_dicom(tmp_path / "in", ImageType=["DERIVED", "PRIMARY"])
    untyped = make_dicom(tmp_path / "in")
    assert len(ruleset.route(headers.read_instance(primary, tags).values)) == 1
    assert ruleset.route(headers.read_instance(derived, tags).values) == []
    assert ruleset.route(headers.read_instance(untyped, tags).values) == []


def test_every_matching_rule_gets_a_route(rules_dir, tmp_path):
    rules_dir.rule("smith", tmp_path / "smith", match={"StudyDescription": "^SMITH"})
    rules_dir.rule("princeton", tmp_path / "pni", match={"InstitutionName": "(?i)princeton"})
    rules_dir.rule("yale", tmp_path / "yale", match={"InstitutionName": "Yale"})
    ruleset = load_rules(rules_dir.path)
    assert sorted(route.rule.name for route in ruleset.route(VALUES)) == ["princeton", "smith"]


def test_the_exclusive_rule_of_highest_priority_takes_an_instance_alone(rules_dir, tmp_path):
    # Named so that by name alone the lower one would come first.
    for name, priority in (("b-high", 5), ("a-low", 1)):
        rules_dir.write(
            name,
            {
                "match": {},
                "destination": str(tmp_path / name),
                "path": "{SOPInstanceUID}.dcm",
                "exclusive": True,
                "priority": priority,
            },
        )
    rules_dir.rule("shared", tmp_path / "shared")
    ruleset = load_rules(rules_dir.path)
    assert ruleset.problems == ()
    assert [route.rule.name for route in ruleset.route(VALUES)] == ["b-high"]


# --- validation: file:line: message ----------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        (  # unknown key
            "name: a\nmatch: {}\ndestination: /tmp\npath: '{PatientID}.dcm'\ncolour: red\n",
            5,
            "unknown key 'colour'",
        ),
        (  # bad regular expression, on its own line inside match
            "name: a\nmatch:\n  StudyDescription: ^SMITH\n  PatientID: '(unclosed'\n"
            "destination: /tmp\npath: '{PatientID}.dcm'\n",
            4,
            "bad regular expression for PatientID",
        ),
        (  # unknown keyword in match
            "name: a\nmatch:\n  StudyDescription: ^SMITH\n\n  StudyDescriptoin: x\n"
            "destination: /tmp\npath: '{PatientID}.dcm'\n",
            5,
            "unknown DICOM keyword 'StudyDescriptoin'",
        ),
        (  # unknown placeholder in path
            "# smith lab\nname: a\nmatch: {}\ndestination: /tmp\npath: '{PatientID}/{Bogus}.dcm'\n",
            5,
            "unknown DICOM keyword 'Bogus'",
        ),
        (  # malformed placeholder in path
            "name: a\nmatch: {}\ndestination: /tmp\n\npath: '{Patient ID}.dcm'\n",
            5,
            "malformed placeholder",
        ),
        (  # bad format in path
            "name: a\nmatch: {}\ndestination: /tmp\npath: '{SeriesNumber:5x}.dcm'\n",
            4,
            "bad format",
        ),
        (  # a path that climbs out
            "name: a\nmatch: {}\ndestination: /tmp\npath: '../{PatientID}.dcm'\n",
            4,
            "'..'",
        ),
        (  # missing destination
            "name: a\nmatch: {}\npath: '{PatientID}.dcm'\n",
            1,
            "missing 'destination'",
        ),
        (  # a destination key without a value
            "name: a\nmatch: {}\ndestination:\npath: '{PatientID}.dcm'\n",
            3,
            "missing 'destination'",
        ),
        (  # missing path
            "name: a\nmatch: {}\ndestination: /tmp\n",
            1,
            "missing 'path'",
        ),
        (  # invalid YAML: an unquoted template is a flow mapping
            "name: a\nmatch: {}\ndestination: /tmp\npath: {PatientID}/x.dcm\n",
            4,
            "not valid YAML",
        ),
        (  # invalid YAML: a tab
            "name: a\n\tmatch: {}\ndestination: /tmp\npath: '{PatientID}.dcm'\n",
            2,
            "not valid YAML",
        ),
        (  # invalid YAML: a quote never closed is reported where it opens
            'name: a\nmatch:\n  StudyDescription: "^SMITH\n  PatientID: x\n'
            "destination: /tmp\npath: '{PatientID}.dcm'\n",
            3,
            "not valid YAML",
        ),
        (  # not a mapping
            "- name: a\n- match: {}\n",
            1,
            "must be a mapping",
        ),
        (  # a bad name
            "match: {}\ndestination: /tmp\npath: '{PatientID}.dcm'\nname: 'smith lab/../x'\n",
            4,
            "name must be",
        ),
        (  # match not a mapping
            "name: a\ndestination: /tmp\nmatch: [StudyDescription]\npath: '{PatientID}.dcm'\n",
            3,
            "match must map",
        ),
    ],
    ids=[
        "unknown-key",
        "bad-regex",
        "unknown-match-keyword",
        "unknown-placeholder",
        "malformed-placeholder",
        "bad-format",
        "dotdot-path",
        "missing-destination",
        "empty-destination",
        "missing-path",
        "yaml-flow-mapping",
        "yaml-tab",
        "yaml-unclosed-quote",
        "not-a-mapping",
        "bad-name",
        "match-not-a-mapping",
    ],
)
def test_problems_are_reported_with_file_and_line(rules_dir, text, line, message):
    file = rules_dir.write("broken", text)
    problems = problems_of(rules_dir.path)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{file}:{line}: "), problems[0]
    assert message in problems[0]
    rule, found = load_rule_file(file)
    assert rule is None
    assert [(p.file, p.line) for p in found] == [(str(file), line)]


def test_every_problem_of_a_file_is_reported(rules_dir):
    file = rules_dir.write(
        "many",
        "name: a\n"  # 1
        "match:\n"  # 2
        "  Foo: x\n"  # 3
        "  PatientID: '('\n"  # 4
        "path: '{Bogus}.dcm'\n"  # 5
        "colour: red\n",  # 6
    )
    problems = sorted(problems_of(rules_dir.path))
    assert [p.split(": ", 1)[0] for p in problems] == [
        f"{file}:1",
        f"{file}:3",
        f"{file}:4",
        f"{file}:5",
        f"{file}:6",
    ]


def test_a_broken_file_does_not_stop_the_others(rules_dir, lab, tmp_path):
    rules_dir.rule("alpha", lab)
    rules_dir.write("beta", "name: beta\nmatch: {\n")
    rules_dir.rule("gamma", tmp_path / "gamma", match={"PatientID": "^P"})
    ruleset = load_rules(rules_dir.path)
    assert sorted(rule.name for rule in ruleset.rules) == ["alpha", "gamma"]
    assert len(ruleset.problems) == 1
    assert ruleset.problems[0].file == str(rules_dir.path / "beta.yaml")


def test_duplicate_rule_names_point_at_the_second_name(rules_dir, lab):
    rules_dir.write(
        "a", f"name: smith\nmatch: {{}}\ndestination: {lab}\npath: '{{PatientID}}.dcm'\n"
    )
    second = rules_dir.write(
        "b",
        f"# copied from a.yaml\n\nname: smith\nmatch: {{}}\ndestination: {lab}\n"
        "path: '{PatientID}.dcm'\n",
    )
    ruleset = load_rules(rules_dir.path)
    assert [rule.source for rule in ruleset.rules] == [str(rules_dir.path / "a.yaml")]
    assert [str(p) for p in ruleset.problems] == [
        f"{second}:3: a rule named 'smith' already exists"
    ]


# --- dicom-watcher check -----------------------------------------------------------


def test_check_reports_each_problem_and_exits_non_zero(rules_dir, lab, capsys):
    rules_dir.rule("good", lab)
    bad = rules_dir.write(
        "bad",
        f"name: bad\nmatch:\n  StudyDescription: '[SMITH'\ndestination: {lab}\n"
        "path: '{PatientID}/{Nope}.dcm'\n",
    )
    status = cli.main(["check", "--rules", str(rules_dir.path)])
    out = capsys.readouterr().out
    assert status != 0
    assert f"{bad}:3: bad regular expression for StudyDescription" in out
    assert f"{bad}:5: unknown DICOM keyword 'Nope'" in out
    assert "good.yaml:" not in out
    assert "Traceback" not in out


def test_check_exits_zero_with_valid_rules(rules_dir, lab, tmp_path, capsys):
    rules_dir.rule("smith", lab, match={"StudyDescription": "^SMITH"})
    rules_dir.write("princeton", SMITH.format(destination=tmp_path).replace("smithlab", "pni"))
    status = cli.main(["check", "--rules", str(rules_dir.path)])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "smith" in out and "pni" in out
    assert not re.search(r"\.yaml:\d+: ", out), out  # no file:line: problem


def test_check_on_a_missing_folder_is_one_line_and_non_zero(tmp_path, capsys):
    status = cli.main(["check", "--rules", str(tmp_path / "nowhere")])
    captured = capsys.readouterr()
    assert status != 0
    assert "Traceback" not in captured.out + captured.err
    assert str(tmp_path / "nowhere") in captured.out + captured.err


def test_the_daemon_rule_book_reports_duplicates_at_the_name_line_too(rules_dir, lab):
    rules_dir.rule("smith", lab)
    second = rules_dir.write(
        "z-copy", f"match: {{}}\ndestination: {lab}\nname: smith\npath: '{{PatientID}}.dcm'\n"
    )
    book = RuleBook(rules_dir.path)
    problems = book.refresh()
    assert [str(p) for p in problems or []] == [f"{second}:3: a rule named 'smith' already exists"]
    assert [rule.source for rule in book.ruleset.rules] == [str(rules_dir.path / "smith.yaml")]
