"""IAM policies of datasets and DICOM stores: getIamPolicy, setIamPolicy, testIamPermissions.

There is no authentication locally, so policies are kept and returned but never
enforced: ``testIamPermissions`` grants whatever the caller asks about. The
shapes are the v1 discovery document's ``Policy``, ``SetIamPolicyRequest`` and
``TestIamPermissionsRequest``; the etag is opaque bytes in base64 that change on
every set, and a set that carries a stale etag fails with ABORTED, as IAM does.
"""

from __future__ import annotations

import base64
import re
import secrets
from typing import Any

from localcloud.healthcare.repository import EMPTY_POLICY_ETAG, Repository
from localcloud.healthcare.status import invalid

_POLICY_FIELDS = {"version", "bindings", "auditConfigs", "etag"}
_DEFAULT_MASK = ("bindings", "etag")
_MEMBER = re.compile(
    r"^(allUsers|allAuthenticatedUsers|(user|serviceAccount|group|domain|deleted:user|"
    r"deleted:serviceAccount|deleted:group):.+|principal(Set)?://.+)$"
)


def get_policy(
    repository: Repository, resource: str, query: dict[str, list[str]]
) -> dict[str, Any]:
    """The resource's policy; one never set is empty but for its etag."""
    requested = query.get("options.requestedPolicyVersion", ["0"])[-1] or "0"
    if requested not in ("0", "1", "3"):
        raise invalid(f"options.requestedPolicyVersion must be 0, 1 or 3, not {requested!r}")
    policy = repository.get_policy(resource)
    return dict(policy) if policy else {"etag": EMPTY_POLICY_ETAG}


def set_policy(repository: Repository, resource: str, body: dict[str, Any]) -> dict[str, Any]:
    """Apply a SetIamPolicyRequest; returns the stored policy with its new etag.

    Raises:
        ApiError: INVALID_ARGUMENT for a malformed policy, ABORTED for a stale etag.
    """
    policy = body.get("policy")
    if not isinstance(policy, dict):
        raise invalid("policy is required")
    unknown = set(policy) - _POLICY_FIELDS
    if unknown:
        raise invalid(f"unknown Policy fields: {', '.join(sorted(unknown))}")
    mask_text = str(body.get("updateMask") or "")
    mask = [m.strip() for m in mask_text.split(",") if m.strip()] or list(_DEFAULT_MASK)
    for path in mask:
        if path not in _POLICY_FIELDS:
            raise invalid(f"updateMask path {path!r} is not a Policy field")
    bindings = policy.get("bindings", [])
    _check_bindings(bindings)
    version = policy.get("version", 1)
    if version not in (0, 1, 3):
        raise invalid(f"policy version must be 0, 1 or 3, not {version!r}")
    if any(isinstance(b, dict) and b.get("condition") for b in bindings) and version != 3:
        raise invalid("a policy with conditional bindings must have version 3")
    current = repository.get_policy(resource) or {}
    updated = {k: v for k, v in current.items() if k != "etag"}
    for path in mask:
        if path == "etag":
            continue
        if path in policy and policy[path] not in (None, []):
            updated[path] = policy[path]
        else:
            updated.pop(path, None)
    if updated.get("bindings"):
        updated["version"] = version or 1
    else:
        updated.pop("version", None)
    updated["etag"] = base64.b64encode(secrets.token_bytes(8)).decode()
    expected = str(policy["etag"]) if "etag" in mask and policy.get("etag") else None
    return repository.set_policy(resource, updated, expected)


def granted_permissions(body: dict[str, Any]) -> dict[str, Any]:
    """Every permission asked about (nothing is enforced locally); wildcards are invalid."""
    permissions = body.get("permissions", [])
    if not isinstance(permissions, list) or not all(isinstance(p, str) for p in permissions):
        raise invalid("permissions must be a list of strings")
    for permission in permissions:
        if "*" in permission:
            raise invalid(f"permission {permission!r}: wildcards are not allowed")
    return {"permissions": list(permissions)} if permissions else {}


def _check_bindings(bindings: object) -> None:
    if not isinstance(bindings, list):
        raise invalid("policy.bindings must be a list")
    for binding in bindings:
        if not isinstance(binding, dict):
            raise invalid("each binding must be an object")
        role = str(binding.get("role", ""))
        if not re.match(r"^(roles/|projects/[^/]+/roles/|organizations/[^/]+/roles/).+", role):
            raise invalid(f"binding role {role!r} must look like roles/NAME")
        members = binding.get("members")
        if not isinstance(members, list) or not members:
            raise invalid(f"binding for {role} has no members")
        for member in members:
            if not isinstance(member, str) or not _MEMBER.match(member):
                raise invalid(f"invalid member {member!r} in the binding for {role}")
