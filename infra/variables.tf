# Inputs. Every variable is typed and described; the ones a typo would break are validated.

variable "project_id" {
  type        = string
  description = "Google Cloud project to deploy into (its ID, not its number)."

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{4,28}[a-z0-9]$", var.project_id))
    error_message = "project_id must be a project ID: 6-30 lowercase letters, digits or hyphens, starting with a letter."
  }
}

variable "region" {
  type        = string
  description = "Region of the functions, buckets, Eventarc trigger and Scheduler jobs, e.g. us-central1. Eventarc requires the landing bucket and the trigger to share it."

  validation {
    condition     = can(regex("^[a-z]+-[a-z]+[0-9]$", var.region))
    error_message = "region must be a single Google Cloud region such as us-central1 or europe-west4 (not a multi-region)."
  }
}

variable "name_prefix" {
  type        = string
  description = "Prefix of every resource name (functions, service accounts, topics, jobs, custom roles)."
  default     = "dicomflow"

  validation {
    # Service account IDs are at most 30 characters: prefix + "-ingest" must fit.
    condition     = can(regex("^[a-z][a-z0-9-]{1,19}[a-z0-9]$", var.name_prefix))
    error_message = "name_prefix must be 3-21 lowercase letters, digits or hyphens, starting with a letter."
  }
}

# --- Healthcare dataset and DICOM store: create them, or point at existing ones. ---

variable "create_dataset" {
  type        = bool
  description = "Create the Healthcare dataset. Set false to use an existing dataset named dataset_id in healthcare_location."
  default     = true
}

variable "dataset_id" {
  type        = string
  description = "ID of the Healthcare dataset (new or existing)."
  default     = "dicomflow"

  validation {
    condition     = can(regex("^[A-Za-z0-9_.-]{1,256}$", var.dataset_id))
    error_message = "dataset_id may hold letters, digits, '_', '-' and '.' (1-256 characters)."
  }
}

variable "create_dicom_store" {
  type        = bool
  description = "Create the DICOM store. Set false to use an existing store named dicom_store_id in the dataset."
  default     = true
}

variable "dicom_store_id" {
  type        = string
  description = "ID of the DICOM store (new or existing)."
  default     = "dicomflow"

  validation {
    condition     = can(regex("^[A-Za-z0-9_.-]{1,256}$", var.dicom_store_id))
    error_message = "dicom_store_id may hold letters, digits, '_', '-' and '.' (1-256 characters)."
  }
}

variable "healthcare_location" {
  type        = string
  description = "Location of the Healthcare dataset, e.g. us-central1 or us. Null means the same as region."
  default     = null
}

# --- Buckets ---

variable "bucket_names" {
  type = object({
    landing = optional(string)
    staging = optional(string)
    backups = optional(string)
    source  = optional(string)
  })
  description = "Bucket names; each one left null becomes PROJECT-PREFIX-ROLE (e.g. my-proj-dicomflow-landing). Bucket names are global."
  default     = {}

  validation {
    condition = alltrue([
      for name in values(var.bucket_names) : name == null || can(regex("^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$", name))
    ])
    error_message = "Each bucket name must be 3-63 lowercase letters, digits, '-', '_' or '.', without gs://."
  }
}

variable "backup_prefix" {
  type        = string
  description = "Folder in the backups bucket that exports go under: gs://BACKUPS/PREFIX/DATE/. Sets DICOMFLOW_BACKUP_PREFIX."
  default     = "backups"

  validation {
    condition     = can(regex("^[A-Za-z0-9][A-Za-z0-9._/-]*[A-Za-z0-9]$", var.backup_prefix))
    error_message = "backup_prefix must be a folder name such as 'backups', with no leading or trailing slash."
  }
}

variable "backup_location" {
  type        = string
  description = "Location of the backups bucket. Null means region. A dual-region (e.g. NAM4, EUR4) or multi-region (US, EU, ASIA) keeps the backups when one region is lost; see README."
  default     = null

  validation {
    condition     = var.backup_location == null || can(regex("^[A-Za-z]+[A-Za-z0-9-]*[A-Za-z0-9]$", var.backup_location))
    error_message = "backup_location must be a Cloud Storage location such as US, EU, NAM4 or europe-west4."
  }
}

