# Buckets. All: uniform bucket-level access, public access prevention enforced, CMEK when
# var.kms_key_name is set. Landing, staging and source in var.region (Eventarc needs the landing
# bucket there), versioned, noncurrent versions deleted after var.noncurrent_retention_days.
# Backups in var.backup_location under a retention policy (or versioned when the policy is off).
# No lifecycle rule deletes a live landing object, or a live staging object other than the claims.

locals {
  # The functions drop events older than this; a claim must outlive it (see the staging bucket).
  # The default is DICOMFLOW_MAX_EVENT_AGE_SECONDS's in dicomflow/config.py SETTINGS_DOC.
  max_event_age_seconds = tonumber(lookup(var.settings, "DICOMFLOW_MAX_EVENT_AGE_SECONDS", "90000"))
  # What the sweep and landing retention need (dicomflow/config.py _check_housekeeping): an upload must be
  # older than the event age and the seal grace, and still recorded, for one whole sweep period.
  sweep_needs_seconds = local.max_event_age_seconds + var.ingest_timeout_seconds + 10 + var.sweep_hours * 3600
  backup_retention_on = var.backup_retention_policy_days > 0
  kms_keys            = var.kms_key_name == null ? [] : [var.kms_key_name]
}

resource "google_storage_bucket" "landing" {
  #checkov:skip=CKV_GCP_62:Access is audited with Cloud Audit Logs (Data Access); a log bucket would itself need a log bucket.
  name                        = local.bucket_names.landing
  location                    = upper(var.region)
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = var.force_destroy_buckets
  labels                      = local.labels

  dynamic "encryption" {
    for_each = local.kms_keys
    content {
      default_kms_key_name = encryption.value
    }
  }
  # With CMEK, the Cloud Storage service agent must hold the key before the bucket can use it.
  depends_on = [google_kms_crypto_key_iam_member.agents]

  # Versioning keeps the generation an event names even if the uploader overwrites the object
  # before ingest has copied it.
  versioning {
    enabled = true
  }

  lifecycle_rule {
    condition {
      with_state                 = "ARCHIVED"
      days_since_noncurrent_time = var.noncurrent_retention_days
    }
    action {
      type = "Delete"
    }
  }

  lifecycle_rule {
    condition {
      age = 1
    }
    action {
      type = "AbortIncompleteMultipartUpload"
    }
  }
}

# The pipeline's own state: batches/, quarantine/, failed/, manifests/, state/. A staging copy is the
# claim of its object generation (create-if-absent), so the pipeline never deletes one: it must
# outlive the maximum event age, or a redelivered event would claim the file again. The lifecycle
# deletes the copies, quarantine copies, failure records and late claims (all may hold PHI)
# staging_copy_retention_days after they were written; a precondition keeps that longer than the
# maximum event age.
resource "google_storage_bucket" "staging" {
  #checkov:skip=CKV_GCP_62:Access is audited with Cloud Audit Logs (Data Access); a log bucket would itself need a log bucket.
  name                        = local.bucket_names.staging
  location                    = upper(var.region)
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = var.force_destroy_buckets
  labels                      = local.labels

  dynamic "encryption" {
    for_each = local.kms_keys
    content {
      default_kms_key_name = encryption.value
    }
  }
  # With CMEK, the Cloud Storage service agent must hold the key before the bucket can use it.
  depends_on = [google_kms_crypto_key_iam_member.agents]

  # A marker or manifest overwritten or deleted by mistake can be restored for a while.
  versioning {
    enabled = true
  }

  lifecycle_rule {
    condition {
      age            = var.staging_copy_retention_days
      matches_prefix = ["batches/", "quarantine/", "failed/", "state/late/"]
      with_state     = "LIVE"
    }
    action {
      type = "Delete"
    }
  }

  lifecycle_rule {
    condition {
      with_state                 = "ARCHIVED"
      days_since_noncurrent_time = var.noncurrent_retention_days
    }
    action {
      type = "Delete"
    }
  }

  lifecycle_rule {
    condition {
      age = 1
    }
    action {
      type = "AbortIncompleteMultipartUpload"
    }
  }

  lifecycle {
    precondition {
      condition     = var.staging_copy_retention_days * 86400 > local.max_event_age_seconds
      error_message = "staging_copy_retention_days must be longer than DICOMFLOW_MAX_EVENT_AGE_SECONDS: an expired claim lets a redelivered event import its file again."
    }
    precondition {
      condition     = var.sweep_hours == 0 || (var.staging_copy_retention_days - 1) * 86400 > local.sweep_needs_seconds
      error_message = "staging_copy_retention_days leaves the sweep no whole sweep_hours period between the maximum event age and the copies' expiry (less a day): raise it, or shorten sweep_hours."
    }
    precondition {
      condition     = var.landing_delete_after_days == 0 || var.landing_delete_after_days * 86400 >= local.sweep_needs_seconds
      error_message = "landing_delete_after_days is sooner than a late event or the sweep may need the upload: at least the maximum event age, the seal grace and one sweep period, or 0."
    }
  }
}

