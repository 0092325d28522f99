"""Offline consistency checks of infra/*.tf against the code (no terraform, no network).

Each ``check_*`` function takes parsed Terraform (the merged output of python-hcl2) and returns a
list of problems. The real configuration must give none; a synthetic bad configuration, parsed
from HCL text in the same way, must give the problem it plants.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hcl2
import pytest

from dicomflow.config import SETTINGS_DOC, TOMBSTONES_PREFIX

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"

REQUIRED = {name for name, default, _ in SETTINGS_DOC if default == "required"}
DEFAULTS = {name: default for name, default, _ in SETTINGS_DOC}
# Settings for localcloud only: emulator endpoints, and the key file (Google Cloud uses the secret).
ENDPOINTS = {
    "DICOMFLOW_HEALTHCARE_ENDPOINT",
    "DICOMFLOW_PUBSUB_ENDPOINT",
    "STORAGE_EMULATOR_HOST",
    "DICOMFLOW_KEY_FILE",
}
# Settings the module sets from a variable of its own: env name -> the variable.
WIRED = {
    "DICOMFLOW_BACKUP_PREFIX": "backup_prefix",
    "DICOMFLOW_ALERT_UIDS": "alert_uids",
    "DICOMFLOW_SWEEP_HOURS": "sweep_hours",
    "DICOMFLOW_LANDING_DELETE_AFTER_DAYS": "landing_delete_after_days",
    "DICOMFLOW_RESTORE_DRILL_DAYS": "restore_drill_days",
    "DICOMFLOW_RESTORE_DRILL_STUDIES": "restore_drill_studies",
}
KNOWN = {name for name, _, _ in SETTINGS_DOC}
FUNCTIONS = {"ingest", "report", "export"}
DRILL_RUNNERS = {"export", "report"}  # dicomflow/drill.py: export starts a drill, report settles it
PRIMITIVE_ROLES = {"roles/owner", "roles/editor", "roles/viewer"}
BACKUP_READ_ONLY = {"roles/storage.objectViewer"}
SHIPPED = {"main.py", "requirements.txt", "dicomflow"}
NEVER_SHIPPED = ("tests", "localcloud", "bench", "infra")

Config = dict[str, Any]


# --- parsing ---------------------------------------------------------------------------------


def _clean(value: Any) -> Any:
    """python-hcl2 keeps the quotes of literals and adds __is_block__ keys; drop both."""
    if isinstance(value, dict):
        return {_clean(k): _clean(v) for k, v in value.items() if not str(k).startswith("__")}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def _comments(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "__comments__":
                yield from (c["value"] for c in item)
            else:
                yield from _comments(item)
    elif isinstance(value, list):
        for item in value:
            yield from _comments(item)


def parse(texts: list[str]) -> Config:
    """Merge several .tf texts into {"resource": {type: {name: body}}, "variable": ..., ...}."""
    merged: Config = {
        "resource": {},
        "data": {},
        "variable": {},
        "locals": {},
        "output": {},
        "comments": [],
    }
    for text in texts:
        raw = hcl2.loads(text)
        merged["comments"].extend(_comments(raw))
        doc = _clean(raw)
        for kind in ("resource", "data"):
            for block in doc.get(kind, []):
                for rtype, named in block.items():
                    merged[kind].setdefault(rtype, {}).update(named)
        for kind in ("variable", "output"):
            for block in doc.get(kind, []):
                merged[kind].update(block)
        for block in doc.get("locals", []):
            merged["locals"].update(block)
    return merged


@pytest.fixture(scope="module")
def config() -> Config:
    return parse([p.read_text() for p in sorted(INFRA.glob("*.tf"))])


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, str):
        yield value


def _blocks(body: dict[str, Any], name: str) -> list[dict[str, Any]]:
    found = body.get(name, [])
    return found if isinstance(found, list) else [found]


# --- checks ----------------------------------------------------------------------------------


def check_env(cfg: Config) -> list[str]:
    """Env names set on the functions exist in SETTINGS_DOC, and each function gets the required."""
    problems = []
    fixed = cfg["locals"].get("function_env_fixed", {})
    for name in sorted(set(fixed) - KNOWN):
        problems.append(
            f"{name} is set on the functions but not in dicomflow/config.py SETTINGS_DOC"
        )
    for name in sorted(set(fixed) & ENDPOINTS):
        problems.append(f"{name} is for localcloud only and must stay unset on Google Cloud")
    for name in sorted(REQUIRED - set(fixed)):
        problems.append(f"required setting {name} is not set on the functions")
    for name, variable in WIRED.items():
        if name in fixed and f"var.{variable}" not in str(fixed[name]):
            problems.append(f"{name} is not set from var.{variable}")
    if "DICOMFLOW_KEY_SECRET" in fixed and not re.search(
        r"google_secret_manager_secret\.deployment_key\.id\}/versions/latest",
        str(fixed["DICOMFLOW_KEY_SECRET"]),
    ):
        problems.append("DICOMFLOW_KEY_SECRET is not the deployment key secret's latest version")
    if cfg["locals"].get("function_env") != "${merge(var.settings, local.function_env_fixed)}":
        problems.append("local.function_env must be merge(var.settings, local.function_env_fixed)")

    # The tuning allow-list in var.settings names only optional, non-endpoint settings, and together
    # with the fixed names covers every setting, so a new setting in config.py shows up here.
    settings_var = cfg["variable"].get("settings", {})
    allowed = set()
    for validation in _blocks(settings_var, "validation"):
        allowed |= set(re.findall(r"\b(DICOMFLOW_[A-Z0-9_]+)\b", str(validation.get("condition"))))
    for name in sorted(allowed - KNOWN):
        problems.append(f"var.settings allows {name}, which SETTINGS_DOC does not have")
    for name in sorted(allowed & (REQUIRED | ENDPOINTS | set(fixed))):
        problems.append(f"var.settings allows {name}, which the module sets or must leave unset")
    for name in sorted(KNOWN - ENDPOINTS - set(fixed) - allowed):
        problems.append(f"setting {name} can be neither set by the module nor through var.settings")

    functions = cfg["resource"].get("google_cloudfunctions2_function", {})
    if not functions:
        problems.append("no google_cloudfunctions2_function")
    for rname, body in functions.items():
        for service in _blocks(body, "service_config"):
            if service.get("environment_variables") != "${local.function_env}":
                problems.append(f"function {rname} does not get local.function_env")
    return problems


def check_functions(cfg: Config, entry_points: set[str]) -> list[str]:
    """The function table matches main.py, and each function runs as its own service account."""
    problems = []
    table = set(cfg["locals"].get("functions", {}))
    if table != entry_points:
        problems.append(
            f"local.functions {sorted(table)} != main.py entry points {sorted(entry_points)}"
        )
    accounts = cfg["resource"].get("google_service_account", {})
    functions = cfg["resource"].get("google_cloudfunctions2_function", {})
    for rname, body in functions.items():
        if body.get("for_each") != "${local.functions}":
            problems.append(f"function {rname} is not one per entry of local.functions")
        if _blocks(body, "build_config")[0].get("entry_point") != "${each.key}":
            problems.append(f"function {rname} entry_point is not its key in local.functions")
        per_function = f"${{google_service_account.{rname}[each.key].email}}"
        sa_body = accounts.get(rname, {})
        if sa_body.get("for_each") != "${local.functions}":
            problems.append(
                f"function {rname}: google_service_account.{rname} is not one per function"
            )
        for service in _blocks(body, "service_config"):
            if service.get("service_account_email") != per_function:
                problems.append(f"function {rname} does not run as its own service account")
        for dynamic in _blocks(body, "dynamic"):
            for trigger in _blocks(dynamic.get("event_trigger", {}), "content"):
                if trigger.get("service_account_email") != per_function:
                    problems.append(f"a trigger of function {rname} uses another service account")
    for rname, body in cfg["resource"].get("google_eventarc_trigger", {}).items():
        match = re.search(
            r'google_service_account\.\w+\["(\w+)"\]', str(body.get("service_account"))
        )
        target = str(
            _blocks(_blocks(body, "destination")[0], "cloud_run_service")[0].get("service")
        )
        if not match or f'["{match.group(1)}"]' not in target:
            problems.append(f"eventarc trigger {rname} does not use its function's service account")
    return problems


def check_archive(cfg: Config) -> list[str]:
    """The source archive holds main.py, requirements.txt and dicomflow/ only."""
    problems = []
    archives = cfg["data"].get("archive_file", {})
    if not archives:
        return ["no archive_file data source"]
    for rname, body in archives.items():
        if "source_dir" in body:
            problems.append(f"archive {rname} uses source_dir; list the shipped files instead")
        sources = list(_blocks(body, "source"))
        for dynamic in _blocks(body, "dynamic"):
            sources += _blocks(dynamic.get("source", {}), "content")
        names = {str(s.get("filename")).split("/")[0] for s in sources}
        contents = " ".join(str(s.get("content")) for s in sources)
        for name in sorted(names - SHIPPED):
            problems.append(f"archive {rname} ships {name}")
        for name in sorted(SHIPPED - names):
            problems.append(f"archive {rname} lacks {name}")
        roots = {str(v) for k, v in cfg["locals"].items() if k in ("repo_root", "package_root")}
        for part in NEVER_SHIPPED:
            if re.search(rf"/{part}\b", contents + " ".join(roots)):
                problems.append(f"archive {rname} reads from {part}/")
    return problems


def check_variables(cfg: Config) -> list[str]:
    """Every variable has a type and a non-empty description."""
    problems = []
    for name, body in cfg["variable"].items():
        if not body.get("type"):
            problems.append(f"variable {name} has no type")
        if not str(body.get("description", "")).strip():
            problems.append(f"variable {name} has no description")
    return problems


def _project_roles(cfg: Config) -> list[str]:
    roles = []
    for body in cfg["resource"].get("google_project_iam_member", {}).values():
        roles.append(str(body.get("role")))
    for body in cfg["resource"].get("google_project_iam_binding", {}).values():
        roles.append(str(body.get("role")))
    for spec in cfg["locals"].get("functions", {}).values():
        roles += [str(r) for r in spec.get("project_roles", [])]
    return roles


def check_roles(cfg: Config) -> list[str]:
    """No primitive roles anywhere; no storage roles or permissions at project level."""
    problems = []
    everything = [cfg["resource"], cfg["data"], cfg["locals"]]
    for text in _strings(everything):
        for role in PRIMITIVE_ROLES:
            if re.search(rf"{re.escape(role)}\b", text):
                problems.append(f"primitive role {role} is used")
    if cfg["resource"].get("google_project_iam_policy"):
        problems.append("google_project_iam_policy replaces the whole project policy")
    for role in _project_roles(cfg):
        if role.startswith("roles/storage.") or role in PRIMITIVE_ROLES:
            problems.append(f"project-level grant of {role}")
    # A custom role with storage permissions is granted on one bucket only, never on the project.
    project_grants = str(cfg["resource"].get("google_project_iam_member", {}))
    bucket_grants = str(cfg["resource"].get("google_storage_bucket_iam_member", {}))
    for rname, body in cfg["resource"].get("google_project_iam_custom_role", {}).items():
        permissions = [p for p in _strings(body.get("permissions")) if "${" not in p]
        ref = f"google_project_iam_custom_role.{rname}"
        on_bucket_only = ref in bucket_grants and ref not in project_grants
        if any(p.startswith("storage.") for p in permissions) and not on_bucket_only:
            problems.append(f"custom role {rname} carries storage permissions")
    # Only export may start an export (dicomStores.export writes wherever it is told).
    for fn, spec in cfg["locals"].get("functions", {}).items():
        held = spec.get("store_permissions", []) + spec.get("drill_store_permissions", [])
        if fn != "export" and "healthcare.dicomStores.export" in held:
            problems.append(f"{fn} may start exports; only export may")
    agent = (
        cfg["resource"]
        .get("google_storage_bucket_iam_member", {})
        .get("healthcare_agent_backups", {})
    )
    conditions = _blocks(agent, "condition") if agent else []
    expression = str(conditions[0].get("expression", "")) if conditions else ""
    if agent and "/objects/${var.backup_prefix}/" not in expression:
        problems.append("the Healthcare agent's backups grant is not limited to the backup prefix")
    for fn, spec in cfg["locals"].get("functions", {}).items():
        for perm in spec.get("store_permissions", []) + spec.get("dataset_permissions", []):
            if not str(perm).startswith("healthcare."):
                problems.append(f"{fn}: Healthcare custom role holds non-Healthcare {perm}")
        # Backup data is never deletable by a function; manifests go through a conditional grant.
        for role in spec.get("bucket_roles", {}).get("backups", []):
            if role not in BACKUP_READ_ONLY:
                problems.append(f"{fn} holds {role} on all of the backups bucket")
    for rname, body in cfg["resource"].get("google_storage_bucket_iam_member", {}).items():
        if "manifest_grants" in str(body.get("for_each")):
            conditions = _blocks(body, "condition")
            expression = str(conditions[0].get("expression", "")) if conditions else ""
            on_backups = "google_storage_bucket.backups" in str(body.get("bucket"))
            if "_MANIFEST.json" not in expression or not on_backups:
                problems.append(f"{rname} is not limited to the backup manifests")
    return problems


def check_buckets(cfg: Config) -> list[str]:
    """Safe defaults on every bucket; backups survive destroy; staging loses no live object but
    expired claims (staging and quarantine copies, late claims)."""
    problems = []
    buckets = cfg["resource"].get("google_storage_bucket", {})
    for name in ("landing", "staging", "backups"):
        if name not in buckets:
            problems.append(f"no {name} bucket")
    for name, body in buckets.items():
        if body.get("uniform_bucket_level_access") is not True:
            problems.append(f"bucket {name} lacks uniform bucket-level access")
        if body.get("public_access_prevention") != "enforced":
            problems.append(f"bucket {name} does not enforce public access prevention")
        if name != "backups" and not any(
            v.get("enabled") is True for v in _blocks(body, "versioning")
        ):
            problems.append(f"bucket {name} is not versioned")
        encryption = [d.get("encryption", {}) for d in _blocks(body, "dynamic")]
        if not any("local.kms_keys" in str(e.get("for_each")) for e in encryption):
            problems.append(f"bucket {name} does not take the CMEK key")
    backups = buckets.get("backups", {})
    # Retention policy and versioning exclude each other; one of the two is always on.
    versioning = [str(v.get("enabled")) for v in _blocks(backups, "versioning")]
    if versioning != ["${!local.backup_retention_on}"]:
        problems.append("backups versioning must be on exactly when the retention policy is off")
    policy: list[Any] = [d.get("retention_policy") for d in _blocks(backups, "dynamic")]
    policy = [p for p in policy if p]
    content = _blocks(policy[0], "content")[0] if policy else {}
    if not policy or "var.backup_retention_lock" not in str(content.get("is_locked")):
        problems.append("backups bucket has no retention policy with var.backup_retention_lock")
    elif "86400" not in str(content.get("retention_period")):
        problems.append("the backups retention policy is not in days")
    if "var.backup_location" not in str(backups.get("location")):
        problems.append("the backups bucket's location is not var.backup_location")
    if backups.get("force_destroy") is not False:
        problems.append("backups bucket must set force_destroy = false")
    if not any(lc.get("prevent_destroy") is True for lc in _blocks(backups, "lifecycle")):
        problems.append("backups bucket must set prevent_destroy")
    retention = [
        r
        for r in _blocks(backups, "lifecycle_rule")
        if _blocks(r, "action")[0].get("type") == "Delete"
        and "var.backup_retention_days" in str(_blocks(r, "condition")[0].get("age"))
    ]
    if not retention:
        problems.append("backups bucket has no retention rule driven by var.backup_retention_days")
    # Staging copies, quarantine copies, failure records and late claims are the claims of their
    # files: a rule may expire them, only by their own prefixes and only after the retention days,
    # which a precondition keeps longer than the maximum event age.
    claims = ["batches/", "quarantine/", "failed/", "state/late/"]
    staging = buckets.get("staging", {})
    if not any(
        "var.staging_copy_retention_days * 86400 > local.max_event_age_seconds"
        in str(pre.get("condition"))
        for lc in _blocks(staging, "lifecycle")
        for pre in _blocks(lc, "precondition")
    ):
        problems.append("no precondition keeps staging claims longer than the maximum event age")
    age = str(cfg["locals"].get("max_event_age_seconds"))
    default = DEFAULTS.get("DICOMFLOW_MAX_EVENT_AGE_SECONDS")
    if f'"DICOMFLOW_MAX_EVENT_AGE_SECONDS", "{default}"' not in age:
        problems.append(f"local.max_event_age_seconds does not default to SETTINGS_DOC's {default}")
    # Restore copies (restores/) hold PHI and a restore without --wait leaves them: they expire
    # after the same days. Tombstones (tombstones/) must outlive every backup: no rule reaches them.
    expiring: set[str] = set()
    for name in ("landing", "staging"):
        for rule in _blocks(buckets.get(name, {}), "lifecycle_rule"):
            action = _blocks(rule, "action")[0].get("type")
            condition = _blocks(rule, "condition")[0]
            prefixes = condition.get("matches_prefix")
            aged = "var.staging_copy_retention_days" in str(condition.get("age"))
            allowed = name == "staging" and aged and prefixes in (claims, ["restores/"])
            live = condition.get("with_state") != "ARCHIVED"
            if action == "Delete" and live:
                if not allowed:
                    problems.append(f"a lifecycle rule of {name} can delete live objects")
                if name == "staging":
                    expiring.update(prefixes if isinstance(prefixes, list) else [""])
            if action not in ("Delete", "AbortIncompleteMultipartUpload"):
                problems.append(f"a lifecycle rule of {name} does {action}")
    if "restores/" not in expiring:
        problems.append("no lifecycle rule expires the restore copies (restores/)")
    if any(TOMBSTONES_PREFIX.startswith(prefix) for prefix in expiring):
        problems.append("a lifecycle rule of staging expires tombstones/")
    return problems


def check_security(cfg: Config) -> list[str]:
    """CMEK on topics and the dataset, Data Access audit logs, and the deployment key's secret
    readable by the three function service accounts only."""
    problems = []
    resources = cfg["resource"]
    for name, body in resources.get("google_pubsub_topic", {}).items():
        if body.get("kms_key_name") != "${var.kms_key_name}":
            problems.append(f"topic {name} does not take the CMEK key")
    for name, body in resources.get("google_healthcare_dataset", {}).items():
        specs = [d.get("encryption_spec") for d in _blocks(body, "dynamic")]
        if not any(s and "local.kms_keys" in str(s.get("for_each")) for s in specs):
            problems.append(f"dataset {name} does not take the CMEK key")
    audits = resources.get("google_project_iam_audit_config", {})
    services = " ".join(str(a.get("for_each")) for a in audits.values())
    for service in ("healthcare.googleapis.com", "storage.googleapis.com"):
        if service not in services:
            problems.append(f"no Data Access audit logs for {service}")
    for name, body in audits.items():
        if "var.data_access_audit_logs" not in str(body.get("for_each")):
            problems.append(f"audit config {name} ignores var.data_access_audit_logs")
        kinds = {c.get("log_type") for c in _blocks(body, "audit_log_config")}
        if not {"DATA_READ", "DATA_WRITE"} <= kinds:
            problems.append(f"audit config {name} lacks DATA_READ or DATA_WRITE")
    if "deployment_key" not in resources.get("google_secret_manager_secret", {}):
        problems.append("no deployment key secret")
    accessors = []
    for kind in ("google_secret_manager_secret_iam_member", "google_project_iam_member"):
        for name, body in resources.get(kind, {}).items():
            if "secretmanager" in str(body.get("role")):
                accessors.append((kind, name, body))
    for kind, name, body in accessors:
        if (
            kind != "google_secret_manager_secret_iam_member"
            or body.get("secret_id") != "${google_secret_manager_secret.deployment_key.id}"
            or body.get("for_each") != "${local.functions}"
            or body.get("member") != "${google_service_account.fn[each.key].member}"
            or body.get("role") != "roles/secretmanager.secretAccessor"
        ):
            problems.append(f"{kind}.{name} grants secret access beyond the function accounts")
    if not accessors:
        problems.append("the functions cannot read the deployment key")
    return problems


def check_wiring(cfg: Config) -> list[str]:
    """Landing deletes only when turned on, only on landing; the scratch drill store is touched
    only by the functions that run drill steps (export starts a drill, report settles it)."""
    problems = []
    resources = cfg["resource"]
    grant = resources.get("google_storage_bucket_iam_member", {}).get("ingest_landing_delete", {})
    role = resources.get("google_project_iam_custom_role", {}).get("landing_delete", {})
    for what, body in (("grant", grant), ("custom role", role)):
        if "var.landing_delete_after_days > 0" not in str(body.get("count")):
            problems.append(f"the landing delete {what} is not conditional on the setting")
    if grant.get("bucket") != "${google_storage_bucket.landing.name}":
        problems.append("the landing delete grant is not on the landing bucket")
    if '["ingest"]' not in str(grant.get("member")):
        problems.append("the landing delete grant is not ingest's")
    if role.get("permissions") != ["storage.objects.delete"]:
        problems.append("the landing delete role holds more than storage.objects.delete")
    drill = resources.get("google_healthcare_dicom_store", {}).get("drill", {})
    if "local.drill_on" not in str(drill.get("count")):
        problems.append("the drill store is not conditional on the drill setting")
    if str(cfg["locals"].get("drill_store_id")) != "${var.dicom_store_id}-drill":
        problems.append("the drill store is not named <store>-drill")
    for fn, spec in cfg["locals"].get("functions", {}).items():
        if fn not in DRILL_RUNNERS and spec.get("drill_store_permissions"):
            problems.append(f"{fn} holds permissions on the drill store; it runs no drill step")
    member = resources.get("google_healthcare_dicom_store_iam_member", {}).get("drill", {})
    if member.get("dicom_store_id") != "${local.drill_iam_id}":
        problems.append("the drill grants are not on the drill store")
    return problems


def _alert_log_line() -> tuple[str, set[str]]:
    """Message and field names of the log line dicomflow/alerts.py writes per published alert."""
    tree = ast.parse((ROOT / "dicomflow" / "alerts.py").read_text())
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "info"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and "published" in str(node.args[0].value)
        ):
            fields = {kw.arg for kw in ast.walk(node) if isinstance(kw, ast.keyword) and kw.arg}
            return str(node.args[0].value), fields
    return "", set()


def check_alerting(cfg: Config, message: str, fields: set[str]) -> list[str]:
    """The alert metric reads the line the code writes; policies per severity link the runbook;
    channels come from variables; the push subscription authenticates and dead-letters."""
    problems = []
    resources = cfg["resource"]
    if "var.runbook_url" not in str(cfg["locals"].get("runbook")):
        problems.append("local.runbook does not come from var.runbook_url")
    metric = resources.get("google_logging_metric", {}).get("alerts", {})
    if not message or f'jsonPayload.message=\\"{message}\\"' not in str(metric.get("filter")):
        problems.append(f"the alert metric does not match the log line {message!r}")
    extractors = metric.get("label_extractors", {})
    if extractors.get("kind") != "EXTRACT(jsonPayload.kind)" or "kind" not in fields:
        problems.append("the alert metric's kind label does not read the line's kind field")
    if extractors.get("severity") != "EXTRACT(severity)" or "severity" not in fields:
        problems.append("the alert metric's severity label does not read the line's severity")
    if "var.monitoring_alerts" not in str(metric.get("count")):
        problems.append("the alert metric ignores var.monitoring_alerts")
    policies = cfg["locals"].get("alert_policies", {})
    if {p.get("severity") for p in policies.values()} != {"ERROR", "WARNING"}:
        problems.append("there is not one alert policy for ERROR and one for WARNING")
    for name, body in resources.get("google_monitoring_alert_policy", {}).items():
        docs = " ".join(str(d.get("content")) for d in _blocks(body, "documentation"))
        if "${local.runbook}#$${metric.label.kind}" not in docs:
            problems.append(f"alert policy {name} does not link the runbook section of the kind")
        if body.get("notification_channels") != "${local.notification_channels}":
            problems.append(f"alert policy {name} does not notify the channels")
    channels = resources.get("google_monitoring_notification_channel", {})
    if "var.alert_emails" not in str(channels.get("email", {}).get("for_each")):
        problems.append("email channels do not come from var.alert_emails")
    if "var.alert_webhook_url" not in str(channels.get("webhook", {})):
        problems.append("the webhook channel does not come from var.alert_webhook_url")
    push = resources.get("google_pubsub_subscription", {}).get("alerts_push", {})
    config = _blocks(push, "push_config")[0] if push.get("push_config") else {}
    if "var.alert_push_endpoint" not in str(push.get("count")) or not config.get("oidc_token"):
        problems.append("the push subscription is not optional or lacks OIDC")
    if not push.get("dead_letter_policy") or not push.get("retry_policy"):
        problems.append("the push subscription lacks a dead-letter topic or a retry policy")
    return problems


def check_variables_used(cfg: Config, readme: str) -> list[str]:
    """Every variable is read somewhere, and infra/README.md names it."""
    problems = []
    used = " ".join(
        _strings([cfg["resource"], cfg["data"], cfg["locals"], cfg["output"], cfg["variable"]])
    )
    for name in cfg["variable"]:
        if f"var.{name}" not in used.replace(f'variable "{name}"', ""):
            problems.append(f"variable {name} is never read")
        if f"`{name}`" not in readme:
            problems.append(f"infra/README.md does not mention variable {name}")
    return problems


def check_skips(cfg: Config) -> list[str]:
    """Every checkov skip names a check and gives a reason."""
    problems = []
    for comment in cfg["comments"]:
        if "checkov:skip" in comment and not re.search(
            r"checkov:skip=CKV2?_[A-Z]+_\d+:\s*\S.{10,}", comment
        ):
            problems.append(f"checkov skip without a reason: {comment!r}")
    return problems


def check_readme(cfg: Config, readme: str) -> list[str]:
    """infra/README.md has a row per function naming every role and permission it holds."""
    problems = []
    rows = {
        m.group(1): m.group(0)
        for m in re.finditer(r"^\|\s*`?(\w+)`?\s*\|.*$", readme, flags=re.MULTILINE)
    }
    for fn, spec in cfg["locals"].get("functions", {}).items():
        row = rows.get(fn)
        if row is None:
            problems.append(f"infra/README.md has no table row for {fn}")
            continue
        grants = list(_strings(spec.get("bucket_roles", {})))
        grants += list(_strings(spec.get("manifest_roles", [])))
        grants += list(_strings(spec.get("topic_roles", {})))
        grants += [str(p) for p in spec.get("store_permissions", [])]
        grants += [str(p) for p in spec.get("drill_store_permissions", [])]
        grants += [str(p) for p in spec.get("dataset_permissions", [])]
        grants += [str(r) for r in spec.get("project_roles", [])]
        for grant in grants:
            if grant not in row:
                problems.append(f"infra/README.md row for {fn} does not mention {grant}")
    return problems


def main_entry_points() -> set[str]:
    tree = ast.parse((ROOT / "main.py").read_text())
    return {
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef)
        and any("functions_framework" in ast.unparse(d) for d in node.decorator_list)
    }


def check_shipped_imports(files: dict[str, str]) -> list[str]:
    """Shipped modules import nothing that the archive leaves out."""
    problems = []
    for path, text in files.items():
        for node in ast.walk(ast.parse(text)):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                if name.split(".")[0] in NEVER_SHIPPED:
                    problems.append(f"{path} imports {name}, which is not deployed")
    return problems


# --- the real configuration ------------------------------------------------------------------


def test_env_matches_settings_doc(config: Config) -> None:
    assert check_env(config) == []


def test_each_function_has_its_own_service_account(config: Config) -> None:
    assert check_functions(config, main_entry_points()) == []


def test_archive_ships_only_the_runtime(config: Config) -> None:
    assert check_archive(config) == []


def test_shipped_code_imports_only_shipped_code() -> None:
    files = {"main.py": (ROOT / "main.py").read_text()}
    for path in sorted((ROOT / "dicomflow").rglob("*.py")):
        files[str(path.relative_to(ROOT))] = path.read_text()
    assert check_shipped_imports(files) == []


def test_variables_are_typed_and_described(config: Config) -> None:
    assert config["variable"]
    assert check_variables(config) == []


def test_no_primitive_or_project_level_storage_roles(config: Config) -> None:
    assert check_roles(config) == []


def test_buckets_are_safe(config: Config) -> None:
    assert check_buckets(config) == []


def test_security_settings(config: Config) -> None:
    assert check_security(config) == []


def test_wiring_of_landing_deletes_and_the_drill_store(config: Config) -> None:
    assert check_wiring(config) == []


def test_alerting_reads_the_published_alert_log_line(config: Config) -> None:
    message, fields = _alert_log_line()
    assert message
    assert check_alerting(config, message, fields) == []


def test_every_variable_is_read_and_documented(config: Config) -> None:
    assert check_variables_used(config, (INFRA / "README.md").read_text()) == []


def test_checkov_skips_have_reasons(config: Config) -> None:
    assert any("checkov:skip" in c for c in config["comments"])
    assert check_skips(config) == []


def test_readme_table_lists_every_grant(config: Config) -> None:
    assert check_readme(config, (INFRA / "README.md").read_text()) == []


def test_example_tfvars_only_sets_declared_variables(config: Config) -> None:
    example = _clean(hcl2.loads((INFRA / "terraform.tfvars.example").read_text()))
    assert set(example) <= set(config["variable"])
    assert set(example.get("settings", {})) <= KNOWN - REQUIRED - ENDPOINTS


# --- synthetic bad configurations: every check can fail ---------------------------------------

GOOD_FUNCTION = """
locals {
  functions = { ingest = {}, report = {}, export = {} }
  function_env_fixed = {
    DICOMFLOW_DICOM_STORE    = "s"
    DICOMFLOW_LANDING_BUCKET = "l"
    DICOMFLOW_STAGING_BUCKET = "s"
    DICOMFLOW_BACKUP_BUCKET  = "b"
    DICOMFLOW_ALERTS_TOPIC   = "t"
  }
  function_env = merge(var.settings, local.function_env_fixed)
}
resource "google_service_account" "fn" {
  for_each   = local.functions
  account_id = each.key
}
resource "google_cloudfunctions2_function" "fn" {
  for_each = local.functions
  build_config {
    entry_point = each.key
  }
  service_config {
    service_account_email = google_service_account.fn[each.key].email
    environment_variables = local.function_env
  }
}
"""


def _with(extra: str, base: str = GOOD_FUNCTION) -> Config:
    return parse([base, extra])


def test_check_env_flags_unknown_missing_and_endpoint_names() -> None:
    bad = GOOD_FUNCTION.replace(
        'DICOMFLOW_ALERTS_TOPIC   = "t"',
        'DICOMFLOW_ALERT_TOPIC = "t"\n STORAGE_EMULATOR_HOST = "x"',
    )
    problems = check_env(parse([bad]))
    assert any("DICOMFLOW_ALERT_TOPIC is set" in p for p in problems)
    assert any("required setting DICOMFLOW_ALERTS_TOPIC" in p for p in problems)
    assert any("STORAGE_EMULATOR_HOST is for localcloud only" in p for p in problems)


def test_check_env_flags_a_function_without_the_env() -> None:
    bad = GOOD_FUNCTION.replace("environment_variables = local.function_env", "")
    assert any("does not get local.function_env" in p for p in check_env(parse([bad])))


def test_check_env_flags_a_bad_settings_allow_list() -> None:
    cfg = _with(
        """
