from __future__ import annotations

from pathlib import Path

import pytest

from triage.config import DicomWebDestination, DimseDestination, Settings
from triage.errors import ConfigError


def test_defaults_are_the_documented_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = Settings.load()
    assert settings.ae_title == "TRIAGE"
    assert settings.dicom_port == 11112
    assert settings.http_host == "127.0.0.1"
    assert settings.http_port == 8080
    assert settings.data_dir == tmp_path / "triage-data"
    assert settings.database_url == f"sqlite:///{tmp_path / 'triage-data' / 'triage.sqlite'}"
    assert settings.broker_url == ""
    assert settings.embedded_broker
    assert settings.allowed_callers == []
    assert settings.destinations == []


def test_toml_file_then_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "triage.toml"
    config.write_text(
        'ae_title = "AI_TRIAGE"\n'
        "dicom_port = 4242\n"
        'destinations = ["PACS@10.0.0.5:104", "https://pacs.example/dicom-web"]\n'
        'allowed_callers = ["CT_SCANNER", "ORTHANC@127.0.0.1"]\n'
        "[[routing_rules]]\n"
        'name = "chest"\n'
        'models = ["cxr"]\n'
        'modalities = ["CR", "DX"]\n'
    )
    monkeypatch.setenv("TRIAGE_DICOM_PORT", "5555")
    settings = Settings.load(config)
    assert settings.ae_title == "AI_TRIAGE"
    assert settings.dicom_port == 5555  # the environment wins over the file
    dimse, web = settings.destinations
    assert isinstance(dimse, DimseDestination)
    assert (dimse.ae_title, dimse.host, dimse.port) == ("PACS", "10.0.0.5", 104)
    assert isinstance(web, DicomWebDestination)
    assert web.url == "https://pacs.example/dicom-web"
    assert [(c.ae_title, c.host) for c in settings.allowed_callers] == [
        ("CT_SCANNER", None),
        ("ORTHANC", "127.0.0.1"),
    ]
    assert [r.name for r in settings.routing_rules] == ["chest"]


def test_config_file_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "other.toml"
    config.write_text('ae_title = "FROM_ENV_FILE"\n')
    monkeypatch.setenv("TRIAGE_CONFIG", str(config))
    assert Settings.load().ae_title == "FROM_ENV_FILE"


def test_destinations_as_json_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "TRIAGE_DESTINATIONS",
        '["PACS@10.0.0.5:104", {"url": "http://127.0.0.1:8042/dicom-web", "token": "s3cret"}]',
    )
    dimse, web = Settings.load().destinations
    assert isinstance(dimse, DimseDestination)
    assert isinstance(web, DicomWebDestination)
    assert web.token is not None
    assert web.token.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(web)


@pytest.mark.parametrize(
    ("variable", "value", "field"),
    [
        ("TRIAGE_DICOM_PORT", "abc", "dicom_port"),
        ("TRIAGE_DICOM_PORT", "70000", "dicom_port"),
        ("TRIAGE_AE_TITLE", "MUCH_TOO_LONG_AE_TITLE", "ae_title"),
        ("TRIAGE_AE_TITLE", "BACK\\SLASH", "ae_title"),
        ("TRIAGE_DESTINATIONS", '["not a destination"]', "destinations.0"),
        ("TRIAGE_STUDY_QUIET_SECONDS", "-1", "study_quiet_seconds"),
        ("TRIAGE_LOG_LEVEL", "LOUD", "log_level"),
    ],
)
def test_bad_values_name_the_field(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, field: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        Settings.load()
    message = str(caught.value)
    assert message.startswith(f"invalid configuration: {field}:")
    assert "\n" not in message


def test_unknown_key_in_file_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "triage.toml"
    config.write_text("dicom_prot = 104\n")
    with pytest.raises(ConfigError, match="dicom_prot: Extra inputs are not permitted"):
        Settings.load(config)


def test_bad_regex_in_routing_rule(tmp_path: Path) -> None:
    config = tmp_path / "triage.toml"
    config.write_text('[[routing_rules]]\nname = "x"\nmodels = ["m"]\nbody_part = "HEAD("\n')
    with pytest.raises(ConfigError, match=r"routing_rules\.0\.body_part"):
        Settings.load(config)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        Settings.load(tmp_path / "absent.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("ae_title = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        Settings.load(broken)


def test_example_configuration_loads() -> None:
    example = Path(__file__).parents[2] / "deploy" / "triage.example.toml"
    settings = Settings.load(example)
    assert settings.routing_rules[0].models == ["ct-head-hyperdensity"]


def test_renamed_backoff_settings_are_still_read_from_the_file_and_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "triage.toml"
    config.write_text("delivery_backoff_seconds = 2.5\n")
    assert Settings.load(config).retry_backoff_seconds == 2.5
    monkeypatch.setenv("TRIAGE_DELIVERY_BACKOFF_MAX_SECONDS", "90")
    assert Settings.load(config).retry_backoff_max_seconds == 90
    monkeypatch.setenv("TRIAGE_RETRY_BACKOFF_MAX_SECONDS", "30")  # the new name wins
    assert Settings.load(config).retry_backoff_max_seconds == 30


def test_a_worker_without_shared_disk_needs_the_address_and_a_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TRIAGE_WORKER_IMAGES", "dicomweb")
    with pytest.raises(ConfigError, match="serve_url") as caught:
        Settings.load()
    assert "\n" not in str(caught.value)
    monkeypatch.setenv("TRIAGE_SERVE_URL", "https://triage.example:8080")
    monkeypatch.setenv("TRIAGE_WORKER_TOKEN", "trg_x")
    assert Settings.load().worker_images == "dicomweb"