# Exports land under gs://BACKUPS/PREFIX/DATE/. Never force-destroyed, and Terraform refuses to
# destroy it at all (see README "Tear down"). With the retention policy on (the default), no one can
# delete or overwrite a backup object for backup_retention_policy_days: not the pipeline, not the
# Healthcare agent, not a project owner. Cloud Storage does not allow a retention policy and object
# versioning on one bucket, so versioning is on only when the policy is off. A rerun of an export for
# a date therefore cannot write over the first run: it writes to a fresh sub-prefix.
resource "google_storage_bucket" "backups" {
  #checkov:skip=CKV_GCP_62:Access is audited with Cloud Audit Logs (Data Access); a log bucket would itself need a log bucket.
  #checkov:skip=CKV_GCP_78:A retention policy protects the backups instead; Cloud Storage forbids it together with versioning (on when the policy is off).
  name                        = local.bucket_names.backups
  location                    = upper(coalesce(var.backup_location, var.region))
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = false
  labels                      = local.labels

  dynamic "encryption" {
    for_each = local.kms_keys
    content {
      default_kms_key_name = encryption.value
    }
  }
  # With CMEK, the Cloud Storage service agent must hold the key before the bucket can use it.
  depends_on = [google_kms_crypto_key_iam_member.agents]

  versioning {
    enabled = !local.backup_retention_on
  }

  dynamic "retention_policy" {
    for_each = local.backup_retention_on ? [var.backup_retention_policy_days] : []
    content {
      retention_period = retention_policy.value * 86400
      is_locked        = var.backup_retention_lock
    }
  }

  # A backup is deleted backup_retention_days after it was written (never before its retention
  # policy allows; the precondition below keeps the two in order).
  lifecycle_rule {
    condition {
      age            = var.backup_retention_days
      matches_prefix = ["${var.backup_prefix}/"]
      with_state     = "LIVE"
    }
    action {
      type = "Delete"
    }
  }

  lifecycle_rule {
    condition {
      with_state                 = "ARCHIVED"
      days_since_noncurrent_time = var.noncurrent_retention_days
    }
    action {
      type = "Delete"
    }
  }

  lifecycle_rule {
    condition {
      age = 1
    }
    action {
      type = "AbortIncompleteMultipartUpload"
    }
  }

  lifecycle {
    prevent_destroy = true

    precondition {
      condition     = var.backup_retention_days >= var.backup_retention_policy_days
      error_message = "backup_retention_days must be at least backup_retention_policy_days: retained objects cannot be deleted sooner."
    }
  }
}

# Function source archives, one object per content hash.
resource "google_storage_bucket" "source" {
  #checkov:skip=CKV_GCP_62:Access is audited with Cloud Audit Logs (Data Access); a log bucket would itself need a log bucket.
  name                        = local.bucket_names.source
  location                    = upper(var.region)
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = var.force_destroy_buckets
  labels                      = local.labels

  dynamic "encryption" {
    for_each = local.kms_keys
    content {
      default_kms_key_name = encryption.value
    }
  }
  # With CMEK, the Cloud Storage service agent must hold the key before the bucket can use it.
  depends_on = [google_kms_crypto_key_iam_member.agents]

  versioning {
    enabled = true
  }

  lifecycle_rule {
    condition {
      with_state                 = "ARCHIVED"
      days_since_noncurrent_time = var.noncurrent_retention_days
    }
    action {
      type = "Delete"
    }
  }
}
