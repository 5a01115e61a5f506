"""Node configuration: defaults, site files, validation messages."""

import json

import pytest

from S15qkd.config import ConfigError, load_config, missing_keys


def test_defaults_without_site_file():
    config = load_config()
    assert config["port_authd"] == 4853
    assert config["role"] == "high"
    assert config["QBER_limit"] == 0.1
    assert config.skew_corrections() == [0, 0, 0, 0]


def test_yaml_site_file_overrides(tmp_path):
    site = tmp_path / "site.yaml"
    site.write_text("identity: alice\nrole: low\ntarget_hostname: 10.0.0.2\n"
                    "local_detector_skew_correction:\n  det2corr: -12\n"
                    "source:\n  kind: file\n  events_file: /data/ev.out\n")
    config = load_config(site)
    assert config["identity"] == "alice"
    assert config["role"] == "low"
    assert config["source.kind"] == "file"
    assert config.skew_corrections() == [0, -12, 0, 0]


def test_json_site_file_with_reference_keys(tmp_path):
    site = tmp_path / "site.json"
    site.write_text(json.dumps({"QBER_limit": 0.09, "program_root": "bin/remotecrypto",
                                "kill_option": "-k -K"}))
    config = load_config(site)
    assert config["QBER_limit"] == 0.09


@pytest.mark.parametrize("values, message", [
    ({"role": "middle"}, "invalid value for 'role': expected 'high' or 'low', got 'middle'"),
    ({"port_authd": 70000}, "invalid value for 'port_authd': expected a TCP port"),
    ({"QBER_limit": "low"}, "invalid value for 'QBER_limit': expected a fraction from 0 to 0.5"),
    ({"local_detector_skew_correction": {"det1corr": 1.5}},
     "invalid value for 'local_detector_skew_correction.det1corr'"),
    ({"remote_connection_id": "two words"}, "expected a string without white space"),
    ({"no_such_key": 1}, "unknown configuration key 'no_such_key'"),
    ({"reconnect_min_s": 5.0, "reconnect_max_s": 1.0}, "expected at most reconnect_max_s"),
])
def test_invalid_values_name_key_and_form(values, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(overrides=values)


def test_boolean_is_not_a_number():
    with pytest.raises(ConfigError, match="QBER_limit"):
        load_config(overrides={"QBER_limit": True})


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read configuration file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="invalid JSON"):
        load_config(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(listing)


def test_connection_overrides(tmp_path):
    config = load_config(overrides={"connections": {"QKDE0003": {"target_hostname": "c.local"}}})
    selected = config.with_connection("QKDE0003")
    assert selected["target_hostname"] == "c.local"
    assert selected["remote_connection_id"] == "QKDE0003"
    assert config["target_hostname"] == ""
    with pytest.raises(ConfigError, match="unknown connection id 'QKDE9'"):
        config.with_connection("QKDE9")


def test_connection_keeps_explicit_keys():
    config = load_config(overrides={"QBER_limit": 0.08,
                                    "connections": {"QKDE0003": {"target_hostname": "c.local"}}})
    selected = config.with_connection("QKDE0003")
    assert selected.explicit_keys == {"QBER_limit", "connections", "target_hostname",
                                      "remote_connection_id"}
    with pytest.raises(ConfigError, match="missing value for 'source.kind'"):
        selected.require_explicit_source_kind()


def test_missing_keys_listed():
    assert missing_keys(load_config().as_dict()) == []
    assert missing_keys({"QBER_limit": 0.08})[:2] == ["identity", "role"]
    assert "source.kind" in missing_keys({"source": {"seed": 3}})
    assert "source.seed" not in missing_keys({"source": {"seed": 3}})
    assert "source.kind" in missing_keys({"source": "simulator"})


def test_channel_files_required(tmp_path):
    config = load_config(overrides={"role": "low"})
    with pytest.raises(ConfigError, match="missing value for 'local_cert'"):
        config.require_channel_files()


def test_certificate_folder_named(tmp_path):
    config = load_config(overrides={"local_cert": str(tmp_path), "local_key": str(tmp_path),
                                    "remote_cert": str(tmp_path)})
    with pytest.raises(ConfigError, match=f"'local_cert': '{tmp_path}' is a folder; give the "
                                          "path of the PEM file"):
        config.require_channel_files()


def test_folder_that_is_file_named(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    config = load_config(overrides={"data_root": str(blocker), "final_key_folder": str(tmp_path)})
    with pytest.raises(ConfigError, match=f"'data_root': '{blocker}' is a file, not a folder"):
        config.require_folders()
    config = load_config(overrides={"data_root": str(tmp_path),
                                    "final_key_folder": str(blocker / "keys")})
    with pytest.raises(ConfigError, match=f"'final_key_folder': '{blocker}' is a file, so the "
                                          f"folder '{blocker / 'keys'}' cannot be created"):
        config.require_folders()
    load_config(overrides={"data_root": str(tmp_path / "new" / "data"),
                           "final_key_folder": str(tmp_path)}).require_folders()