variable "settings" {
  type        = map(string)
  description = "d"
  validation {
    condition = alltrue([for n in keys(var.settings) : contains([
      "DICOMFLOW_NO_SUCH",
      "DICOMFLOW_DICOM_STORE",
    ], n)])
    error_message = "e"
  }
}
"""
    )
    problems = check_env(cfg)
    assert any("allows DICOMFLOW_NO_SUCH" in p for p in problems)
    assert any("allows DICOMFLOW_DICOM_STORE" in p for p in problems)
    assert any("DICOMFLOW_BATCH_MAX_FILES can be neither" in p for p in problems)


def test_check_functions_flags_a_shared_service_account() -> None:
    bad = GOOD_FUNCTION.replace(
        "google_service_account.fn[each.key].email", "google_service_account.shared.email"
    )
    problems = check_functions(parse([bad]), FUNCTIONS)
    assert any("does not run as its own service account" in p for p in problems)
    assert any("local.functions" in p for p in check_functions(parse([bad]), {"ingest"}))


def test_check_archive_flags_source_dir_and_test_files() -> None:
    cfg = parse(
        [
            """
data "archive_file" "src" {
  type        = "zip"
  source_dir  = "${path.module}/.."
  output_path = "x.zip"
  source {
    filename = "tests/conftest.py"
    content  = file("${path.module}/../tests/conftest.py")
  }
}
"""
        ]
    )
    problems = check_archive(cfg)
    assert any("source_dir" in p for p in problems)
    assert any("ships tests" in p for p in problems)
    assert any("reads from tests/" in p for p in problems)
    assert any("lacks main.py" in p for p in problems)


def test_check_shipped_imports_flags_localcloud() -> None:
    problems = check_shipped_imports({"dicomflow/x.py": "from localcloud.storage import s\n"})
    assert problems == ["dicomflow/x.py imports localcloud.storage, which is not deployed"]


def test_check_variables_flags_untyped_and_undescribed() -> None:
    cfg = parse(['variable "a" {\n  description = "d"\n}\nvariable "b" {\n  type = string\n}\n'])
    assert check_variables(cfg) == ["variable a has no type", "variable b has no description"]


def test_check_roles_flags_primitive_and_project_storage_roles() -> None:
    cfg = parse(
        [
            """
