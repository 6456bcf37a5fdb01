"""Path templates and sanitization: tables of inputs and expected outputs,
rejected templates, and a property test that no header value can make a
rendered path leave its destination."""

from __future__ import annotations

import os
import unicodedata

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from watcher.template import (
    MAX_COMPONENT_BYTES,
    MISSING_VALUE,
    TemplateError,
    parse,
    safe_component,
    safe_value,
    with_suffix,
)

# --- safe_value: what a header value becomes inside a component --------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("../../x", ".._.._x"),  # separators go; the dots are dealt with per component
        ("/abs", "_abs"),
        ("a\x00b", "a_b"),
        ("T1\\T2", "T1_T2"),  # a multi-valued value in its DICOM string form
        ("a\x01b\x1fc\x7fd\x85e", "a_b_c_d_e"),  # C0, DEL and C1 controls
        ("tab\there\nnl", "tab_here_nl"),
        ('a:b*c?d"e<f>g|h', "a_b_c_d_e_f_g_h"),
        ("山田^太郎", "山田^太郎"),
        ("Διονυσιος", "Διονυσιος"),
        ("Je\u0301ro\u0302me", "Jérôme"),  # NFD in, NFC out
        ("", ""),
        ("SMITH^Memory", "SMITH^Memory"),
    ],
)
def test_safe_value(value: str, expected: str) -> None:
    assert safe_value(value) == expected


# --- safe_component: one whole path component ---------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("../../x", "_._.._x"),
        ("..", "_"),
        (".", "_"),
        ("...", "_"),
        ("/abs", "_abs"),
        ("/", "_"),
        ("a\x00b", "a_b"),
        ("\x00", "_"),
        ("A\\B", "A_B"),
        ("\x1b[31mred\x07", "_[31mred_"),
        ("CON", "_CON"),
        ("con", "_con"),
        ("aux.dcm", "_aux.dcm"),
        ("Nul.tar.gz", "_Nul.tar.gz"),
        ("LPT1", "_LPT1"),
        ("COM9.txt", "_COM9.txt"),
        ("CON.", "_CON"),  # the trailing dot goes first, then it is a device name
        ("CONSOLE", "CONSOLE"),
        ("LPT10", "LPT10"),
        ("name. . ", "name"),
        ("name...", "name"),
        ("  padded  ", "padded"),
        (':*?"<>|', "_______"),
        (".hidden", "_hidden"),
        (" .hidden", "_hidden"),
        (".dcm", "_dcm"),
        ("-rf", "_rf"),  # never read as an option
        ("--help", "_-help"),
        ("a-b", "a-b"),
        ("山田^太郎", "山田^太郎"),
        ("脳MRI_検査.dcm", "脳MRI_検査.dcm"),
        ("Διονυσιος", "Διονυσιος"),
        ("Buc^Jérôme", "Buc^Jérôme"),
        ("Äneas^Rüdiger", "Äneas^Rüdiger"),
        ("", MISSING_VALUE),
        ("   ", MISSING_VALUE),
        ("\u3000", MISSING_VALUE),  # an ideographic space is blank too
        (".\u3000.", "_"),  # trailing blanks of any script go with trailing dots
        ("name.\u3000", "name"),
    ],
)
def test_safe_component(text: str, expected: str) -> None:
    assert safe_component(text) == expected
    assert safe_component(expected) == expected  # already safe: left alone


@pytest.mark.parametrize(
    ("text", "extension"),
    [
        ("D" * 300, ""),
        ("x" * 300 + ".dcm", ".dcm"),
        ("é" * 300 + ".dcm", ".dcm"),  # 2 bytes a character
        ("山" * 300, ""),  # 3 bytes a character
        ("😀" * 100 + ".nii.gz", ".gz"),  # 4 bytes a character
        ("a" * 254 + "é", ""),  # 256 bytes: the last character would be cut in half
    ],
)
def test_long_components_fit_in_255_bytes_without_cutting_a_character(
    text: str, extension: str
) -> None:
    safe = safe_component(text)
    assert len(safe.encode("utf-8")) <= MAX_COMPONENT_BYTES
    assert safe.endswith(extension)
    kept = safe.rsplit("~", 1)[0]
    assert kept and text.startswith(kept), "the shortened name is a prefix of whole characters"
    assert safe != text
    assert len(kept) > 50, "most of the name is kept"
    assert safe_component(text) == safe, "shortening is deterministic"


def test_two_long_names_with_one_prefix_stay_distinct() -> None:
    prefix = "SMITH^Memory_" + "very long protocol description " * 10
    first = safe_component(prefix + "run-1.dcm")
    second = safe_component(prefix + "run-2.dcm")
    assert first != second
    for name in (first, second):
        assert len(name.encode("utf-8")) <= MAX_COMPONENT_BYTES
        assert name.endswith(".dcm")


