# Names, the per-function table that drives triggers and IAM, and the Healthcare dataset and store.
# Other files: storage.tf (buckets), pubsub.tf (topics, Scheduler), functions.tf (source and
# functions), iam.tf (service accounts and every binding).

data "google_project" "this" {
  project_id = var.project_id
}

locals {
  healthcare_location = coalesce(var.healthcare_location, var.region)

  bucket_names = {
    for role in ["landing", "staging", "backups", "source"] :
    role => coalesce(var.bucket_names[role], "${var.project_id}-${var.name_prefix}-${role}")
  }

  dataset_id       = "projects/${var.project_id}/locations/${local.healthcare_location}/datasets/${var.dataset_id}"
  dicom_store_name = "${local.dataset_id}/dicomStores/${var.dicom_store_id}"
  drill_store_id   = "${var.dicom_store_id}-drill"
  drill_store_name = "${local.dataset_id}/dicomStores/${local.drill_store_id}"
  drill_on         = var.restore_drill_days > 0

  labels = merge({ app = "dicomflow" }, var.labels)

  # Google-managed service agents. The Healthcare one exists once the API has been used
  # (or after `gcloud beta services identity create`, see README).
  healthcare_agent = "serviceAccount:service-${data.google_project.this.number}@gcp-sa-healthcare.iam.gserviceaccount.com"
  pubsub_agent     = "serviceAccount:service-${data.google_project.this.number}@gcp-sa-pubsub.iam.gserviceaccount.com"

  # The environment of all three functions: they load the same Settings, so each needs the five
  # required names and the deployment key's secret. Endpoint settings (DICOMFLOW_HEALTHCARE_ENDPOINT, DICOMFLOW_PUBSUB_ENDPOINT,
  # STORAGE_EMULATOR_HOST) are for localcloud only and stay unset here. Names are checked against
  # dicomflow/config.py SETTINGS_DOC by tests/unit/test_infra.py.
  function_env_fixed = {
    DICOMFLOW_DICOM_STORE    = local.dicom_store_name
    DICOMFLOW_LANDING_BUCKET = google_storage_bucket.landing.name
    DICOMFLOW_STAGING_BUCKET = google_storage_bucket.staging.name
    DICOMFLOW_BACKUP_BUCKET  = google_storage_bucket.backups.name
    DICOMFLOW_ALERTS_TOPIC   = google_pubsub_topic.alerts.id
    DICOMFLOW_BACKUP_PREFIX  = var.backup_prefix
    # A batch is sealed only after a grace longer than the ingest timeout.
    DICOMFLOW_SEAL_GRACE_SECONDS = tostring(var.ingest_timeout_seconds + 10)
    DICOMFLOW_KEY_SECRET         = "${google_secret_manager_secret.deployment_key.id}/versions/latest"
    DICOMFLOW_ALERT_UIDS         = var.alert_uids
    DICOMFLOW_SWEEP_HOURS        = tostring(var.sweep_hours)
    # ingest holds storage.objects.delete on landing only when this is above 0 (iam.tf).
    DICOMFLOW_LANDING_DELETE_AFTER_DAYS = tostring(var.landing_delete_after_days)
    DICOMFLOW_RESTORE_DRILL_DAYS        = tostring(var.restore_drill_days)
    DICOMFLOW_RESTORE_DRILL_STUDIES     = tostring(var.restore_drill_studies)
    # Empty when the drill is off: there is no scratch store then.
    DICOMFLOW_DRILL_STORE = local.drill_on ? local.drill_store_name : ""
    # The sweep looks only at uploads whose staging copies the lifecycle rule still keeps.
    DICOMFLOW_STAGING_COPY_RETENTION_DAYS = tostring(var.staging_copy_retention_days)
  }
  function_env = merge(var.settings, local.function_env_fixed)

  # One entry per function: its trigger, its identity and every permission it holds.
  # iam.tf turns this table into bindings; infra/README.md shows it as a table.
  # Roles on buckets and topics are granted on that bucket or topic only. manifest_roles are
  # granted on the backups bucket with an IAM condition: objects PREFIX/.../_MANIFEST.json only,
  # and create only (a manifest is created once per attempt; a forced rerun writes its own under
  # PREFIX/DATE/rerun-N/), so nothing in the pipeline can delete or overwrite backup data. Healthcare permissions are
  # custom roles granted on the DICOM store or the dataset only.
  # Derived from the code: dicomflow/store.py (import, operations.get), dicomflow/export.py
  # (QIDO count, dicomStores.export, markers, _MANIFEST.json). Only export may start an export:
  # report's tick alerts a start whose claimer died, and the export function takes it over.
  # drill_store_permissions are granted on the scratch store <store>-drill, which exists only when
  # var.restore_drill_days > 0: export starts a restore drill there (dicomflow/drill.py), report
  # settles it (checks the restored studies, empties the store, and starts it again after a
  # clearing or a dead start), so both hold the same drill permissions.
  functions = {
    ingest = {
      description = "Storage finalize events on the landing bucket, and the minute tick: claim, check, stage, seal, import."
      trigger     = "Eventarc: storage object finalized on the landing bucket (retry on); tick topic (Eventarc Pub/Sub trigger)"
      timeout     = var.ingest_timeout_seconds
      memory      = "512Mi"
      max_inst    = var.ingest_max_instances
      bucket_roles = {
        landing = ["roles/storage.objectViewer"] # ranged header reads and the copy source
        staging = ["roles/storage.objectUser"]   # batches, quarantine, state: create, CAS update, delete
      }
      manifest_roles = []
      topic_roles = {
        alerts = ["roles/pubsub.publisher"] # quarantine alerts
      }
      store_permissions = [
        "healthcare.dicomStores.import",
      ]
      drill_store_permissions = []
      dataset_permissions = [
        "healthcare.operations.get",
      ]
      # Eventarc requires this of the service account of a Cloud Storage trigger; it holds
      # only eventarc.events.receiveEvent and cannot be granted below the project.
      project_roles = ["roles/eventarc.eventReceiver"]
    }
    report = {
      description = "The minute tick: track operations, verify batches against the store, write manifests, publish alerts."
      trigger     = "Eventarc Pub/Sub trigger on the tick topic (no retry: the next tick repeats the work)"
      timeout     = 540
      memory      = "1Gi"
      max_inst    = 1
      bucket_roles = {
        staging = ["roles/storage.objectUser"]   # batch files, results, state; deletes checked staging copies
        backups = ["roles/storage.objectViewer"] # lists a dated folder to count what an export wrote
      }
      manifest_roles = ["roles/storage.objectCreator"] # creates each attempt's _MANIFEST.json, once
      topic_roles = {
        alerts = ["roles/pubsub.publisher"]
      }
      store_permissions = [
        "healthcare.dicomStores.dicomWebRead", # QIDO search and WADO retrieve to verify each file
      ]
      drill_store_permissions = [
        "healthcare.dicomStores.get",            # the drill store exists (a restart after clearing)
        "healthcare.dicomStores.import",         # restarts a drill after clearing or a dead start
        "healthcare.dicomStores.dicomWebRead",   # checks the restored studies
        "healthcare.dicomStores.dicomWebDelete", # empties the store after the check
      ]
      dataset_permissions = [
        "healthcare.operations.get",
        "healthcare.operations.list",
      ]
      project_roles = []
    }
    export = {
      description = "The daily export tick: start dicomStores.export into the dated backup prefix, once per date."
      trigger     = "Eventarc Pub/Sub trigger on the export-schedule topic (retry on)"
      timeout     = 300
      memory      = "512Mi"
      max_inst    = 1
      bucket_roles = {
        staging = ["roles/storage.objectUser"]   # per-date markers, the manifests (incremental), the filter file, drill copies
        backups = ["roles/storage.objectViewer"] # the drill reads the latest backup's manifest, lists and copies its objects
      }
      manifest_roles = ["roles/storage.objectCreator"] # the manifest of an attempt whose export call failed
      topic_roles    = {}
      store_permissions = [
        "healthcare.dicomStores.dicomWebRead", # QIDO count of what the export should write
        "healthcare.dicomStores.export",
      ]
      drill_store_permissions = [
        "healthcare.dicomStores.get",            # the drill store exists
        "healthcare.dicomStores.import",         # restores a sample of the latest backup
        "healthcare.dicomStores.dicomWebRead",   # finds leftovers to clear first
        "healthcare.dicomStores.dicomWebDelete", # clears them (studies.delete)
      ]
      dataset_permissions = [
        "healthcare.operations.get", # the drill's clearing operations
      ]
      project_roles = []
    }
  }
}

