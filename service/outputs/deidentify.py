"""De-identification of a series' headers, DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile.

Why: with ``worker.deidentify`` on, the headers the worker keeps for the DICOM SEG a caller downloads go through
``deidentify_series`` first (service/outputs/formats.py), so that SEG, which copies the patient and study modules
from its sources, carries no patient identifiers. A SEG forwarded to the source PACS is made from the untouched
headers: it must match the patient and study there.

The profile's actions come from KitwareMedical's dicom-anonymizer (its copy of Table E.1-1, edition
``TABLE_EDITION``), not from a table kept here. Around it, this module adds what the library leaves to its caller:

- One UID mapping per series. The library maps UIDs through a module-global dictionary that only grows (in a
  worker, every UID of every job, for the life of the process, and the same new UID for an old one across jobs);
  here a fresh dictionary takes its place for one call, under a lock, and is dropped afterwards. Within the call
  every occurrence of a UID (Study, Series, SOP Instance, Frame of Reference, the file meta's Media Storage SOP
  Instance, references in sequences) gets the same new value, so the de-identified instances still form one series
  of one study and a SEG built from them references their new UIDs. Geometry (positions, orientation, spacing) is
  not in the table and stays as it is.
- Nested items. The library applies the table to top-level attributes; the attributes it lists also occur inside
  sequences (per-frame functional groups' FrameAcquisitionDateTime, source image references), so every item of
  every remaining sequence is treated the same way.
- References kept. For a sequence of references (X/Z/U*: Referenced Image, Source Image) the library empties every
  value in its items; here the UIDs in them are replaced, as the action allows, so they still point at the
  de-identified instances.
- Dates made valid. For a date it empties, replaces or removes the library writes the year 0001 (DA 00010101),
  which dciodvfy refuses in the SEG that copies StudyDate and PatientBirthDate. Here a date the table empties (Z,
  X/Z) gets a zero-length value, one it removes (X) is removed, one it replaces (D and the like) gets the year 1900.
- Patient's Name and Patient ID get fixed dummy values (``PATIENT_NAME``, ``DUMMY``) rather than empty ones: the
  standard allows either for these Type 2 attributes, and an empty Patient ID is refused by some archives.
- Patient Identity Removed (0012,0062) YES, De-identification Method (0012,0063) and De-identification Method Code
  Sequence (0012,0064) with DCM 113100 "Basic Application Confidentiality Profile", as Annex E asks.
- Speed: the library goes through its whole table for each data set, and walks it once per repeating-group rule
  and once more to remove private attributes, decoding every value; here it gets only the rules for attributes the
  data set (or item) has and private attributes are removed by tag, a few milliseconds a header.

Private attributes are removed (the profile's default: no Retain Safe Private option), the service's own SEG block
is written later, into the SEG. Pure: the caller's data sets are not changed.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from dicomanonymizer import simpledicomanonymizer as _library
from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag

from service.outputs.dicom_headers import header_only

TABLE_EDITION = "dicomfields_2026c"  # the library's copy of PS3.15 Table E.1-1, DICOM 2026c
DUMMY = "ANONYMIZED"  # the library's own dummy value for replaced text
PATIENT_NAME = "ANONYMIZED^PATIENT"  # with a component separator: a name without one is the retired form
DUMMY_YEAR = "1900"
_LIBRARY_YEAR = "0001"
METHOD = "Basic Application Confidentiality Profile"
METHOD_CODE = ("113100", "DCM", METHOD)

Rule = tuple[int, ...]
Action = Callable[[Dataset, Any], None]


def _zero_length(dataset: Dataset, tag: Any) -> None:
    if tag in dataset:
        dataset[tag].value = ""


def _remove(dataset: Dataset, tag: Any) -> None:
    if tag in dataset:
        del dataset[tag]


def _valid_dummy(action: Action) -> Action:
    def apply(dataset: Dataset, tag: Any) -> None:
        action(dataset, tag)
        element = dataset.get(tag)
        if element is not None and element.VR in ("DA", "DT") and str(element.value).startswith(_LIBRARY_YEAR):
            element.value = DUMMY_YEAR + str(element.value)[len(_LIBRARY_YEAR) :]

    return apply


def _contained_uids(dataset: Dataset, tag: Any) -> None:
    """X/Z/U*: the library empties every value in such a sequence (its Z), references that then point nowhere and
    Type 1 attributes left empty; the sequence stays here and the UIDs in its items are replaced (U) when the items
    are treated (``_items``), consistently with the instances they reference."""
    element = dataset.get(tag)
    if element is not None and element.VR == "UI":
        _library.replace_UID(dataset, tag)


def _rules() -> dict[Rule, Action]:
    """The library's table with the changes the module docstring lists: valid dates, references kept (X/Z/U*),
    dummy patient name and ID."""
    rules: dict[Rule, Action] = _library.initialize_actions(TABLE_EDITION)
    categories = dicom_anonymization_database_selector(TABLE_EDITION)
    dates = {rule for rule in rules if len(rule) == 2 and _dictionary_vr(rule) in ("DA", "DT", "TM")}
    for rule in dates:
        if rule in categories["Z_TAGS"] or rule in categories["X_Z_TAGS"]:
            rules[rule] = _zero_length
        elif rule in categories["X_TAGS"]:
            rules[rule] = _remove
        else:
            rules[rule] = _valid_dummy(rules[rule])
    for rule in categories["X_Z_U_STAR_TAGS"]:
        rules[rule] = _contained_uids
    rules[(0x0010, 0x0010)] = _library.replace_with_value([PATIENT_NAME])  # Patient's Name: Z in the table
    rules[(0x0010, 0x0020)] = _library.replace_with_value([DUMMY])  # Patient ID: Z/D in the table
    return rules


def _dictionary_vr(rule: Rule) -> str | None:
    try:
        return dictionary_VR(Tag(rule[0], rule[1]))
    except KeyError:
        return None


_RULES = _rules()
_SINGLE = {rule: action for rule, action in _RULES.items() if len(rule) == 2}
_RANGES = {rule: action for rule, action in _RULES.items() if len(rule) == 4}  # (group, element, group mask, mask)
_FIRST_RANGE_GROUP = min(rule[0] & rule[2] for rule in _RANGES)  # 0x5000: curves, then overlays
_LOCK = threading.Lock()  # the library's UID dictionary is a module global


def deidentify_series(datasets: Sequence[Dataset]) -> list[Dataset]:
    """De-identified copies of one series' headers (PS3.15 basic profile), with one UID mapping for all of them.

    Raises what the library raises on an attribute it cannot handle (NotImplementedError for an unexpected VR,
    ValueError, ...); the caller must then keep nothing rather than the identified headers."""
    copies = [header_only(ds) for ds in datasets]  # raw (immutable) values shared, the rest copied
    with _LOCK, warnings.catch_warnings():
        # pydicom's warnings about values quote them (patient data); see dicom_headers.quiet.
        warnings.filterwarnings("ignore", module=r"(pydicom|highdicom|dicomanonymizer)(\.|$)")
        shared = _library.dictionary
        _library.dictionary = {}  # old UID -> new UID for this series only
        try:
            for ds in copies:
                _deidentify(ds)
        finally:
            _library.dictionary = shared
    return copies


def _rules_for(ds: Dataset, meta: Dataset | None) -> dict[Rule, Action]:
    """The table's rules for the attributes ``ds`` (and its file meta) has: the library applies each rule to an
    attribute only when present, so the others are skipped here without changing what it does."""
    tags = [*ds.keys(), *(meta.keys() if meta is not None else ())]
    rules: dict[Rule, Action] = {}
    for tag in tags:
        key = (tag.group, tag.element)
        action = _SINGLE.get(key)
        if action is not None:
            rules[key] = action
    if any(_in_range(tag, rule) for tag in tags if tag.group >= _FIRST_RANGE_GROUP for rule in _RANGES):
        rules.update(_RANGES)
    return rules


def _in_range(tag: BaseTag, rule: Rule) -> bool:
    group, element, group_mask, element_mask = rule
    return tag.group & group_mask == group & group_mask and tag.element & element_mask == element & element_mask


def _deidentify(ds: Dataset) -> None:
    meta = ds.file_meta if "file_meta" in ds.__dict__ else None
    _apply(ds, meta)
    for item in _items(ds):
        _apply(item, None)
    if meta is not None and "SOPInstanceUID" in ds:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID  # mapped the same way already; said outright
    _mark(ds)


def _apply(ds: Dataset, meta: Dataset | None) -> None:
    """The table on one data set or item, its private attributes removed first (the profile's X for them; the
    library's own removal walks every item and decodes every value on the way, which is most of its time)."""
    for tag in list(ds.keys()):  # tags only: iterating the data set itself decodes every value
        if tag.is_private:
            del ds[tag]
    rules = _rules_for(ds, meta)
    if rules:
        _library.anonymize_dataset(ds, base_rules_gen=lambda: rules, delete_private_tags=False)


def _items(ds: Dataset) -> Iterable[Dataset]:
    """Every item of every sequence in ``ds``, depth first, each before its own items (so a sequence the table
    removes from an item is not visited)."""
    for tag in list(ds.keys()):
        if tag not in ds or not _is_sequence(ds.get_item(tag)):
            continue
        for item in ds[tag].value or ():
            yield item
            yield from _items(item)


def _is_sequence(element: DataElement | RawDataElement) -> bool:
    """Without decoding a raw value (most of a header is never touched): its VR, else the dictionary's."""
    vr = element.VR
    if vr is None:
        try:
            vr = dictionary_VR(element.tag)
        except KeyError:
            return False
    return vr == "SQ"


def _mark(ds: Dataset) -> None:
    """Patient Identity Removed, and the method as text and code, beside what an earlier de-identification of the
    source recorded."""
    ds.PatientIdentityRemoved = "YES"
    recorded = ds.get("DeidentificationMethod")
    methods = [] if not recorded else [str(recorded)] if isinstance(recorded, str) else [str(m) for m in recorded]
    if METHOD not in methods:
        methods.append(METHOD)
    ds.DeidentificationMethod = methods if len(methods) > 1 else methods[0]
    codes = list(ds.get("DeidentificationMethodCodeSequence") or [])
    value, scheme, meaning = METHOD_CODE
    if not any(item.get("CodeValue") == value and item.get("CodingSchemeDesignator") == scheme for item in codes):
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = value, scheme, meaning
        codes.append(code)
    ds.DeidentificationMethodCodeSequence = codes