resource "google_project_iam_member" "a" {
  project = "p"
  role    = "roles/storage.objectAdmin"
  member  = "serviceAccount:x"
}
resource "google_storage_bucket_iam_member" "b" {
  bucket = "b"
  role   = "roles/editor"
  member = "serviceAccount:x"
}
resource "google_project_iam_custom_role" "c" {
  role_id     = "c"
  title       = "c"
  permissions = ["storage.objects.delete"]
}
resource "google_storage_bucket_iam_member" "m" {
  for_each = local.manifest_grants
  bucket   = google_storage_bucket.backups.name
  role     = each.value.role
  member   = "serviceAccount:x"
}
locals {
  functions = {
    report = { bucket_roles = { backups = ["roles/storage.objectUser"] } }
  }
}
"""
        ]
    )
    problems = check_roles(cfg)
    assert "report holds roles/storage.objectUser on all of the backups bucket" in problems
    assert "m is not limited to the backup manifests" in problems
    assert "project-level grant of roles/storage.objectAdmin" in problems
    assert "primitive role roles/editor is used" in problems
    assert "custom role c carries storage permissions" in problems


def test_check_buckets_flags_unsafe_buckets() -> None:
    cfg = parse(
        [
            """
resource "google_storage_bucket" "landing" {
  name = "l"
}
resource "google_storage_bucket" "staging" {
  name                        = "s"
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  versioning {
    enabled = true
  }
  lifecycle_rule {
    condition {
      age = 7
    }
    action {
      type = "Delete"
    }
  }
}
resource "google_storage_bucket" "backups" {
  name          = "b"
  force_destroy = true
}
"""
        ]
    )
    problems = check_buckets(cfg)
    assert "bucket landing lacks uniform bucket-level access" in problems
    assert "bucket landing does not enforce public access prevention" in problems
    assert "bucket landing is not versioned" in problems
    assert "a lifecycle rule of staging can delete live objects" in problems
    assert "backups bucket must set force_destroy = false" in problems
    assert "backups bucket must set prevent_destroy" in problems
    assert any("retention rule" in p for p in problems)


def test_check_skips_flags_a_skip_without_reason() -> None:
    cfg = parse(
        ['resource "google_pubsub_topic" "t" {\n  #checkov:skip=CKV_GCP_83\n  name = "t"\n}\n']
    )
    assert len(check_skips(cfg)) == 1


def test_check_readme_flags_a_missing_grant() -> None:
    cfg = parse(
        [
            """