variable "backup_retention_days" {
  type        = number
  description = "Days a backup is kept before the lifecycle rule deletes it. At least backup_retention_policy_days (objects under a retention policy cannot be deleted sooner)."
  default     = 90

  validation {
    condition     = var.backup_retention_days >= 1 && floor(var.backup_retention_days) == var.backup_retention_days
    error_message = "backup_retention_days must be a whole number of days, 1 or more."
  }
}

variable "backup_retention_policy_days" {
  type        = number
  description = "Retention policy of the backups bucket: no backup object can be deleted or overwritten, by anyone, for this many days after it was written. 0 turns the policy off (and object versioning on instead: Cloud Storage does not allow both on one bucket)."
  default     = 30

  validation {
    condition     = var.backup_retention_policy_days >= 0 && floor(var.backup_retention_policy_days) == var.backup_retention_policy_days && var.backup_retention_policy_days <= 36500
    error_message = "backup_retention_policy_days must be a whole number of days, 0 (off) to 36500."
  }
}

variable "backup_retention_lock" {
  type        = bool
  description = "Lock the backups bucket's retention policy. A locked policy can never be shortened or removed, and the bucket cannot be deleted until every object has aged out. Irreversible; see README."
  default     = false
}

variable "noncurrent_retention_days" {
  type        = number
  description = "Days a noncurrent (overwritten or deleted) object version is kept in the versioned buckets before it is deleted."
  default     = 7

  validation {
    condition     = var.noncurrent_retention_days >= 1 && floor(var.noncurrent_retention_days) == var.noncurrent_retention_days
    error_message = "noncurrent_retention_days must be a whole number of days, 1 or more."
  }
}

variable "staging_copy_retention_days" {
  type        = number
  description = "Days staging copies, quarantine copies, failure records (failed/), late claims and restore copies (restores/) are kept; they hold PHI. Each is the claim of its file, so this must be longer than DICOMFLOW_MAX_EVENT_AGE_SECONDS (25 h by default; checked at plan time)."
  default     = 7

  validation {
    condition     = var.staging_copy_retention_days >= 2 && floor(var.staging_copy_retention_days) == var.staging_copy_retention_days
    error_message = "staging_copy_retention_days must be a whole number of days, 2 or more (longer than the maximum event age)."
  }
}

variable "force_destroy_buckets" {
  type        = bool
  description = "Let terraform destroy delete the landing, staging and source buckets with objects in them. The backups bucket is never force-destroyed."
  default     = false
}

# --- Schedules ---

variable "tick_schedule" {
  type        = string
  description = "Cron schedule of the tick that seals batches (ingest) and tracks operations (report)."
  default     = "* * * * *"

  validation {
    condition     = length(split(" ", trimspace(var.tick_schedule))) == 5
    error_message = "tick_schedule must be a five-field cron expression."
  }
}

variable "export_schedule" {
  type        = string
  description = "Cron schedule of the daily export (backup) tick."
  default     = "0 2 * * *"

  validation {
    condition     = length(split(" ", trimspace(var.export_schedule))) == 5
    error_message = "export_schedule must be a five-field cron expression."
  }
}

variable "time_zone" {
  type        = string
  description = "IANA time zone the Scheduler jobs read their cron in, e.g. Etc/UTC or Europe/Berlin."
  default     = "Etc/UTC"

  validation {
    condition     = can(regex("^[A-Za-z_]+(/[A-Za-z0-9_+-]+)*$", var.time_zone))
    error_message = "time_zone must be an IANA name such as Etc/UTC or America/New_York."
  }
}

# --- Functions ---

variable "runtime" {
  type        = string
  description = "Cloud Functions Python runtime."
  default     = "python311"

  validation {
    condition     = contains(["python311", "python312", "python313"], var.runtime)
    error_message = "runtime must be python311, python312 or python313 (dicomflow needs Python 3.11+)."
  }
}

variable "ingest_timeout_seconds" {
  type        = number
  description = "Timeout of the ingest function. DICOMFLOW_SEAL_GRACE_SECONDS is set 10 s above it: a staging copy may take half the grace, and a delivery later than that copies into a late window."
  default     = 120

  validation {
    condition     = var.ingest_timeout_seconds >= 30 && var.ingest_timeout_seconds <= 540
    error_message = "ingest_timeout_seconds must be 30-540 (the event-driven maximum)."
  }
}

