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

variable "backup_retention_days" {
  type        = number
  description = "Days a backup is kept before the lifecycle rule deletes it (then noncurrent_retention_days more as a noncurrent version)."
  default     = 90

  validation {
    condition     = var.backup_retention_days >= 1 && floor(var.backup_retention_days) == var.backup_retention_days
    error_message = "backup_retention_days must be a whole number of days, 1 or more."
  }
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
  description = "Days staging copies, quarantine copies and late claims are kept. Each is the claim of its file, so this must be longer than DICOMFLOW_MAX_EVENT_AGE_SECONDS (25 h by default)."
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
      "DICOMFLOW_SWEEP_HOURS",
      "DICOMFLOW_LANDING_DELETE_AFTER_DAYS",
      "DICOMFLOW_BATCH_WINDOW_SECONDS",
      "DICOMFLOW_BATCH_MAX_FILES",
      "DICOMFLOW_BATCH_MAX_BYTES",
      "DICOMFLOW_LATE_WINDOW_SECONDS",
      "DICOMFLOW_MAX_RUNNING_IMPORTS",
      "DICOMFLOW_IMPORT_RESTART_SECONDS",
      "DICOMFLOW_EXPORT_DATE_LAYOUT",
      "DICOMFLOW_EXPORT_MIME_TYPE",
      "DICOMFLOW_EXPORT_MODE",
      "DICOMFLOW_STALLED_SECONDS",
      "DICOMFLOW_BACKLOG_SECONDS",
      "DICOMFLOW_ALERT_OBJECT_NAMES",
      "DICOMFLOW_ALERT_SAMPLE_FILES",
    ], name)])
    error_message = "settings may only hold the tuning names of SETTINGS_DOC; the required ones, the endpoints, DICOMFLOW_BACKUP_PREFIX and DICOMFLOW_SEAL_GRACE_SECONDS are set by this module."
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