locals {
  functions = {
    ingest = {
      bucket_roles      = { landing = ["roles/storage.objectViewer"] }
      store_permissions = ["healthcare.dicomStores.import"]
    }
  }
}
"""
        ]
    )
    readme = "| ingest | landing: `roles/storage.objectViewer` |\n"
    assert check_readme(cfg, readme) == [
        "infra/README.md row for ingest does not mention healthcare.dicomStores.import"
    ]
    assert check_readme(cfg, "") == ["infra/README.md has no table row for ingest"]


def test_check_roles_flags_exports_outside_export_and_an_unlimited_agent() -> None:
    cfg = parse(
        [
            """
locals {
  functions = {
    report = { store_permissions = ["healthcare.dicomStores.export"] }
    export = { store_permissions = ["healthcare.dicomStores.export"] }
  }
}
resource "google_storage_bucket_iam_member" "healthcare_agent_backups" {
  bucket = google_storage_bucket.backups.name
  role   = "roles/storage.objectAdmin"
  member = local.healthcare_agent
}
"""
        ]
    )
    problems = check_roles(cfg)
    assert "report may start exports; only export may" in problems
    assert "export may start exports; only export may" not in problems
    assert "the Healthcare agent's backups grant is not limited to the backup prefix" in problems


def test_check_buckets_flags_versioned_retained_backups_and_short_claims() -> None:
    cfg = parse(
        [
            """