resource "google_healthcare_dataset" "this" {
  count     = var.create_dataset ? 1 : 0
  name      = var.dataset_id
  location  = local.healthcare_location
  time_zone = "UTC"

  # CMEK is set when the dataset is created and cannot change afterwards.
  dynamic "encryption_spec" {
    for_each = local.kms_keys
    content {
      kms_key_name = encryption_spec.value
    }
  }

  depends_on = [google_kms_crypto_key_iam_member.agents]

  lifecycle {
    # Deleting the dataset deletes its stores; see README "Tear down".
    prevent_destroy = true
  }
}

resource "google_healthcare_dicom_store" "this" {
  count   = var.create_dicom_store ? 1 : 0
  name    = var.dicom_store_id
  dataset = var.create_dataset ? google_healthcare_dataset.this[0].id : local.dataset_id
  labels  = local.labels

  lifecycle {
    # The store holds the clinical data; deleting it must be a deliberate act outside Terraform.
    prevent_destroy = true
  }
}

# The restore drill's scratch store: export imports a sample of the latest backup here, compares it
# with the store, and empties it. Nothing else may write to it; it holds PHI only during a drill.
resource "google_healthcare_dicom_store" "drill" {
  count   = local.drill_on ? 1 : 0
  name    = local.drill_store_id
  dataset = var.create_dataset ? google_healthcare_dataset.this[0].id : local.dataset_id
  labels  = merge(local.labels, { role = "restore-drill" })
}
