"""Routing rules: tag regexes, numeric ranges, ImageType tokens, calling AE, QSM-input check, destinations."""

import pytest
from pydicom import Dataset

from qsmnode.errors import ConfigError
from qsmnode.node.dispatch import Destination
from qsmnode.node.rules import (AcquisitionFacts, Rule, default_rule, explain, match_rules, resolve_destinations,
                                validate_destination_names)


def header(**kw):
    ds = Dataset()
    ds.SeriesInstanceUID = kw.pop("uid", "1.2.3")
    ds.MRAcquisitionType = kw.pop("acq", "3D")
    ds.ImageType = kw.pop("image_type", ["ORIGINAL", "PRIMARY", "M"])
    ds.SeriesDescription = kw.pop("desc", "gre_qsm_5echo")
    ds.MagneticFieldStrength = kw.pop("field", 3)
    ds.Manufacturer = kw.pop("manufacturer", "SIEMENS")
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


def facts(**kw):
    mag = header(uid="1.1", image_type=["ORIGINAL", "PRIMARY", "M"])
    pha = header(uid="1.2", image_type=["ORIGINAL", "PRIMARY", "P"], desc=kw.pop("phase_desc", "gre_qsm_5echo"))
    return AcquisitionFacts(headers=kw.pop("headers", [mag, pha]), components=kw.pop("components", {"magnitude", "phase"}),
                            echo_numbers=kw.pop("echoes", {1, 2, 3, 4, 5}), calling_aes=kw.pop("aes", {"MR1"}))


def rule(**table):
    return Rule.from_config({"name": "r", **table}, 0)


def test_default_rule_takes_3d_multi_echo_with_phase():
    ok, lines = explain(default_rule(), facts())
    assert ok and "MRAcquisitionType is 3D" in lines and "5 echoes" in lines


@pytest.mark.parametrize("f, why", [
    (dict(components={"magnitude"}), "no phase"),
    (dict(echoes={1}), "only 1 echo"),
    (dict(headers=[header(acq="2D")]), "not 3D"),
])
def test_default_rule_refuses_what_is_not_a_qsm_input(f, why):
    chosen, lines = match_rules([], facts(**f))
    assert chosen is None and why in lines[0]


def test_echo_train_length_counts_as_echoes():
    f = facts(echoes=set(), headers=[header(EchoTrainLength=4)])
    ok, lines = explain(default_rule(), f)
    assert ok and "4 echoes" in lines


def test_tag_conditions_regex_range_equality_and_any_of():
    f = facts()
    assert explain(rule(match={"tags": {"SeriesDescription": "(?i)QSM"}}), f)[0]
    assert not explain(rule(match={"tags": {"SeriesDescription": "^t1"}}), f)[0]
    assert explain(rule(match={"tags": {"MagneticFieldStrength": {"min": 2.5, "max": 3.5}}}), f)[0]
    ok, lines = explain(rule(match={"tags": {"MagneticFieldStrength": {"min": 6}}}), f)
    assert not ok and any("not in [6, inf]" in line for line in lines)
    assert explain(rule(match={"tags": {"MagneticFieldStrength": 3}}), f)[0]
    assert explain(rule(match={"tags": {"Manufacturer": ["(?i)^ge", "(?i)siemens"]}}), f)[0]
    ok, lines = explain(rule(match={"tags": {"BodyPartExamined": "HEAD"}}), f)
    assert not ok and any("absent" in line for line in lines)


def test_image_type_tokens_and_per_series_evaluation():
    # the phase series alone carries "P": a rule that asks for it matches through that series
    ok, lines = explain(rule(match={"image_type": ["ORIGINAL", "P"]}), facts())
    assert ok and "1.2" in lines[-1]
    # all conditions must hold on ONE series: description of the magnitude + P of the phase is no match
    f = facts(phase_desc="phase_only")
    ok, _ = explain(rule(match={"image_type": ["P"], "tags": {"SeriesDescription": "qsm"}}), f)
    assert not ok


def test_calling_ae_and_first_match_wins():
    rules = [rule(name="other", match={"calling_ae": "^CT"}), Rule.from_config({"name": "mr", "match": {"calling_ae": "^MR"}}, 1)]
    chosen, lines = match_rules(rules, facts())
    assert chosen.name == "mr" and "matches" in lines[0]
    chosen, why_not = match_rules(rules, facts(aes={"XA1"}))
    assert chosen is None and len(why_not) == 2 and "does not match" in why_not[0]


def test_qsm_input_can_be_switched_off():
    chosen, _ = match_rules([rule(match={"qsm_input": False})], facts(components={"magnitude"}))
    assert chosen is not None


def test_destinations_resolve_names_all_and_return_to_sender():
    pacs = Destination.parse_address("PACS@10.0.0.5:104", name="pacs")
    arch = Destination.parse_address("ARCH@10.0.0.6:104", name="archive")
    mr1 = Destination.parse_address("MR1@10.0.0.21:104")
    dests = {"pacs": pacs, "archive": arch}
    out, warn = resolve_destinations(rule(destinations=["pacs", "return-to-sender"]), dests, {"MR1": mr1}, {"MR1"})
    assert out == [pacs, mr1] and warn == []
    out, warn = resolve_destinations(default_rule(), dests, {}, {"MR1"})
    assert out == [pacs, arch]
    out, warn = resolve_destinations(rule(destinations=["return-to-sender"]), dests, {}, {"MR9"})
    assert out == [] and "MR9" in warn[0] and "known_aes" in warn[0]


def test_rule_config_errors():
    with pytest.raises(ConfigError, match="must be bool"):
        rule(parametric_map="yes")
    with pytest.raises(ConfigError, match="list of destination names"):
        rule(destinations="pacs")
    with pytest.raises(ConfigError, match="unknown destination 'x'"):
        validate_destination_names([rule(destinations=["x"])], ["pacs"])


def test_unknown_preset_or_override_is_refused_with_the_known_names():
    import pytest as _pytest

    from qsmnode.errors import ConfigError
    from qsmnode.node.rules import Rule

    with _pytest.raises(ConfigError, match="unknown preset '7T'.*accurate"):
        Rule.from_config({"name": "r", "preset": "7T"}, 0)
    with _pytest.raises(ConfigError, match="unknown override.*swi_power"):
        Rule.from_config({"name": "r", "overrides": {"swi_power": 3}}, 0)
    assert Rule.from_config({"name": "r", "preset": "fast", "overrides": {"swi_mask_power": 3}}, 0).preset == "fast"


def test_explanations_quote_values_plainly_not_as_python_lists():
    """Issue 13 item 12: reasons are for people: no "['2D']" or "['^t1']" reprs."""
    chosen, lines = match_rules([], facts(components={"magnitude"}, headers=[header(acq="2D")]))
    assert chosen is None
    assert "MRAcquisitionType is 2D, not 3D" in lines[0] and "(components seen: magnitude)" in lines[0]
    _, lines = explain(rule(match={"tags": {"SeriesDescription": ["^t1", "^t2"]}, "image_type": ["SWI"],
                                   "calling_ae": "^MR2$"}), facts())
    text = " ".join(lines)
    assert "calling AE MR1 does not match" in text and "matches none of '^t1', '^t2'" in text
    assert "ImageType M/ORIGINAL/PRIMARY lacks SWI" in text
    assert "[" not in text.replace("[[", ""), text
