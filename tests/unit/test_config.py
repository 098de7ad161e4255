"""Node configuration: valid files load, every kind of mistake is refused with a message naming it."""

from pathlib import Path

import pytest

from qsmnode.config import NodeConfig, load_config
from qsmnode.node.dispatch import DispatchSettings
from qsmnode.errors import ConfigError
from qsmnode.cli import main

GOOD = """
[node]
ae_title = "QSMNODE"
port = 11112
storage = "store"
device = "cpu"
fsync_directory = true
quiet_seconds = 5
incomplete_cap_seconds = 60
allowed_calling_aets = ["MR1", "MR2"]
allowed_hosts = ["10.0.0.0/24", "127.0.0.1"]

[http]
port = 0

[retention]
keep_hours = 2

[dispatch]
base_delay_s = 1
max_delay_s = 60.0
max_refusals = 3
associations = 2

[known_aes]
MR1 = "10.0.0.21:104"

[[destination]]
name = "pacs"
address = "PACS@10.0.0.5:104"

[[rule]]
name = "brain"
preset = "accurate"
destinations = ["pacs", "return-to-sender"]
[rule.match]
calling_ae = "^MR"
image_type = ["ORIGINAL"]
[rule.match.tags]
SeriesDescription = "(?i)gre"
MagneticFieldStrength = { min = 2.5, max = 3.5 }
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "node.toml"
    p.write_text(text)
    return p


def test_good_config_loads_with_resolved_paths(tmp_path):
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.storage == tmp_path.resolve() / "store"
    assert cfg.db_path == cfg.storage / "index.sqlite"
    assert cfg.audit_path == cfg.storage / "audit.log"
    assert cfg.device == "cpu" and cfg.quiet_seconds == 5.0 and cfg.retention_hours == 2.0
    assert cfg.allowed_calling_aets == ("MR1", "MR2") and cfg.fsync_directory is True
    assert set(cfg.destinations) == {"pacs"}
    pacs = cfg.destinations["pacs"]
    assert (pacs.ae_title, pacs.host, pacs.port) == ("PACS", "10.0.0.5", 104)
    assert cfg.known_aes["MR1"].port == 104
    assert (cfg.dispatch.base_delay_s, cfg.dispatch.max_delay_s, cfg.dispatch.max_refusals,
            cfg.dispatch.batch_size, cfg.dispatch.associations) == (1.0, 60.0, 3, 500, 2)
    (rule,) = cfg.rules
    assert rule.name == "brain" and rule.preset == "accurate" and rule.destinations == ("pacs", "return-to-sender")
    assert [c.keyword for c in rule.tags] == ["SeriesDescription", "MagneticFieldStrength"]


def test_defaults_without_file():
    cfg = NodeConfig()
    assert cfg.ae_title == "QSMNODE" and cfg.port == 11112 and cfg.device == "auto"
    assert [r.name for r in cfg.effective_rules] == ["default"]
    assert cfg.dispatch == DispatchSettings()  # the Dispatcher's own defaults


@pytest.mark.parametrize("text, words", [
    ("[node]\nportt = 1\n", ["unknown key 'portt'", "allowed keys"]),
    ("[nodes]\n", ["unknown section", "'nodes'"]),
    ("[node]\nport = \"eleven\"\n", ["port must be int", "str"]),
    ("[node]\ndevice = \"tpu\"\n", ["device 'tpu'"]),
    ("[node]\nae_title = \"AN_AE_TITLE_THAT_IS_TOO_LONG\"\n", ["not a valid AE title"]),
    ("[node]\nquiet_seconds = 100\nincomplete_cap_seconds = 10\n", ["incomplete_cap_seconds", "quiet_seconds"]),
    ("[node]\nallowed_hosts = [\"not-an-ip\"]\n", ["allowed_hosts", "not-an-ip"]),
    ("[[rule]]\nname = \"r\"\ndestinations = [\"nowhere\"]\n", ["unknown destination 'nowhere'"]),
    ("[[rule]]\nname = \"r\"\ncolour = 1\n", ["unknown key 'colour'"]),
    ("[[rule]]\nname = \"r\"\n[rule.match.tags]\nNotAKeyword = \"x\"\n", ["NotAKeyword", "not a DICOM attribute"]),
    ("[[rule]]\nname = \"r\"\n[rule.match.tags]\nSeriesDescription = \"(\"\n", ["invalid regular expression"]),
    ("[[rule]]\nname = \"r\"\n[rule.match.tags]\nEchoTime = { low = 1 }\n", ["min and max"]),
    ("[[destination]]\nname = \"a\"\naddress = \"PACS@h:1\"\n[[destination]]\nname = \"a\"\naddress = \"X@h:2\"\n",
     ["used twice"]),
    ("[[destination]]\nname = \"a\"\nkind = \"dimse\"\n", ["destination"]),
    ("[tls]\ncertificate = \"missing.pem\"\nprivate_key = \"missing.key\"\n", ["file not found"]),
    ("[node\n", ["not valid TOML"]),
    ("[dispatch]\nbase_delay = 1\n", ["[dispatch]: unknown key 'base_delay'", "base_delay_s"]),
    ("[dispatch]\nbase_delay_s = \"2s\"\n", ["[dispatch] base_delay_s must be float", "str"]),
    ("[dispatch]\nmax_refusals = 2.5\n", ["[dispatch] max_refusals must be int", "float"]),
    ("[dispatch]\nassociations = true\n", ["[dispatch] associations must be int", "bool"]),
    ("[dispatch]\nbase_delay_s = 0\n", ["[dispatch] base_delay_s must be > 0"]),
    ("[dispatch]\nbase_delay_s = 10\nmax_delay_s = 5\n", ["[dispatch] max_delay_s (5) is below base_delay_s (10)"]),
    ("[dispatch]\nmax_refusals = 0\n", ["[dispatch] max_refusals must be >= 1"]),
    ("[dispatch]\nbatch_size = -1\n", ["[dispatch] batch_size must be >= 1"]),
    ("[dispatch]\nassociations = 64\n", ["[dispatch] associations must be between 1 and 32"]),
    ("dispatch = 3\n", ["[dispatch] must be a table"]),
])
def test_bad_configs_are_refused_with_the_reason(tmp_path, text, words):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    for w in words:
        assert w in str(err.value)


def test_check_config_command(tmp_path, capsys):
    good = write(tmp_path, GOOD)
    assert main(["check-config", str(good)]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "rule brain" in out and "destination pacs" in out
    bad = tmp_path / "bad.toml"
    bad.write_text("[node]\nportt = 1\n")
    assert main(["check-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'portt'" in err and err.count("\n") == 1
    bad.write_text("[dispatch]\nmax_delay_s = 1\n")  # below the default base_delay_s
    assert main(["check-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "[dispatch] max_delay_s (1) is below base_delay_s (2)" in err and err.count("\n") == 1


def test_shipped_example_config_passes_check_config(capsys):
    example = Path(__file__).resolve().parents[2] / "deploy" / "qsmnode.toml"
    assert main(["check-config", str(example)]) == 0
    out = capsys.readouterr().out
    assert "dispatch: back-off 2 s .. 300 s" in out and "up to 4 association(s)" in out
    assert load_config(example).dispatch == DispatchSettings()  # the example documents the defaults