def test_a_300_character_description_renders_within_the_limit() -> None:
    description = "Functional MRI, resting state " * 10
    rendered = parse("{StudyDate}_{StudyDescription}/{InstanceNumber:05d}.dcm").render(
        {"StudyDate": "20261125", "StudyDescription": description, "InstanceNumber": "7"}
    )
    folder, name = rendered.split("/")
    assert len(description) == 300
    assert len(folder.encode()) <= MAX_COMPONENT_BYTES
    assert folder.startswith("20261125_Functional MRI, resting state")
    assert name == "00007.dcm"


def test_with_suffix_keeps_the_extension_and_the_limit() -> None:
    assert with_suffix("00001.dcm", "abc123") == "00001~abc123.dcm"
    assert with_suffix("noext", "abc123") == "noext~abc123"
    long = safe_component("x" * 300 + ".dcm")
    suffixed = with_suffix(long, "f" * 64)
    assert suffixed.endswith("~" + "f" * 64 + ".dcm")
    assert len(suffixed.encode()) <= MAX_COMPONENT_BYTES


# --- Template.render -----------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("5", "005"),
        ("", MISSING_VALUE),
        ("abc", "abc"),
        ("-3", "_03"),  # a component never starts with a dash
        (" 7 ", "007"),
        ("12345", "12345"),
        ("5.0", "005"),
        ("2\\3", "002"),  # multi-valued: the first value is the number
        ("1.e999", "1.e999"),  # a number too large for an int is left as it is
    ],
)
def test_zero_padded_numbers(value: str, expected: str) -> None:
    assert parse("{SeriesNumber:03d}").render({"SeriesNumber": value}) == expected


def test_a_missing_number_renders_as_the_placeholder() -> None:
    assert parse("{SeriesNumber:03d}").render({}) == MISSING_VALUE


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"ProtocolName": "rest", "SeriesDescription": "rfMRI"}, "rest"),
        ({"ProtocolName": "", "SeriesDescription": "rfMRI"}, "rfMRI"),
        ({"SeriesDescription": "rfMRI"}, "rfMRI"),
        ({"ProtocolName": "", "SeriesDescription": ""}, MISSING_VALUE),
        ({}, MISSING_VALUE),
    ],
)
def test_fallback_takes_the_first_non_empty_alternative(
    values: dict[str, str], expected: str
) -> None:
    assert parse("{ProtocolName|SeriesDescription}").render(values) == expected


@pytest.mark.parametrize(
    ("name", "template", "expected"),
    [
        ("Doe^Jane", "{PatientName.family}", "Doe"),
        ("Doe^Jane", "{PatientName.given}", "Jane"),
        ("Doe^Jane", "{PatientName}", "Doe^Jane"),
        (
            "Doe^Jane^Q^Dr^III",
            "{PatientName.middle}_{PatientName.prefix}_{PatientName.suffix}",
            "Q_Dr_III",
        ),
        ("Cher", "{PatientName.family}-{PatientName.given}", f"Cher-{MISSING_VALUE}"),
        ("山田^太郎", "{PatientName.family}/{PatientName.given}", "山田/太郎"),
        ("", "{PatientName.family}", MISSING_VALUE),
        ("../..^/etc", "{PatientName.family}/{PatientName.given}", "_._/_etc"),
    ],
)
def test_person_name_parts(name: str, template: str, expected: str) -> None:
    assert parse(template).render({"PatientName": name}) == expected


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (
            {
                "PatientID": "SUBJ01",
                "StudyDate": "20261125",
                "StudyDescription": "SMITH^Memory",
                "SeriesNumber": "5",
                "SeriesDescription": "T1_MPRAGE",
                "InstanceNumber": "12",
            },
            "SUBJ01/20261125_SMITH^Memory/005_T1_MPRAGE/00012.dcm",
        ),
        (
            {
                "PatientID": "../../x",
                "StudyDate": "",
                "StudyDescription": "/abs",
                "SeriesNumber": "abc",
                "SeriesDescription": "a\x00b\\c",
                "InstanceNumber": "-3",
            },
            f"_._.._x/{MISSING_VALUE}__abs/abc_a_b_c/_0003.dcm",
        ),
        (
            {
                "PatientID": "..",
                "StudyDate": ".",
                "StudyDescription": ".",
                "SeriesNumber": "",
                "SeriesDescription": "CON",
                "InstanceNumber": "",
            },
            f"_/__/{MISSING_VALUE}_CON/{MISSING_VALUE}.dcm",
        ),
        (
            {},
            f"{MISSING_VALUE}/{MISSING_VALUE}_{MISSING_VALUE}/{MISSING_VALUE}_{MISSING_VALUE}/"
            f"{MISSING_VALUE}.dcm",
        ),
    ],
)
def test_render_whole_paths(values: dict[str, str], expected: str) -> None:
    template = parse(
        "{PatientID}/{StudyDate}_{StudyDescription}/{SeriesNumber:03d}_{SeriesDescription}/"
        "{InstanceNumber:05d}.dcm"
    )
    assert template.render(values) == expected