variable "ingest_max_instances" {
  type        = number
  description = "Most ingest instances at once; caps cost under an upload burst."
  default     = 50

  validation {
    condition     = var.ingest_max_instances >= 1 && var.ingest_max_instances <= 1000
    error_message = "ingest_max_instances must be 1-1000."
  }
}

variable "settings" {
  type        = map(string)
  description = "Optional dicomflow tuning settings passed to all three functions, by env name (see dicomflow/config.py SETTINGS_DOC), e.g. { DICOMFLOW_BATCH_MAX_FILES = \"2000\" }."
  default     = {}

  validation {
    # Required settings, endpoints (localcloud only), the backup prefix and the seal grace are set by this module.
    condition = alltrue([for name in keys(var.settings) : contains([
      "DICOMFLOW_INCLUDE_GLOBS",
      "DICOMFLOW_INCLUDE_PREFIXES",
      "DICOMFLOW_SNIFF",
      "DICOMFLOW_MAX_EVENT_AGE_SECONDS",
      "DICOMFLOW_BATCH_WINDOW_SECONDS",
      "DICOMFLOW_BATCH_MAX_FILES",
      "DICOMFLOW_BATCH_MAX_BYTES",
      "DICOMFLOW_LATE_WINDOW_SECONDS",
      "DICOMFLOW_FEED_GRACE_SECONDS",
      "DICOMFLOW_MAX_RUNNING_IMPORTS",
      "DICOMFLOW_IMPORT_RESTART_SECONDS",
      "DICOMFLOW_EXPORT_DATE_LAYOUT",
      "DICOMFLOW_EXPORT_MIME_TYPE",
      "DICOMFLOW_EXPORT_MODE",
      "DICOMFLOW_STALLED_SECONDS",
      "DICOMFLOW_BACKLOG_SECONDS",
      "DICOMFLOW_VERIFY_STUCK_MINUTES",
      "DICOMFLOW_STALE_STATE_MINUTES",
      "DICOMFLOW_ALERT_OBJECT_NAMES",
      "DICOMFLOW_ALERT_SAMPLE_FILES",
    ], name)])
    error_message = "settings may only hold the tuning names of SETTINGS_DOC; the required ones, the endpoints, the key, DICOMFLOW_BACKUP_PREFIX, DICOMFLOW_SEAL_GRACE_SECONDS and the settings with a variable of their own are set by this module."
  }
}

variable "build_service_account" {
  type        = string
  description = "Full resource name (projects/P/serviceAccounts/EMAIL) of the service account Cloud Build uses to build the functions. Null uses the project's default build service account. See infra/README.md."
  default     = null

  validation {
    condition     = var.build_service_account == null || can(regex("^projects/[^/]+/serviceAccounts/[^/]+@[^/]+$", var.build_service_account))
    error_message = "build_service_account must look like projects/PROJECT/serviceAccounts/NAME@PROJECT.iam.gserviceaccount.com."
  }
}

variable "labels" {
  type        = map(string)
  description = "Labels added to every resource that takes labels."
  default     = {}
}

# --- Security: keys, encryption, audit logs ---

variable "kms_key_name" {
  type        = string
  description = "Cloud KMS key (projects/P/locations/L/keyRings/R/cryptoKeys/K) that encrypts the buckets, the topics and the Healthcare dataset (CMEK). Null uses Google-managed encryption. The key must be in a location that covers region, the backups location and healthcare_location; the service agents get encrypt/decrypt on it."
  default     = null

  validation {
    condition     = var.kms_key_name == null || can(regex("^projects/[^/]+/locations/[^/]+/keyRings/[^/]+/cryptoKeys/[^/]+$", var.kms_key_name))
    error_message = "kms_key_name must look like projects/P/locations/L/keyRings/R/cryptoKeys/K."
  }
}

variable "data_access_audit_logs" {
  type        = bool
  description = "Turn on Cloud Audit Logs Data Access logs (ADMIN_READ, DATA_READ, DATA_WRITE) for the Healthcare API and Cloud Storage in the project. They record who read or changed each object and DICOM instance; they cost log storage."
  default     = true
}