locals {
  max_event_age_seconds = 3600
}
resource "google_storage_bucket" "staging" {
  lifecycle_rule {
    condition {
      age            = var.staging_copy_retention_days
      matches_prefix = ["batches/", "quarantine/", "state/late/"]
    }
    action {
      type = "Delete"
    }
  }
}
resource "google_storage_bucket" "backups" {
  location      = var.region
  force_destroy = false
  versioning {
    enabled = true
  }
  dynamic "retention_policy" {
    for_each = [1]
    content {
      retention_period = 30
    }
  }
}
"""
        ]
    )
    problems = check_buckets(cfg)
    assert "backups versioning must be on exactly when the retention policy is off" in problems
    assert "backups bucket has no retention policy with var.backup_retention_lock" in problems
    assert "the backups bucket's location is not var.backup_location" in problems
    assert "bucket staging does not take the CMEK key" in problems
    assert "a lifecycle rule of staging can delete live objects" in problems  # failed/ missing
    assert "no lifecycle rule expires the restore copies (restores/)" in problems
    assert "no precondition keeps staging claims longer than the maximum event age" in problems
    assert any("does not default to SETTINGS_DOC's 90000" in p for p in problems)


def test_check_security_flags_plain_topics_no_audit_logs_and_wide_secret_access() -> None:
    cfg = parse(
        [
            """
