# Buckets. All: in var.region (Eventarc needs the landing bucket there), uniform bucket-level
# access, public access prevention enforced, versioning on, noncurrent versions deleted after
# var.noncurrent_retention_days. No lifecycle rule ever deletes a live object in landing or staging.

resource "google_storage_bucket" "landing" {
  #checkov:skip=CKV_GCP_62:Access is audited with Cloud Audit Logs (Data Access); a log bucket would itself need a log bucket.
  name                        = local.bucket_names.landing
  location                    = upper(var.region)
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = var.force_destroy_buckets
  labels                      = local.labels

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

# The pipeline's own state: batches/, quarantine/, manifests/, state/. A staging copy is the claim of
# its object generation (create-if-absent), so the pipeline never deletes one: it must outlive the
# maximum event age, or a redelivered event would claim the file again. The lifecycle deletes the
# copies, quarantine copies and late claims staging_copy_retention_days after they were written.
resource "google_storage_bucket" "staging" {
  #checkov:skip=CKV_GCP_62:Access is audited with Cloud Audit Logs (Data Access); a log bucket would itself need a log bucket.
  name                        = local.bucket_names.staging
  location                    = upper(var.region)
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = var.force_destroy_buckets
  labels                      = local.labels

  # A marker or manifest overwritten or deleted by mistake can be restored for a while.
  versioning {
    enabled = true
  }

  lifecycle_rule {
    condition {
      age            = var.staging_copy_retention_days
      matches_prefix = ["batches/", "quarantine/", "state/late/"]
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
}

# Exports land under gs://BACKUPS/PREFIX/DATE/. Never force-destroyed, and Terraform refuses to
# destroy it at all (see README "Tear down").
resource "google_storage_bucket" "backups" {
  #checkov:skip=CKV_GCP_62:Access is audited with Cloud Audit Logs (Data Access); a log bucket would itself need a log bucket.
  name                        = local.bucket_names.backups
  location                    = upper(var.region)
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = false
  labels                      = local.labels

  versioning {
    enabled = true
  }

  # Retention: a backup is deleted backup_retention_days after it was written.
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