variable "alert_uids" {
  type        = string
  description = "How DICOM UIDs appear in alerts: hash (keyed with the deployment key, default) or plain. Sets DICOMFLOW_ALERT_UIDS."
  default     = "hash"

  validation {
    condition     = contains(["hash", "plain"], var.alert_uids)
    error_message = "alert_uids must be hash or plain."
  }
}

# --- Sweep, landing clean-up, restore drill ---

variable "sweep_hours" {
  type        = number
  description = "Hours between sweeps that look for landing objects no event was delivered for (0 = off). Sets DICOMFLOW_SWEEP_HOURS."
  default     = 24

  validation {
    condition     = var.sweep_hours >= 0 && floor(var.sweep_hours) == var.sweep_hours
    error_message = "sweep_hours must be a whole number, 0 (off) or more."
  }
}

variable "landing_delete_after_days" {
  type        = number
  description = "Delete a landing object this many days after it was imported and verified (0 = never). When above 0, ingest is granted storage.objects.delete on the landing bucket, and nothing more. Sets DICOMFLOW_LANDING_DELETE_AFTER_DAYS."
  default     = 0

  validation {
    condition     = var.landing_delete_after_days >= 0 && floor(var.landing_delete_after_days) == var.landing_delete_after_days
    error_message = "landing_delete_after_days must be a whole number of days, 0 (never) or more."
  }
}

variable "restore_drill_days" {
  type        = number
  description = "Days between restore drills, in which export imports a sample of the latest backup into the scratch store <dicom_store_id>-drill and compares it (0 = off: no scratch store, no grants). Sets DICOMFLOW_RESTORE_DRILL_DAYS."
  default     = 7

  validation {
    condition     = var.restore_drill_days >= 0 && floor(var.restore_drill_days) == var.restore_drill_days
    error_message = "restore_drill_days must be a whole number of days, 0 (off) or more."
  }
}

variable "restore_drill_studies" {
  type        = number
  description = "Studies a restore drill restores and compares, sampled at random; 0 restores the whole backup. Sets DICOMFLOW_RESTORE_DRILL_STUDIES."
  default     = 50

  validation {
    condition     = var.restore_drill_studies >= 0 && floor(var.restore_drill_studies) == var.restore_drill_studies
    error_message = "restore_drill_studies must be a whole number, 0 (the whole backup) or more."
  }
}

# --- Alerting: Cloud Monitoring and an optional push subscription ---

variable "monitoring_alerts" {
  type        = bool
  description = "Create the log-based metric of published alerts and the two Cloud Monitoring alert policies (ERROR kinds, WARNING kinds)."
  default     = true
}

variable "alert_emails" {
  type        = list(string)
  description = "Email addresses the alert policies notify (one notification channel each)."
  default     = []

  validation {
    condition     = alltrue([for e in var.alert_emails : can(regex("^[^@\\s]+@[^@\\s]+\\.[^@\\s]+$", e))])
    error_message = "alert_emails must hold email addresses."
  }
}

variable "alert_webhook_url" {
  type        = string
  description = "Optional HTTPS URL the alert policies also notify (a webhook notification channel)."
  default     = null
  sensitive   = true

  validation {
    condition     = var.alert_webhook_url == null || startswith(coalesce(var.alert_webhook_url, "x"), "https://")
    error_message = "alert_webhook_url must be an https:// URL."
  }
}

variable "runbook_url" {
  type        = string
  description = "Where your copy of docs/alerts.md is published, e.g. the web view of it in your repository. Each alert policy's documentation links <runbook_url>#<kind>. Null names the file docs/alerts.md instead of a URL."
  default     = null

  validation {
    condition     = var.runbook_url == null || can(regex("^https://", coalesce(var.runbook_url, "x")))
    error_message = "runbook_url must be an https:// URL."
  }
}

variable "alert_push_endpoint" {
  type        = string
  description = "Optional HTTPS endpoint that receives every alert as a Pub/Sub push, authenticated with an OIDC token of a dedicated service account (see examples/alert_consumer). Null: no push subscription."
  default     = null

  validation {
    condition     = var.alert_push_endpoint == null || startswith(coalesce(var.alert_push_endpoint, "x"), "https://")
    error_message = "alert_push_endpoint must be an https:// URL."
  }
}

variable "alert_push_audience" {
  type        = string
  description = "Audience of the push subscription's OIDC token. Null means the endpoint URL."
  default     = null
}