resource "google_pubsub_topic" "tick" {
  name = "t"
}
resource "google_healthcare_dataset" "this" {
  name = "d"
}
resource "google_project_iam_audit_config" "data_access" {
  for_each = toset(["storage.googleapis.com"])
  audit_log_config {
    log_type = "ADMIN_READ"
  }
}
resource "google_project_iam_member" "reader" {
  project = "p"
  role    = "roles/secretmanager.secretAccessor"
  member  = "group:everyone@example.org"
}
"""
        ]
    )
    problems = check_security(cfg)
    assert "topic tick does not take the CMEK key" in problems
    assert "dataset this does not take the CMEK key" in problems
    assert "no Data Access audit logs for healthcare.googleapis.com" in problems
    assert "audit config data_access ignores var.data_access_audit_logs" in problems
    assert "audit config data_access lacks DATA_READ or DATA_WRITE" in problems
    assert "no deployment key secret" in problems
    assert (
        "google_project_iam_member.reader grants secret access beyond the function accounts"
        in problems
    )


def test_check_env_flags_a_wired_setting_from_the_wrong_place() -> None:
    bad = GOOD_FUNCTION.replace(
        'DICOMFLOW_ALERTS_TOPIC   = "t"',
        'DICOMFLOW_ALERTS_TOPIC = "t"\n DICOMFLOW_SWEEP_HOURS = "24"\n'
        ' DICOMFLOW_KEY_SECRET = "projects/p/secrets/s/versions/1"',
    )
    problems = check_env(parse([bad]))
    assert "DICOMFLOW_SWEEP_HOURS is not set from var.sweep_hours" in problems
    assert "DICOMFLOW_KEY_SECRET is not the deployment key secret's latest version" in problems


def test_check_wiring_flags_unconditional_wide_landing_deletes_and_drill_writers() -> None:
    cfg = parse(
        [
            """
