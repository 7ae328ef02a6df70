"""One typed Settings object: a TOML file overlaid by ``TRIAGE_<FIELD>`` environment variables.

Settings are built once at start (``Settings.load``) and passed down; nothing here runs at import
time. List and table fields given in the environment are JSON, for example
``TRIAGE_DESTINATIONS='["PACS@10.0.0.5:104"]'``.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)
from sqlalchemy import make_url
from sqlalchemy.exc import ArgumentError

from triage.errors import ConfigError

CONFIG_ENV_VAR = "TRIAGE_CONFIG"
# Variables triage reads that are not settings.
NOT_SETTINGS = ("TRIAGE_DEBUG", "TRIAGE_SCREENSHOT_DIR")

RENAMED_SETTINGS = {
    "delivery_backoff_seconds": "retry_backoff_seconds",
    "delivery_backoff_max_seconds": "retry_backoff_max_seconds",
}
"""Old setting name -> new one (the old name still works)."""

# PS3.5 6.2: an AE title is 1-16 characters of the default repertoire, no backslash or control
# characters, and not only spaces.
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


def _check_ae_title(value: str) -> str:
    if not _AE_TITLE.match(value) or not value.strip():
        raise ValueError(
            "an AE title is 1 to 16 printable ASCII characters, not only spaces, no backslash"
        )
    return value.strip()


AETitle = Annotated[str, AfterValidator(_check_ae_title)]
Port = Annotated[int, Field(ge=1, le=65535)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AllowedCaller(_Model):
    """A calling AE allowed to associate; ``host`` pins it to one address."""

    ae_title: AETitle
    host: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_short_form(cls, value: Any) -> Any:
        # "MODALITY" or "MODALITY@10.0.0.7"
        if isinstance(value, str):
            ae_title, _, host = value.partition("@")
            return {"ae_title": ae_title, "host": host or None}
        return value


class TlsFiles(_Model):
    """TLS material for a listener or a DIMSE destination (TLS 1.2 at least)."""

    cert_file: Path
    key_file: Path
    ca_file: Path | None = None
    require_client_cert: bool = False


_DIMSE_SHORT = re.compile(r"^(?P<ae_title>[^@]{1,16})@(?P<host>[^:@]+):(?P<port>\d+)$")


class UserIdentity(_Model):
    """A username and passcode a calling AE must give at association (PS3.7 D.3.3.7)."""

    ae_title: AETitle
    username: str
    passcode: SecretStr | None = None  # None: a username alone (identity type 1)


class DimseDestination(_Model):
    """A PACS that takes our results by C-STORE."""

    kind: Literal["dimse"] = "dimse"
    name: str = ""
    ae_title: AETitle
    host: str
    port: Port
    tls: TlsFiles | None = None

    @model_validator(mode="after")
    def _default_name(self) -> DimseDestination:
        if not self.name:
            object.__setattr__(self, "name", f"{self.ae_title}@{self.host}:{self.port}")
        return self


class DicomWebDestination(_Model):
    """A PACS that takes our results by STOW-RS at ``url`` (the DICOMweb base URL)."""

    kind: Literal["dicomweb"] = "dicomweb"
    name: str = ""
    url: Annotated[str, Field(pattern=r"^https?://")]
    token: SecretStr | None = None
    username: str | None = None
    password: SecretStr | None = None
    ca_file: Path | None = None

    @model_validator(mode="after")
    def _default_name(self) -> DicomWebDestination:
        if not self.name:
            object.__setattr__(self, "name", self.url)
        return self


def _destination_from_short_form(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    if value.startswith(("http://", "https://")):
        return {"kind": "dicomweb", "url": value}
    match = _DIMSE_SHORT.match(value)
    if match is None:
        raise ValueError(f"{value!r} is neither AE@host:port nor an http(s) DICOMweb URL")
    return {"kind": "dimse", **match.groupdict()}


def _with_kind(value: Any) -> Any:
    value = _destination_from_short_form(value)
    if isinstance(value, dict) and "kind" not in value:
        value = {**value, "kind": "dicomweb" if "url" in value else "dimse"}
    return value


Destination = Annotated[
    DimseDestination | DicomWebDestination,
    Field(discriminator="kind"),
    BeforeValidator(_with_kind),
]


def _check_regex(value: str | None) -> str | None:
    if value is not None:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from exc
    return value


Pattern = Annotated[str | None, AfterValidator(_check_regex)]


class RoutingRule(_Model):
    """Which models run on a completed study. Every condition given must match; patterns are
    case-insensitive regular expressions searched in the DICOM attribute."""

    name: str
    models: list[str] = Field(min_length=1)
    modalities: list[str] = Field(default_factory=list)
    body_part: Pattern = None
    study_description: Pattern = None
    series_description: Pattern = None
    calling_ae: Pattern = None


def _default_rules() -> list[RoutingRule]:
    return [
        RoutingRule(
            name="head-ct",
            models=["ct-head-hyperdensity"],
            modalities=["CT"],
            body_part=r"HEAD|BRAIN|SKULL",
        )
    ]


class Settings(BaseSettings):
    """Everything triage can be told. Field names are the TOML keys; ``TRIAGE_<FIELD>`` overrides.

    Keyword arguments stand for the file's values: the environment wins over them.
    """

    model_config = SettingsConfigDict(
        env_prefix="TRIAGE_", extra="forbid", frozen=True, validate_default=True
    )

    # DICOM listener
    ae_title: AETitle = "TRIAGE"
    dicom_host: str = "0.0.0.0"  # noqa: S104 - a PACS on another host must reach us
    dicom_port: Port = 11112
    allowed_callers: list[AllowedCaller] = Field(default_factory=list)
    # Optional user identity: a calling AE listed here must send this username (and passcode)
    # or is rejected at association; a sender asking for a positive response gets one.
    user_identities: list[UserIdentity] = Field(default_factory=list)
    max_associations: Annotated[int, Field(ge=1, le=256)] = 16
    dicom_processes: Annotated[int, Field(ge=1, le=64)] = 1
    max_pdu_bytes: Annotated[int, Field(ge=0)] = 131072
    network_timeout_seconds: Annotated[float, Field(gt=0)] = 60.0
    dimse_timeout_seconds: Annotated[float, Field(gt=0)] = 60.0
    # From TCP connect to a whole A-ASSOCIATE-RQ, TLS handshake included (PS3.8's ARTIM).
    acse_timeout_seconds: Annotated[float, Field(gt=0)] = 15.0
    # Once a PDU or a message has started, it must arrive at this rate on average (counted
    # after the network or DIMSE timeout's worth of grace), or the association is aborted.
    dicom_min_bytes_per_second: Annotated[int, Field(ge=0)] = 16_384
    # Connections that have not yet associated, per caller address and in all; more are
    # closed at once (they do not count against max_associations).
    max_negotiating_per_address: Annotated[int, Field(ge=1)] = 8
    max_negotiating: Annotated[int, Field(ge=1)] = 64
    # Memory each association receives a data set through, whatever the object's size: an
    # object that fits (a CT or MR slice) is checked in memory; a larger one streams to the
    # spool through it and is read back from the file.
    receive_buffer_kb: Annotated[int, Field(ge=16, le=65536)] = 1024
    tls: TlsFiles | None = None
    spool_min_free_mb: Annotated[int, Field(ge=0)] = 1024

    # Study completion
    study_quiet_seconds: Annotated[float, Field(gt=0)] = 60.0
    association_grace_seconds: Annotated[float, Field(ge=0)] = 3.0

    # HTTP
    http_host: str = "127.0.0.1"
    http_port: Port = 8080
    http_tls: TlsFiles | None = None  # HTTPS: tokens and patient data off loopback need it
    # The address clients reach triage's HTTP at (behind a proxy, or a name in a certificate),
    # e.g. https://triage.example.org: DICOMweb Retrieve URLs are built on it. Empty: from
    # each request's Host header.
    public_url: Annotated[str, Field(pattern=r"^(https?://.+)?$")] = ""
    # DICOMweb: STOW-RS bodies above this are refused (413) without reading on; a body must
    # keep arriving at the rate below, averaged from the start once the timeout has passed,
    # and no wait for its next piece may be longer than the timeout (408 otherwise).
    dicomweb_max_request_bytes: Annotated[int, Field(ge=1)] = 8 << 30
    dicomweb_timeout_seconds: Annotated[float, Field(gt=0)] = 60.0
    dicomweb_min_bytes_per_second: Annotated[int, Field(ge=0)] = 16_384

    # Storage and services
    data_dir: Path = Path("./triage-data")
    database_url: str = ""
    broker_url: str = ""
    workers: Annotated[int, Field(ge=0, le=64)] = 1
    # Archives that cannot push (triage-admin sources add): each is searched this often for
    # studies of a StudyDate from pull_lookback_days before its last search on, and new ones
    # are retrieved; an archive that fails is searched again after retry_backoff_seconds,
    # doubled each time.
    pull_poll_seconds: Annotated[float, Field(gt=0)] = 60.0
    pull_lookback_days: Annotated[int, Field(ge=0, le=3650)] = 1
    # Where `triage worker` finds the images it analyses and leaves its results:
    # "shared-disk" reads data_dir (the same storage as triage serve's); "dicomweb" fetches
    # the series from triage serve by WADO-RS and hands the SEG and SR back over HTTP, for a
    # worker on a machine that does not see data_dir. It then needs serve_url and a token of
    # role worker (serve_ca_file: the CA of an https serve_url).
    worker_images: Literal["shared-disk", "dicomweb"] = "shared-disk"
    serve_url: str = ""
    worker_token: SecretStr | None = None
    serve_ca_file: Path | None = None
    # Redis redelivers an unacknowledged task after this long: keep it above the slowest job.
    visibility_timeout_seconds: Annotated[float, Field(gt=0)] = 3600.0
    # The database decides what is owed: a job still queued after job_resend_seconds, or
    # running after job_timeout_seconds, is sent to the broker again by the sweeper.
    job_resend_seconds: Annotated[float, Field(gt=0)] = 300.0
    job_timeout_seconds: Annotated[float, Field(gt=0)] = 1800.0

    # Retries (triage.retry): every retry of a job, a delivery or a notification waits about
    # retry_backoff_seconds, doubled each attempt up to retry_backoff_max_seconds, with jitter.
    # A job that fails job_max_attempts times with a retryable error is failed.
    retry_backoff_seconds: Annotated[float, Field(gt=0)] = 5.0
    retry_backoff_max_seconds: Annotated[float, Field(gt=0)] = 600.0
    job_max_attempts: Annotated[int, Field(ge=1)] = 6

    # Results and routing
    destinations: list[Destination] = Field(default_factory=list)
    # After delivery_max_attempts a delivery (or a notification) becomes a failure for
    # `triage-admin failures`. A destination that fails destination_pause_after_failures times
    # in a row is paused, the others keep flowing.
    delivery_max_attempts: Annotated[int, Field(ge=1)] = 10
    destination_pause_after_failures: Annotated[int, Field(ge=1)] = 3
    destination_pause_seconds: Annotated[float, Field(ge=0)] = 120.0
    models_dir: Path | None = None
    routing_rules: list[RoutingRule] = Field(default_factory=_default_rules)

    # Worklist: target turnaround per tier (a study past its target escalates), how long a
    # radiologist's claim lasts, and a viewer link per study ({study_uid} is replaced).
    critical_target_minutes: Annotated[float, Field(ge=1)] = 15
    urgent_target_minutes: Annotated[float, Field(ge=1)] = 60
    routine_target_minutes: Annotated[float, Field(ge=1)] = 1440
    claim_minutes: Annotated[float, Field(gt=0)] = 30
    viewer_url_template: str = ""

    # Outward notifications of critical findings: a JSON webhook signed with HMAC-SHA256
    # (header X-Triage-Signature), and an HL7 v2 ORU^R01 over MLLP to a RIS ("host:port").
    webhook_url: str = ""
    webhook_secret: SecretStr | None = None
    hl7_destination: str = ""
    hl7_sending_facility: str = "TRIAGE"
    hl7_receiving_application: str = "RIS"
    hl7_receiving_facility: str = "HOSPITAL"
    # A critical alert waits this long for an acknowledgment (web page, or POST
    # /api/studies/{uid}/acknowledge); then it is escalated, once, to the escalation webhook
    # and/or HL7 destination. 0, or no escalation destination, turns escalation off.
    alert_acknowledge_seconds: Annotated[float, Field(ge=0)] = 600.0
    escalation_webhook_url: str = ""
    escalation_hl7_destination: str = ""

    # Drift monitoring: the population stability index of a model version's study scores over
    # the last drift_window_days against its sidecar's reference distribution; above the
    # threshold, with at least drift_min_studies scores, the version is in alarm.
    drift_psi_threshold: Annotated[float, Field(gt=0)] = 0.25
    drift_min_studies: Annotated[int, Field(ge=1)] = 100
    drift_window_days: Annotated[float, Field(gt=0)] = 7

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        """Settings that were renamed keep working under their old names (file and
        environment); the new name wins where both are given."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for old, new in RENAMED_SETTINGS.items():
            value = data.pop(old, os.environ.get(f"TRIAGE_{old.upper()}"))
            if value is not None and new not in data:
                data[new] = value
        return data

    @model_validator(mode="after")
    def _derive_paths(self) -> Settings:
        data_dir = self.data_dir.expanduser().resolve()
        object.__setattr__(self, "data_dir", data_dir)
        if not self.database_url:
            object.__setattr__(self, "database_url", f"sqlite:///{data_dir / 'triage.sqlite'}")
        else:
            try:
                make_url(self.database_url)
            except ArgumentError:
                raise ValueError(
                    f"database_url {self.database_url!r} is not a database URL, e.g. "
                    "postgresql+psycopg://triage@db/triage or sqlite:////var/lib/triage/t.sqlite"
                ) from None
        if self.worker_images == "dicomweb" and not (self.serve_url and self.worker_token):
            raise ValueError(
                "worker_images = dicomweb needs serve_url (triage serve's HTTP address) and "
                "worker_token (triage-admin tokens create NAME --role worker)"
            )
        return self

    @property
    def embedded_broker(self) -> bool:
        """True when no broker is configured and triage runs its own on SQLite."""
        return not self.broker_url

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Keyword arguments carry the file's values, so the environment overrides them.
        return (env_settings, init_settings)

    @classmethod
    def load(cls, config_file: Path | None = None, **overrides: Any) -> Settings:
        """Build the settings from ``config_file`` (or ``$TRIAGE_CONFIG``) and the environment.

        Raises ConfigError with one line naming the field and the reason.
        """
        path = config_file or (Path(p) if (p := os.environ.get(CONFIG_ENV_VAR)) else None)
        data = _read_toml(path) if path else {}
        try:
            return cls(**{**data, **overrides})
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc)) from None
        except SettingsError as exc:  # a list or table setting whose variable is not JSON
            found = re.search(r'field "(\w+)"', str(exc))
            name = f"TRIAGE_{found.group(1).upper()}" if found else "a TRIAGE_ variable"
            raise ConfigError(
                f"invalid configuration: {name} is not valid JSON; list and table settings in "
                f"the environment are JSON, e.g. TRIAGE_DESTINATIONS='[\"PACS@10.0.0.5:104\"]'"
            ) from None


