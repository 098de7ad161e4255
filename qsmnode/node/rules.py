"""Routing rules: which acquisitions the node reconstructs, with which preset, and where results go.

A rule is a ``[[rule]]`` table of the node's TOML configuration::

    [[rule]]
    name = "brain-3t"
    preset = "auto"                       # a field-strength preset name of the reconstruction, or "auto"
    destinations = ["pacs", "return-to-sender"]
    parametric_map = true
    summary_image = true
    [rule.match]
    calling_ae = "^MR_"                   # regex on the sender's AE title
    image_type = ["ORIGINAL"]             # every token must be in ImageType
    qsm_input = true                      # 3D, >= 2 echoes, phase (or real/imaginary) present
    [rule.match.tags]
    SeriesDescription = "(?i)swi|gre"     # regex (re.search) on the value
    MagneticFieldStrength = { min = 2.5, max = 3.5 }   # numeric range, inclusive
    EchoTrainLength = 4                   # numeric equality
    Manufacturer = ["(?i)siemens", "(?i)ge"]           # any of these regexes

Tag and ImageType conditions are evaluated per series: a rule matches an acquisition when at least
one of its series satisfies all of them (magnitude and phase series often differ in ImageType and
SeriesDescription). ``calling_ae`` matches when any sender of the acquisition matches;
``qsm_input`` is a property of the whole acquisition. The first rule that matches wins; without
any ``[[rule]]`` the built-in default rule (:func:`default_rule`) applies.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from pydicom.datadict import tag_for_keyword

from qsmnode.errors import ConfigError, plain

RETURN_TO_SENDER = "return-to-sender"
ALL_DESTINATIONS = "*"

PHASE_COMPONENTS = frozenset({"phase", "real", "imaginary", "mixed"})

_RULE_KEYS = {"name", "preset", "destinations", "parametric_map", "summary_image", "overrides", "match"}
_MATCH_KEYS = {"calling_ae", "image_type", "qsm_input", "tags"}


def _check_preset(preset: str, overrides: dict, where: str) -> None:
    """The preset must be one the reconstruction knows, and every override key a known parameter."""
    from qsmnode.recon.presets import NAMED_PRESETS, known_keys

    if preset != "auto" and preset not in NAMED_PRESETS:
        raise ConfigError(f"{where}: unknown preset {preset!r}",
                          f"use auto or one of {', '.join(sorted(NAMED_PRESETS))}")
    unknown = sorted(set(overrides) - set(known_keys()))
    if unknown:
        raise ConfigError(f"{where}: unknown override(s) {', '.join(unknown)}",
                          f"known parameters: {', '.join(sorted(known_keys()))}")


@dataclass(frozen=True)
class TagCondition:
    """One condition on a DICOM attribute (by keyword): regexes, a numeric range or a number."""

    keyword: str
    regexes: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    equals: float | None = None

    def describe(self) -> str:
        if self.regexes:
            return f"{self.keyword} ~ " + " | ".join(repr(r) for r in self.regexes)
        if self.equals is not None:
            return f"{self.keyword} == {self.equals:g}"
        lo = "-inf" if self.minimum is None else f"{self.minimum:g}"
        hi = "inf" if self.maximum is None else f"{self.maximum:g}"
        return f"{self.keyword} in [{lo}, {hi}]"

    def test(self, ds) -> tuple[bool, str]:
        """(matches, explanation) for one dataset."""
        value = ds.get(self.keyword, None) if ds is not None else None
        if value is None or value == "":
            return False, f"{self.keyword} is absent"
        if self.regexes:
            text = "\\".join(str(v) for v in value) if _is_multi(value) else str(value)
            for rx in self.regexes:
                if re.search(rx, text):
                    return True, f"{self.keyword}={text!r} matches {rx!r}"
            return False, f"{self.keyword}={text!r} matches none of {plain(repr(rx) for rx in self.regexes)}"
        try:
            number = float(value[0] if _is_multi(value) else value)
        except (TypeError, ValueError):
            return False, f"{self.keyword}={value!r} is not a number"
        if self.equals is not None:
            ok = math.isclose(number, self.equals, rel_tol=1e-6, abs_tol=1e-9)
            return ok, f"{self.keyword}={number:g} {'==' if ok else '!='} {self.equals:g}"
        ok = (self.minimum is None or number >= self.minimum) and (self.maximum is None or number <= self.maximum)
        return ok, f"{self.keyword}={number:g} {'in' if ok else 'not in'} {self.describe().split(' in ', 1)[1]}"


def _is_multi(value) -> bool:
    return isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue"


@dataclass(frozen=True)
class Rule:
    """One routing rule (see the module docstring for the TOML form)."""

    name: str
    preset: str = "auto"
    destinations: tuple[str, ...] = (ALL_DESTINATIONS,)
    parametric_map: bool = True
    summary_image: bool = True
    overrides: dict = field(default_factory=dict, hash=False, compare=False)
    calling_ae: str | None = None
    image_type: tuple[str, ...] = ()
    qsm_input: bool = True
    tags: tuple[TagCondition, ...] = ()

    @classmethod
    def from_config(cls, table: dict, position: int) -> "Rule":
        """Build a rule from one ``[[rule]]`` table; raises ConfigError naming the bad key."""
        where = f"[[rule]] #{position + 1}"
        if not isinstance(table, dict):
            raise ConfigError(f"{where} must be a table", "write it as [[rule]] followed by key = value lines")
        name = table.get("name", f"rule-{position + 1}")
        where = f"[[rule]] {name!r}"
        _unknown(table, _RULE_KEYS, where)
        _typed(table, "name", str, where)
        preset = _typed(table, "preset", str, where) or "auto"
        dests = table.get("destinations", [ALL_DESTINATIONS])
        if not isinstance(dests, list) or not all(isinstance(d, str) for d in dests):
            raise ConfigError(f"{where}: destinations must be a list of destination names",
                              'e.g. destinations = ["pacs", "return-to-sender"]')
        pmap = _typed(table, "parametric_map", bool, where)
        summ = _typed(table, "summary_image", bool, where)
        overrides = _typed(table, "overrides", dict, where) or {}
        _check_preset(preset, overrides, where)
        match = _typed(table, "match", dict, where) or {}
        _unknown(match, _MATCH_KEYS, f"{where} match")
        calling = _typed(match, "calling_ae", str, f"{where} match")
        if calling is not None:
            _compile(calling, f"{where} match.calling_ae")
        itype = match.get("image_type", [])
        if isinstance(itype, str):
            itype = [t for t in itype.replace("\\", " ").split() if t]
        if not isinstance(itype, list) or not all(isinstance(t, str) for t in itype):
            raise ConfigError(f"{where}: match.image_type must be a list of tokens", 'e.g. image_type = ["ORIGINAL", "M"]')
        qsm_input = _typed(match, "qsm_input", bool, f"{where} match")
        tags_table = _typed(match, "tags", dict, f"{where} match") or {}
        tags = tuple(_tag_condition(k, v, f"{where} match.tags") for k, v in tags_table.items())
        return cls(
            name=name,
            preset=preset,
            destinations=tuple(dests),
            parametric_map=True if pmap is None else pmap,
            summary_image=True if summ is None else summ,
            overrides=overrides,
            calling_ae=calling,
            image_type=tuple(t.upper() for t in itype),
            qsm_input=True if qsm_input is None else qsm_input,
            tags=tags,
        )


def default_rule() -> Rule:
    """The built-in rule: any 3D multi-echo GRE acquisition with phase, preset ``auto``, all destinations."""
    return Rule(name="default", preset="auto", destinations=(ALL_DESTINATIONS,), qsm_input=True)


def _unknown(table: dict, allowed: set[str], where: str) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigError(f"{where}: unknown key {key!r}", f"allowed keys: {', '.join(sorted(allowed))}")


def _typed(table: dict, key: str, kind: type, where: str):
    if key not in table:
        return None
    value = table[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: {key} must be {kind.__name__}, not {type(value).__name__} ({value!r})")
    return value


def _compile(pattern: str, where: str):
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ConfigError(f"{where}: invalid regular expression {pattern!r}: {err}") from None


def _tag_condition(keyword: str, spec: Any, where: str) -> TagCondition:
    if tag_for_keyword(keyword) is None:
        raise ConfigError(f"{where}: {keyword!r} is not a DICOM attribute keyword",
                          "use the keyword as in the standard, e.g. SeriesDescription, MagneticFieldStrength")
    if isinstance(spec, str):
        _compile(spec, f"{where}.{keyword}")
        return TagCondition(keyword, regexes=(spec,))
    if isinstance(spec, list) and spec and all(isinstance(s, str) for s in spec):
        for s in spec:
            _compile(s, f"{where}.{keyword}")
        return TagCondition(keyword, regexes=tuple(spec))
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return TagCondition(keyword, equals=float(spec))
    if isinstance(spec, dict):
        extra = set(spec) - {"min", "max"}
        if extra or not spec:
            raise ConfigError(f"{where}.{keyword}: a range takes only min and max", "e.g. { min = 2.5, max = 3.5 }")
        bounds = {}
        for k in ("min", "max"):
            if k in spec:
                if not isinstance(spec[k], (int, float)) or isinstance(spec[k], bool):
                    raise ConfigError(f"{where}.{keyword}.{k} must be a number, not {spec[k]!r}")
                bounds[k] = float(spec[k])
        return TagCondition(keyword, minimum=bounds.get("min"), maximum=bounds.get("max"))
    raise ConfigError(f"{where}.{keyword}: expected a regex string, a list of regexes, a number or "
                      f"{{ min, max }}, not {spec!r}")


@dataclass
class AcquisitionFacts:
    """What rules look at: one header per series (no pixel data needed) and acquisition-level facts.

    ``components``: the set of classify_instance components seen ('magnitude', 'phase', ...).
    ``echo_numbers``: the distinct echo numbers seen. ``calling_aes``: the senders.
    """

    headers: list
    components: set[str] = field(default_factory=set)
    echo_numbers: set[int] = field(default_factory=set)
    calling_aes: set[str] = field(default_factory=set)

    @property
    def n_echoes(self) -> int:
        n = len(self.echo_numbers)
        for ds in self.headers:
            try:
                n = max(n, int(ds.get("EchoTrainLength", 0) or 0))
            except (TypeError, ValueError):
                pass
        return n


def qsm_input_reasons(facts: AcquisitionFacts) -> tuple[bool, list[str]]:
    """Is this a 3D multi-echo GRE acquisition with phase? Returns (ok, explanations)."""
    reasons, ok = [], True
    acq_types = {str(ds.get("MRAcquisitionType", "")).upper() for ds in facts.headers}
    if "3D" in acq_types:
        reasons.append("MRAcquisitionType is 3D")
    else:
        ok = False
        reasons.append(f"MRAcquisitionType is {plain(sorted(filter(None, acq_types))) or 'absent'}, not 3D")
    n = facts.n_echoes
    if n >= 2:
        reasons.append(f"{n} echoes")
    else:
        ok = False
        reasons.append(f"only {n} echo(es); QSM needs >= 2")
    phase = facts.components & PHASE_COMPONENTS
    if phase:
        reasons.append(f"phase information present ({', '.join(sorted(phase))})")
    else:
        ok = False
        reasons.append(f"no phase, real or imaginary series (components seen: {plain(sorted(facts.components)) or 'none'})")
    return ok, reasons


def explain(rule: Rule, facts: AcquisitionFacts) -> tuple[bool, list[str]]:
    """Whether ``rule`` matches ``facts``, with one line per condition saying why."""
    lines: list[str] = []
    ok = True
    if rule.calling_ae is not None:
        hit = any(re.search(rule.calling_ae, ae or "") for ae in facts.calling_aes)
        ok &= hit
        lines.append(f"calling AE {plain(sorted(facts.calling_aes)) or '(none)'} {'matches' if hit else 'does not match'} {rule.calling_ae!r}")
    if rule.qsm_input:
        q_ok, q_lines = qsm_input_reasons(facts)
        ok &= q_ok
        lines += q_lines
    if rule.tags or rule.image_type:
        best: list[str] | None = None
        any_series = False
        for ds in facts.headers:
            s_ok, s_lines = True, []
            if rule.image_type:
                tokens = {str(t).upper() for t in (ds.get("ImageType", []) or [])}
                missing = [t for t in rule.image_type if t not in tokens]
                s_ok &= not missing
                s_lines.append(f"ImageType has {'/'.join(rule.image_type)}" if not missing
                               else f"ImageType {'/'.join(sorted(tokens))} lacks {'/'.join(missing)}")
            for cond in rule.tags:
                c_ok, c_line = cond.test(ds)
                s_ok &= c_ok
                s_lines.append(c_line)
            uid = ds.get("SeriesInstanceUID", "?")
            if s_ok:
                any_series = True
                best = [f"series {uid}: {line}" for line in s_lines]
                break
            if best is None:
                best = [f"series {uid}: {line}" for line in s_lines]
        ok &= any_series
        lines += best or ["no series headers to test tag conditions on"]
    return bool(ok), lines


def match_rules(rules: Iterable[Rule], facts: AcquisitionFacts) -> tuple[Rule | None, list[str]]:
    """The first rule that matches ``facts`` (or None) and the explanation for it.

    With no rules at all, the built-in :func:`default_rule` is used. When none matches, the
    explanation lists why each rule did not.
    """
    rules = list(rules) or [default_rule()]
    why_not: list[str] = []
    for rule in rules:
        ok, lines = explain(rule, facts)
        if ok:
            return rule, lines
        failed = [line for line in lines if _is_failure(line)] or lines
        why_not.append(f"rule {rule.name!r}: " + "; ".join(failed))
    return None, why_not


def _is_failure(line: str) -> bool:
    return any(w in line for w in ("not ", "lacks", "absent", "none of", "only ", "no phase", "!=", "does not"))


def resolve_destinations(rule: Rule, destinations: dict, known_aes: dict, calling_aes: Iterable[str]):
    """The Destination objects a rule sends to.

    ``destinations``: name -> Destination (from the config); ``known_aes``: AE title -> Destination
    for ``return-to-sender``; ``calling_aes``: the senders of the acquisition. Returns
    (list of Destination, list of warnings), e.g. a sender that is not in ``known_aes``.
    """
    out, warnings, seen = [], [], set()

    def add(dest):
        key = (dest.name, getattr(dest, "ae_title", None), getattr(dest, "host", None), getattr(dest, "port", None))
        if key not in seen:
            seen.add(key)
            out.append(dest)

    for name in rule.destinations:
        if name == ALL_DESTINATIONS:
            for dest in destinations.values():
                add(dest)
        elif name == RETURN_TO_SENDER:
            for ae in sorted(set(calling_aes)):
                if ae in known_aes:
                    add(known_aes[ae])
                else:
                    warnings.append(f"return-to-sender: calling AE {ae!r} is not in [known_aes]; "
                                    "add it as AE = \"host:port\" to send results back to it")
        elif name in destinations:
            add(destinations[name])
        else:
            warnings.append(f"rule {rule.name!r}: unknown destination {name!r}")
    return out, warnings


def validate_destination_names(rules: Iterable[Rule], names: Iterable[str]) -> None:
    """Raise ConfigError when a rule names a destination that is not configured."""
    known = set(names)
    for rule in rules:
        for name in rule.destinations:
            if name not in known and name not in (RETURN_TO_SENDER, ALL_DESTINATIONS):
                raise ConfigError(
                    f"[[rule]] {rule.name!r}: unknown destination {name!r}",
                    f"configured destinations: {', '.join(sorted(known)) or 'none'}; "
                    f"also allowed: {RETURN_TO_SENDER!r}, {ALL_DESTINATIONS!r}",
                )