locals {
  drill_store_id = "scratch"
  functions = {
    ingest = { drill_store_permissions = ["healthcare.dicomStores.import"] }
  }
}
resource "google_project_iam_custom_role" "landing_delete" {
  permissions = ["storage.objects.delete", "storage.objects.create"]
}
resource "google_storage_bucket_iam_member" "ingest_landing_delete" {
  bucket = google_storage_bucket.staging.name
  role   = google_project_iam_custom_role.landing_delete.name
  member = google_service_account.fn["report"].member
}
resource "google_healthcare_dicom_store" "drill" {
  name = "scratch"
}
"""
        ]
    )
    problems = check_wiring(cfg)
    assert "the landing delete grant is not conditional on the setting" in problems
    assert "the landing delete grant is not on the landing bucket" in problems
    assert "the landing delete grant is not ingest's" in problems
    assert "the landing delete role holds more than storage.objects.delete" in problems
    assert "the drill store is not conditional on the drill setting" in problems
    assert "the drill store is not named <store>-drill" in problems
    assert "ingest holds permissions on the drill store; it runs no drill step" in problems
    assert "the drill grants are not on the drill store" in problems


def test_check_alerting_flags_a_metric_on_another_line_and_bare_policies() -> None:
    cfg = parse(
        [
            """