def unknown_environment(environ: Mapping[str, str] | None = None) -> list[str]:
    """One warning per ``TRIAGE_*`` variable that names no setting, with the likely one."""
    known = {f"TRIAGE_{name.upper()}" for name in Settings.model_fields}
    known |= {f"TRIAGE_{old.upper()}" for old in RENAMED_SETTINGS}
    known |= {CONFIG_ENV_VAR, *NOT_SETTINGS}
    warnings = []
    for variable in sorted(environ if environ is not None else os.environ):
        if variable.startswith("TRIAGE_") and variable not in known:
            close = difflib.get_close_matches(variable, sorted(known), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            warnings.append(f"{variable} is not a triage setting and is ignored{hint}")
    return warnings


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"configuration file {path} cannot be read: {exc.strerror}") from None


def describe_validation_error(exc: ValidationError) -> str:
    """One line per settings error, joined: ``field: reason (got 'value')``."""
    parts = []
    for error in exc.errors():
        loc = ".".join(str(p) for p in error["loc"] if not str(p).startswith("function-"))
        shown = error.get("input")
        got = f" (got {shown!r})" if isinstance(shown, str | int | float) else ""
        parts.append(f"{loc or 'settings'}: {error['msg']}{got}")
    return "invalid configuration: " + "; ".join(parts)
