"""The DICOM data dictionary, without importing pydicom.

Importing pydicom costs about a quarter of a second (it loads its pixel data
handlers), which is more than `sort` spends on a thousand files. Most files
never need pydicom (`fastheader` reads them), but every run needs keyword and
tag lookups. This module reads pydicom's own dictionary file on its own; when
that is not possible, or for the few tags it does not list (repeating groups
such as overlays), it asks pydicom.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from types import ModuleType

#: Tag -> (VR, VM, name, retired, keyword), as pydicom's `DicomDictionary`.
Entry = tuple[str, str, str, str, str]


@functools.cache
def _entries() -> tuple[dict[int, Entry], dict[str, int]]:
    entries = _standalone_dictionary()
    if entries is None:
        from pydicom.datadict import DicomDictionary

        entries = DicomDictionary
    keywords = {entry[4]: tag for tag, entry in entries.items() if entry[4]}
    return entries, keywords


def _standalone_dictionary() -> dict[int, Entry] | None:
    """pydicom's generated `_dicom_dict.py`, executed without its package."""
    try:
        spec = importlib.util.find_spec("pydicom")
        folders = list(spec.submodule_search_locations or []) if spec else []
        for folder in folders:
            path = os.path.join(folder, "_dicom_dict.py")
            if not os.path.isfile(path):
                continue
            module_spec = importlib.util.spec_from_file_location("_dw_dicom_dict", path)
            if module_spec is None or module_spec.loader is None:
                return None
            module: ModuleType = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
            entries = module.DicomDictionary
            if isinstance(entries, dict) and entries:
                return entries
    except Exception:  # noqa: BLE001 - any surprise: use pydicom itself
        return None
    return None


def _pydicom_datadict() -> ModuleType:
    import pydicom.datadict

    return pydicom.datadict


@functools.lru_cache(maxsize=4096)
def tag_for_keyword(keyword: str) -> int | None:
    """The tag of a DICOM keyword, or None when there is no such keyword."""
    tag = _entries()[1].get(keyword)
    if tag is None:
        found = _pydicom_datadict().tag_for_keyword(keyword)
        return int(found) if found is not None else None
    return tag


@functools.lru_cache(maxsize=4096)
def keyword_for_tag(tag: int) -> str:
    """The keyword of a tag ("" when it has none)."""
    entry = _entries()[0].get(tag)
    if entry is None:
        return str(_pydicom_datadict().keyword_for_tag(tag))
    return entry[4]


@functools.lru_cache(maxsize=4096)
def dictionary_vr(tag: int) -> str:
    """The VR the dictionary gives a tag; KeyError when it knows none."""
    entry = _entries()[0].get(tag)
    if entry is None:
        return str(_pydicom_datadict().dictionary_VR(tag))
    return entry[0]