locals {
  runbook = "docs/alerts.md"
  alert_policies = { all = { severity = "ERROR" } }
}
resource "google_logging_metric" "alerts" {
  filter = "jsonPayload.message=\\"alert sent\\""
  label_extractors = {
    kind = "EXTRACT(jsonPayload.type)"
  }
}
resource "google_monitoring_alert_policy" "alerts" {
  documentation {
    content = "see the docs"
  }
}
resource "google_pubsub_subscription" "alerts_push" {
  push_config {
    push_endpoint = "https://example.org"
  }
}
"""
        ]
    )
    problems = check_alerting(cfg, "alert published", {"kind", "severity"})
    assert "local.runbook does not come from var.runbook_url" in problems
    assert "the alert metric does not match the log line 'alert published'" in problems
    assert "the alert metric's kind label does not read the line's kind field" in problems
    assert "the alert metric's severity label does not read the line's severity" in problems
    assert "the alert metric ignores var.monitoring_alerts" in problems
    assert "there is not one alert policy for ERROR and one for WARNING" in problems
    assert "alert policy alerts does not link the runbook section of the kind" in problems
    assert "alert policy alerts does not notify the channels" in problems
    assert "email channels do not come from var.alert_emails" in problems
    assert "the push subscription is not optional or lacks OIDC" in problems
    assert "the push subscription lacks a dead-letter topic or a retry policy" in problems
    # The real log line carries both fields; a line without severity fails the label check.
    assert any("severity" in p for p in check_alerting(parse([""]), "alert published", {"kind"}))


def test_check_variables_used_flags_unread_and_undocumented_variables() -> None:
    cfg = parse(['variable "a" {\n  type = string\n  description = "d"\n}\n'])
    assert check_variables_used(cfg, "") == [
        "variable a is never read",
        "infra/README.md does not mention variable a",
    ]
    assert check_variables_used(cfg, "| `a` |") == ["variable a is never read"]


def test_check_buckets_flags_a_staging_rule_that_reaches_tombstones() -> None:
    cfg = parse(
        [
            """
resource "google_storage_bucket" "staging" {
  lifecycle_rule {
    condition {
      age        = var.staging_copy_retention_days
      with_state = "LIVE"
    }
    action {
      type = "Delete"
    }
  }
}
"""
        ]
    )
    problems = check_buckets(cfg)
    assert "a lifecycle rule of staging can delete live objects" in problems
    assert "a lifecycle rule of staging expires tombstones/" in problems
    assert "no lifecycle rule expires the restore copies (restores/)" in problems