def test_fields_and_study_depth() -> None:
    template = parse(
        "{PatientID}/{StudyDate}_{StudyDescription}/{SeriesNumber:03d}_"
        "{ProtocolName|SeriesDescription}/{InstanceNumber:05d}.dcm"
    )
    assert template.fields == {
        "PatientID",
        "StudyDate",
        "StudyDescription",
        "SeriesNumber",
        "ProtocolName",
        "SeriesDescription",
        "InstanceNumber",
    }
    assert template.study_depth == 2
    assert template.study_folder("P/D_S/001_T1/00001.dcm") == "P/D_S"
    assert parse("{PatientName.family}/x.dcm").fields == {"PatientName"}


# --- rejected templates ------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("{PatientID", "unbalanced brace"),
        ("PatientID}/x.dcm", "unbalanced brace"),
        ("{{PatientID}}", "unbalanced brace"),
        ("{PatientID}/{Study{Date}}", "brace"),
        ("{Bogus}/x.dcm", "unknown DICOM keyword 'Bogus'"),
        ("{PatientID|Nope}", "unknown DICOM keyword 'Nope'"),
        ("{PatientName.nickname}", "unknown name part 'nickname'"),
        ("{Patient ID}", "malformed placeholder"),
        ("{}", "malformed placeholder"),
        ("{SeriesNumber:5x}", "bad format"),
        ("{SeriesNumber:3d}", "bad format"),
        ("{SeriesNumber:}", "bad format"),
        ("{SeriesNumber:05s}", "bad format"),
        ("/abs/{PatientID}.dcm", "relative"),
        ("../{PatientID}.dcm", "'..'"),
        ("{PatientID}/../x.dcm", "'..'"),
        ("./{PatientID}.dcm", "'.'"),
        ("{PatientID}//x.dcm", "empty"),
        ("{PatientID}/", "empty"),
        ("", "empty"),
        ("   ", "empty"),
        ("a:b/{PatientID}", "unsafe character"),
        ("a\\b/{PatientID}", "unsafe character"),
        ("tab\there/{PatientID}", "unsafe character"),
    ],
)
def test_parse_rejects(source: str, message: str) -> None:
    with pytest.raises(TemplateError) as error:
        parse(source)
    assert message in str(error.value)


# --- property: a rendered path never escapes ---------------------------------

EVERY_PLACEHOLDER = (
    "{PatientID}/{PatientName}/{PatientName.family}^{PatientName.given}/"
    "{StudyDate}_{StudyDescription}/{SeriesNumber:03d}_{ProtocolName|SeriesDescription}/"
    "{InstitutionName}{AccessionNumber}/{InstanceNumber:05d}.dcm"
)
FIELDS = sorted(parse(EVERY_PLACEHOLDER).fields)
ROOT = "/nas/lab/dicom"
HOSTILE = [
    "",
    " ",
    ".",
    "..",
    "...",
    "/",
    "\\",
    "../..",
    "/etc/passwd",
    "\x00",
    "CON",
    "aux",
    "lpt1.",
    ".hidden",
    "~",
    "\u3000",
    "\u202e",
    "1.e999",
    "-0",
    "é" * 200,
]

header_value = st.one_of(
    st.text(),
    # every code point, surrogates and controls included
    st.text(st.characters(exclude_categories=()), max_size=40),
    st.text(min_size=200, max_size=400),
    st.sampled_from(HOSTILE),
    st.lists(st.sampled_from(HOSTILE), max_size=5).map("".join),
)


def assert_safe(rendered: str) -> None:
    assert not rendered.startswith("/")
    components = rendered.split("/")
    for component in components:
        assert component not in ("", ".", "..")
        assert not component.startswith((".", "-"))
        assert len(component.encode("utf-8")) <= MAX_COMPONENT_BYTES
        assert "\\" not in component
        assert not any(unicodedata.category(c) in ("Cc", "Cs") for c in component)
    joined = os.path.normpath(os.path.join(ROOT, rendered))
    assert os.path.commonpath([ROOT, joined]) == ROOT
    assert joined.count("/") - ROOT.count("/") == len(components)


@settings(max_examples=300, deadline=None)
@given(values=st.fixed_dictionaries({}, optional={f: header_value for f in FIELDS}))
@example(values={f: ".." for f in FIELDS})
@example(values={f: "/" for f in FIELDS})
@example(values={"SeriesNumber": "1.e999", "InstanceNumber": "9" * 5000})
def test_rendered_paths_never_escape_the_destination(values: dict[str, str]) -> None:
    template = parse(EVERY_PLACEHOLDER)
    rendered = template.render(values)
    assert_safe(rendered)
    assert len(rendered.split("/")) == len(template.components)
    assert template.render(values) == rendered
    assert parse(EVERY_PLACEHOLDER).render(dict(values)) == rendered


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(header_value, st.text(st.characters(exclude_categories=()))))
def test_safe_component_is_one_safe_component_and_idempotent(text: str) -> None:
    safe = safe_component(text)
    assert_safe(safe)
    assert "/" not in safe
    assert safe_component(safe) == safe
